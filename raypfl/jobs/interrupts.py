"""Ctrl-C and SIGTERM end a run cleanly: Ray shut down, `result.json` says `interrupted`, a resume hint.

`install()` (by `python -m raypfl`) makes SIGINT and SIGTERM raise `RunInterrupted` (a KeyboardInterrupt)
in the main thread, so the run's `finally` blocks close the runtime and shut down the Ray it started, and
the entry point reports one line and exits with 128 + the signal number (130, 143).

Ray would take SIGTERM over: `ray.init` installs a handler that kills Ray's processes and exits with code
1, and its core worker a C++ handler that dumps stacks. `guard_ray()` keeps ours (Ray's Python-level
handler is not installed in this process, and ours is put back after `ray.init`, which removes the C++
one for SIGTERM only).

A signal that arrives while `ray.init` runs is held until it returns (`deferred()`): a KeyboardInterrupt
inside Ray's core-worker construction leaves the process to crash (SIGSEGV) at exit. A second signal while
the run is stopping is ignored, so the cleanup can finish; a third forces.

`start_watchdog()` starts a small process (`python -m raypfl.jobs.watchdog`) that ends the Ray processes this
driver started if they outlive it: after a SIGKILL of the driver, or a Ctrl-C while Ray was starting, Ray's
agents otherwise linger for about a minute.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

#: The exit code of a run ended by a signal: 128 + its number (the shell's convention).
EXIT_OFFSET = 128
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(KeyboardInterrupt):
    """The run got SIGINT (Ctrl-C) or SIGTERM."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return EXIT_OFFSET + self.signum


def signum_of(exc: BaseException) -> int:
    """The signal behind a KeyboardInterrupt (SIGINT unless it is a RunInterrupted)."""
    return getattr(exc, "signum", signal.SIGINT)


_installed = False
_received = 0  # signals so far
_deferring = False  # inside deferred(): the first signal waits for the block's end
_deferred: list[int] = []


def _raise(signum: int, frame) -> None:
    global _received
    _received += 1
    if _deferring and _received == 1:
        _deferred.append(signum)
        return
    if _received == 2 and not _deferring:
        return  # the run is stopping already: let its cleanup finish (a third signal forces it)
    raise RunInterrupted(signum)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold a SIGINT/SIGTERM that arrives inside the block until its end (a second one raises at once).

    For code an exception must not cut: `ray.init` (a KeyboardInterrupt inside Ray's core-worker
    construction leaves a half-built worker that crashes the process, SIGSEGV, when it exits) and file
    writes (`torch.save` turns it into a RuntimeError and leaves a partial file).
    """
    global _deferring
    if _deferring:
        yield
        return
    _deferring = True
    _deferred.clear()
    try:
        yield
    except Exception as exc:
        _deferring = False
        if _deferred:
            raise RunInterrupted(_deferred.pop()) from exc
        raise
    finally:
        _deferring = False
    if _deferred:
        raise RunInterrupted(_deferred.pop())


def interrupt_in(exc: BaseException | None) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt behind `exc`, if any: code that catches it may raise another error instead
    (torch.save: `RuntimeError: ... unexpected pos`), with the interrupt as its context."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def install() -> bool:
    """SIGINT and SIGTERM raise RunInterrupted in the main thread; False off the main thread."""
    global _installed
    if threading.current_thread() is not threading.main_thread():
        return False
    for signum in _SIGNALS:
        signal.signal(signum, _raise)
    _installed = True
    return True


def installed() -> bool:
    """True in a process whose entry point installed the handlers (not in a Ray worker running a job)."""
    return _installed


def quiet() -> None:
    """Ignore further SIGINT/SIGTERM (while an interrupted run writes its result and says so)."""
    if threading.current_thread() is threading.main_thread():
        for signum in _SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


def guard_ray() -> None:
    """Keep SIGTERM ours through `ray.init` in this process (see the module docstring). Idempotent."""
    if not _installed:
        return
    import ray
    from ray._private import utils as ray_utils

    if getattr(ray.init, "_raypfl_guarded", False):
        return
    if hasattr(ray_utils, "set_sigterm_handler"):
        ray_utils.set_sigterm_handler = lambda handler: None  # Ray's: kill its processes, exit code 1
    original = ray.init

    @functools.wraps(original)
    def init(*args, **kwargs):
        with deferred():  # an interrupt takes effect once Ray has started (and can be shut down cleanly)
            try:
                return original(*args, **kwargs)
            finally:  # the core worker installed a C++ failure handler for SIGTERM (a stack dump): ours again
                install()

    init._raypfl_guarded = True
    ray.init = init


def shutdown_ray() -> None:
    """Shut down the Ray this process started or joined, if any (after an interrupt, in whatever state)."""
    ray = sys.modules.get("ray")
    if ray is None:
        return
    with contextlib.suppress(Exception):  # best effort: the watchdog ends whatever is left
        ray.shutdown()


_watchdog: subprocess.Popen | None = None


def start_watchdog() -> None:
    """Start the watchdog of this driver's Ray processes (once per process; only from the entry point)."""
    global _watchdog
    if _watchdog is not None or not _installed or sys.platform != "linux":
        return
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        return
    ray_dir = list(spec.submodule_search_locations)[0]
    try:
        _watchdog = subprocess.Popen(
            [sys.executable, "-m", "raypfl.jobs.watchdog", str(os.getpid()), ray_dir],
            stdin=subprocess.PIPE,  # its write end stays here: EOF tells the watchdog that this process ended
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C to the terminal's process group must not end it first
            close_fds=True,
        )
    except OSError:
        _watchdog = None
