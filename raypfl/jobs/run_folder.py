"""One run per run folder: a folder that holds a run's results is refused, and a live run locks its folder.

A run writes metrics.csv, clients.csv, the checkpoint, model.pt and result.json into its folder
(`hydra.run.dir`). Two runs sharing a folder would interleave their rows, and a run started in a finished
run's folder would replace its model and checkpoint. So before anything is written (and before Ray starts):

* the folder is locked (`fcntl.flock` on `.raypfl.lock` in it, held for the run's life and released when
  the run ends or its process dies, also by SIGKILL); a second run gets
  `run folder X is in use by another raypfl run (pid N)`;
* a folder that already holds a run's results is refused unless the run resumes from that folder
  (`resume=X` with X the run folder) or `overwrite=true` is given.

Only raypfl's own outputs count: Hydra writes `.hydra/` and `<job>.log` into the folder before the job
starts, and a run that stopped before its first round (bad input, Ctrl-C while loading) left nothing to
lose, so its folder may be used again.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path

from raypfl.errors import RaypflError

LOCK_FILE = ".raypfl.lock"
#: A folder holding any of these holds a run's results (and the checkpoint, under its old name too).
RESULT_FILES = ("model.pt", "summary.json")
#: Tables written with a header when a run starts: results once they hold a row.
TABLES = ("metrics.csv", "clients.csv")
RESULT_JSON = "result.json"


class RunFolderError(RaypflError):
    """The run folder is in use by a live run, or holds a run's results (exit code 2)."""


@dataclass
class RunLock:
    """An exclusive lock on a run folder; `release()` (or the process's exit) frees it."""

    folder: Path
    fd: int | None

    def record_pid(self) -> None:
        """Write this process's id into the lock file (for the message a second run gets)."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is None:
            return
        _HELD.pop(self.folder, None)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


_HELD: dict[Path, RunLock] = {}  # folders this process has locked (flock is per open file, not per process)


def lock(folder: str | Path) -> RunLock:
    """Lock `folder` for this process (creating it), or RunFolderError naming the process that holds it."""
    held = _acquire(folder)
    held.record_pid()
    return held


def _acquire(folder: str | Path) -> RunLock:
    folder = Path(folder).expanduser().resolve()
    held = _HELD.get(folder)
    if held is not None:
        return held
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise RunFolderError(f"run folder {folder}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        owner = _read_pid(fd)
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunFolderError(f"run folder {folder}: cannot lock {LOCK_FILE} ({exc.strerror})") from None
        raise RunFolderError(
            f"run folder {folder} is in use by another raypfl run (pid {owner or 'unknown'})"
        ) from None
    held = _HELD[folder] = RunLock(folder, fd)
    return held


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
    except (OSError, ValueError):
        return None


def results_in(folder: str | Path) -> list[str]:
    """The files of `folder` that hold a run's results (empty for a new folder or one Hydra just made)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [name for name in (*RESULT_FILES, *_checkpoint_names()) if (folder / name).exists()]
    found += [name for name in TABLES if _has_rows(folder / name)]
    if _finished(folder / RESULT_JSON):
        found.append(RESULT_JSON)
    return found


def _checkpoint_names() -> tuple[str, ...]:
    from raypfl.jobs import checkpoint  # imports torch: not before a command line is checked

    return (checkpoint.FILENAME, getattr(checkpoint, "OLD_FILENAME", "checkpoint.pkl"))


def _has_rows(path: Path) -> bool:
    """True if the CSV file has a row after its header."""
    try:
        with path.open(newline="") as f:
            reader = csv.reader(f)
            return next(reader, None) is not None and next(reader, None) is not None
    except (OSError, csv.Error, UnicodeDecodeError):
        return path.exists()  # unreadable: treat it as results (never overwrite what we cannot read)


def _finished(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("status") == "ok"
    except (OSError, ValueError, AttributeError):
        return False


def resumes_from(resume: str | Path | None, folder: Path) -> bool:
    """True if `resume` (a run folder or its checkpoint file) names `folder`."""
    if not resume:
        return False
    path = Path(str(resume)).expanduser().resolve()
    return (path if path.is_dir() or not path.suffix else path.parent) == Path(folder).expanduser().resolve()


def as_bool(value: object, key: str = "overwrite") -> bool:
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    text = str(value).strip().lower()
    if text in ("true", "false"):
        return text == "true"
    raise RunFolderError(f"{key}={value} must be true or false")


def claim(folder: str | Path, overwrite: object = False, resume: str | Path | None = None) -> RunLock:
    """Lock `folder` for this run and check it may be written: RunFolderError (exit code 2) if not.

    A folder holding a run's results is refused unless `resume` names it (the run continues there) or
    `overwrite` is true. The lock is checked first: a live run's folder is refused whatever it holds.
    """
    overwrite = as_bool(overwrite)
    held = _acquire(folder)  # the pid is recorded once the folder is ours: a refused run changes nothing
    try:
        found = results_in(held.folder)
        if found and not overwrite and not resumes_from(resume, held.folder):
            hint = f"resume={held.folder} to continue that run, " if checkpoint_in(held.folder) else ""
            raise RunFolderError(
                f"run folder {held.folder} already holds a run's results ({', '.join(found)}); use another "
                f"hydra.run.dir, {hint}or overwrite=true to replace them"
            )
    except BaseException:
        held.release()
        raise
    held.record_pid()
    return held


def checkpoint_in(folder: Path) -> bool:
    return (Path(folder) / _checkpoint_names()[0]).exists()


def release_all() -> None:
    """Release every run folder this process holds (the end of a job)."""
    for held in list(_HELD.values()):
        held.release()


def pinned_run_dir(args: list[str]) -> Path | None:
    """The run folder named on the command line (`hydra.run.dir=X`), or None (not given, a sweep, or an
    interpolation such as `${now:...}` that only Hydra can resolve)."""
    if any(a in ("-m", "--multirun") for a in args):
        return None
    value = None
    for arg in args:
        key, sep, rest = arg.partition("=")
        if sep and key.lstrip("+") == "hydra.run.dir":
            value = rest
    if not value or "${" in value:
        return None
    return Path(value.strip("'\"")).expanduser().resolve()


def override_value(args: list[str], key: str) -> str | None:
    """The last value given to `key` on the command line (`key=v`, `+key=v`, `++key=v`), else None."""
    value = None
    for arg in args:
        name, sep, rest = arg.partition("=")
        if sep and name.lstrip("+") == key:
            value = rest.strip("'\"")
    return value


def pinned_sweep_dir(args: list[str]) -> Path | None:
    """The sweep folder of a multirun named on the command line (`-m ... hydra.sweep.dir=X`), or None."""
    if not any(a in ("-m", "--multirun") for a in args):
        return None
    value = override_value(args, "hydra.sweep.dir")
    if not value or "${" in value:
        return None
    return Path(value).expanduser().resolve()


def check_sweep_dir(args: list[str]) -> None:
    """RunFolderError if a sweep pinned to a folder would run its jobs in job folders holding results."""
    folder = pinned_sweep_dir(args)
    if folder is None or not folder.is_dir() or as_bool(override_value(args, "overwrite") or False):
        return
    used = sorted(
        str(p.parent.relative_to(folder))
        for p in folder.rglob(".hydra")
        if p.is_dir() and p.parent != folder and results_in(p.parent)
    )
    if used:
        raise RunFolderError(
            f"sweep folder {folder} already holds runs' results (jobs {', '.join(used)}); use another "
            "hydra.sweep.dir, or overwrite=true to replace them"
        )


def precheck(args: list[str]) -> RunLock | None:
    """Before Hydra writes `.hydra/` into it: lock and check the run folder pinned on the command line, so a
    refused run leaves a live or finished run's folder untouched. None when no folder is pinned. A sweep
    pinned to a folder (`hydra.sweep.dir`) is refused if its job folders hold results (each job also checks
    and locks its own folder)."""
    check_sweep_dir(args)
    folder = pinned_run_dir(args)
    if folder is None:
        return None
    resume = override_value(args, "resume")
    overwrite = override_value(args, "overwrite") or False
    return claim(folder, overwrite, None if resume in (None, "null") else resume)
