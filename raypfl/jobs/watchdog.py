"""`python -m raypfl.jobs.watchdog DRIVER_PID RAY_DIR`: end the driver's Ray processes that outlive it.

Started by the driver (`raypfl.jobs.interrupts.start_watchdog`) with a pipe as stdin whose other end only the
driver holds. While the driver lives, the watchdog remembers the Ray processes among its descendants (every
0.5 s for the first minute, then every 2 s). When the driver is gone (EOF on the pipe, or a new parent),
it waits GRACE_S for those processes to exit by themselves, then SIGKILLs the ones still running.

Why: Ray's GCS and raylet share the driver's fate (PR_SET_PDEATHSIG), but the raylet's agents (dashboard
and runtime-env agents) then spend about a minute trying to report the raylet's death to the dead GCS.
Only processes that were descendants of the driver are touched, each checked against its start time.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time

import psutil

GRACE_S = 2.0
FAST_S, SLOW_S, FAST_FOR_S = 0.5, 2.0, 60.0


def is_ray(proc: psutil.Process, ray_dir: str) -> bool:
    try:
        cmdline = " ".join(proc.cmdline())
    except psutil.Error:
        return False
    return cmdline.startswith("ray::") or ray_dir in cmdline


def watch(driver_pid: int, ray_dir: str, stdin_fd: int = 0) -> int:
    """Watch until the driver is gone, then end its leftover Ray processes; returns how many were killed."""
    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return 0
    remembered: dict[int, psutil.Process] = {}
    me = os.getpid()  # a child of the driver too
    start = time.monotonic()
    while True:
        interval = FAST_S if time.monotonic() - start < FAST_FOR_S else SLOW_S
        readable, _, _ = select.select([stdin_fd], [], [], interval)
        if readable and not os.read(stdin_fd, 4096):
            break  # EOF: the driver's end of the pipe is closed
        if os.getppid() != driver_pid or not driver.is_running():
            break
        try:
            for child in driver.children(recursive=True):
                if child.pid not in remembered and child.pid != me and is_ray(child, ray_dir):
                    remembered[child.pid] = child
        except psutil.Error:
            break
        remembered = {pid: p for pid, p in remembered.items() if p.is_running()}
    killed = 0
    for proc in survivors(list(remembered.values()), GRACE_S):
        try:
            if proc.is_running():  # the same process (psutil compares start times), not a reused pid
                proc.kill()
                killed += 1
        except psutil.Error:
            pass
    return killed


def survivors(procs: list[psutil.Process], within: float, poll_s: float = 0.1) -> list[psutil.Process]:
    """The processes of `procs` still running (not zombies) after waiting up to `within` seconds for them."""
    deadline = time.monotonic() + within
    alive = list(procs)
    while alive and time.monotonic() < deadline:
        time.sleep(poll_s)
        alive = [p for p in alive if _running(p)]
    return alive


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # outlive a Ctrl-C to the driver's process group
    watch(int(argv[0]), argv[1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
