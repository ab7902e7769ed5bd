"""`python -m raypfl +experiment=fedavg`: compose the config, check it, run it, report.

Exit codes: 0 done; 1 crashed (a traceback); 2 bad input (one line: a config value, missing data, a run
folder in use or holding another run's results); 3 stopped on a fault, with a checkpoint and a resume hint;
130 / 143 interrupted by SIGINT (Ctrl-C) / SIGTERM: `result.json` says `interrupted`, one line says how to
resume.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from raypfl.cli import EXIT_BAD_INPUT, EXIT_STOPPED, check_group_overrides, check_key_overrides
from raypfl.errors import RaypflError, RunStopped
from raypfl.jobs import interrupts, run_folder
from raypfl.jobs.run_folder import RunFolderError
from raypfl.tracking.report import write_result
from raypfl.validation import validate

log = logging.getLogger("raypfl")

#: The command line as typed (before the MPI overrides are appended), for the resume hint.
_ARGS: list[str] = []


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """One job: claim its run folder, validate (before Ray starts), run, return the final test accuracy.

    A single run exits with code 2 on bad input. In a sweep (-m) a failed job is recorded in its
    result.json and logged, and the sweep goes on; the sweep report lists it. Ctrl-C or SIGTERM ends the
    run (and a sweep) with code 130 / 143 and `result.json` status `interrupted`.
    """
    started = time.time()
    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    sweeping = hydra_cfg.mode == RunMode.MULTIRUN
    writer = mpi_rank() == 0  # MPI ranks > 0 share rank 0's folder and write nothing
    try:
        if writer:  # a refused folder is someone else's: nothing is written into it
            run_folder.claim(out_dir, cfg.get("overwrite", False), cfg.get("resume"))
    except RunFolderError as exc:
        if not sweeping:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(EXIT_BAD_INPUT)
        log.error("job %s refused: %s", hydra_cfg.job.num, exc)
        return float("nan")
    try:
        return _run_job(cfg, out_dir, started, hydra_cfg, sweeping, writer)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM (raypfl.jobs.interrupts), wherever the run was
        _interrupted(exc, cfg, out_dir, started, hydra_cfg, sweeping, writer)
    finally:
        run_folder.release_all()


def _run_job(
    cfg: DictConfig, out_dir: Path, started: float, hydra_cfg, sweeping: bool, writer: bool
) -> float:
    from raypfl.dispatch import run_job

    group = Path(hydra_cfg.sweep.dir).name if sweeping else None
    name = f"job{hydra_cfg.job.num}" if sweeping else None
    try:
        validate(cfg)
        if interrupts.installed():
            interrupts.install()  # again: a sweep's shared Ray (raypfl.callbacks) may have taken SIGTERM
            if _uses_ray(cfg):
                interrupts.guard_ray()  # SIGTERM stays ours through ray.init
                if not cfg.runtime.get("address"):
                    interrupts.start_watchdog()  # no Ray process outlives this one, even after a SIGKILL
        # in a sweep a job may run in a reused process: its clock starts with the job
        result = run_job(cfg, out_dir, group=group, name=name, started=started if sweeping else None)
        if result is not None:
            result.check_trained()  # no update ever averaged, or NaN weights: not a success (exit 3)
    except Exception as exc:
        interrupted = interrupts.interrupt_in(exc)
        if interrupted is not None:  # an error raised while a Ctrl-C/SIGTERM unwound: it is an interrupt
            raise interrupted from None
        bad_input = isinstance(exc, RaypflError)
        if writer:
            write_result(
                out_dir, started, "failed", f"{type(exc).__name__}: {exc}" if not bad_input else str(exc)
            )
        if not sweeping and bad_input:
            print(f"error: {exc}", file=sys.stderr)
            log.error("error: %s", exc)
            sys.exit(EXIT_STOPPED if isinstance(exc, RunStopped) else EXIT_BAD_INPUT)
        if not sweeping:
            raise
        log.error("job %s failed: %s", hydra_cfg.job.num, exc, exc_info=not bad_input)
        return float("nan")
    if result is None:  # an MPI rank that served rank 0; rank 0 reports
        return float("nan")
    write_result(out_dir, started, "ok", final_acc=result.final_accuracy)
    return result.final_accuracy


def _uses_ray(cfg: DictConfig) -> bool:
    """True if the job starts or joins Ray (runtime=ray, or a paradigm other than federated)."""
    return cfg.runtime.get("name") == "ray" or str(cfg.get("paradigm") or "federated") != "federated"


def _interrupted(
    exc: BaseException,
    cfg: DictConfig,
    out_dir: Path,
    started: float,
    hydra_cfg,
    sweeping: bool,
    writer: bool,
) -> NoReturn:
    """Record and report an interrupted job in one line, shut down what is left of Ray, exit 128 + signal."""
    interrupts.quiet()  # a second Ctrl-C must not cut the report short
    signum = interrupts.signum_of(exc)
    name = signal.Signals(signum).name
    if writer:
        args = list(hydra_cfg.overrides.task) if sweeping else _ARGS
        message, extra = interrupt_message(name, out_dir, cfg, args, started)
        write_result(out_dir, started, "interrupted", f"interrupted by {name}", signal=name, **extra)
        print(message, file=sys.stderr, flush=True)
        _log_to_file(message)
    if not interrupts.installed():  # not our process (e.g. a Ray task of the Ray launcher): its caller's
        raise exc
    interrupts.shutdown_ray()  # a Ray started but not yet handed to the runtime (which closes its own)
    sys.exit(interrupts.EXIT_OFFSET + signum)


def interrupt_message(
    signame: str, out_dir: Path, cfg: DictConfig, args: list[str], started: float = 0.0
) -> tuple[str, dict]:
    """The one line an interrupted run ends with (where it stopped, how to resume) and result.json extras."""
    from raypfl.jobs.checkpoint import checkpoint_path, load_checkpoint

    try:  # this job's checkpoint (not one left by a run it overwrote or resumed in this folder)
        fresh = checkpoint_path(out_dir).stat().st_mtime >= started
        saved = int(load_checkpoint(out_dir)["round"]) if fresh else 0
    except Exception:  # none (interrupted before the first checkpoint), or unreadable
        saved = 0
    rounds = int(cfg.train.rounds) if cfg.get("train") is not None else 0
    model = out_dir / "model.pt"
    kept = [a for a in args if a.split("=", 1)[0].lstrip("+") != "resume"]
    command = "python -m raypfl " + shlex.join(kept)
    head = f"interrupted by {signame}"
    if model.exists() and model.stat().st_mtime >= started:  # this job wrote it: the last round was done
        return f"{head} after the last round; the final model is in {model}", {"round": rounds}
    if saved:
        return (
            f"{head}: checkpoint after round {saved}/{rounds} in {out_dir}; "
            f"resume with: {command} {shlex.quote(f'resume={out_dir}')}",
            {"round": saved},
        )
    if cfg.get("resume"):
        return (
            f"{head} before a round finished since resuming; resume again with: "
            f"{command} {shlex.quote(f'resume={cfg.resume}')}",
            {"round": 0},
        )
    if run_folder.results_in(out_dir) and run_folder.pinned_run_dir(kept) is not None:
        kept = [a for a in kept if a.split("=", 1)[0].lstrip("+") != "overwrite"] + ["overwrite=true"]
        command = "python -m raypfl " + shlex.join(kept)
    return f"{head} before the first checkpoint; nothing to resume, run again with: {command}", {"round": 0}


def _log_to_file(message: str) -> None:
    """Put `message` in the run's log file only (the console has it already, once)."""
    record = log.makeRecord(log.name, logging.WARNING, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def mpi_rank() -> int:
    """This process's MPI rank (0 when not launched by mpiexec)."""
    from raypfl.runtime.mpi_runtime import LAUNCHER_VARIABLES

    for name in LAUNCHER_VARIABLES:
        if name.endswith("RANK") and os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def mpi_rank_overrides(args: list[str]) -> list[str]:
    """Under mpiexec every rank runs this program: all use rank 0's output folder; only rank 0 writes."""
    from raypfl.runtime.mpi_runtime import launched_by_mpiexec

    if not launched_by_mpiexec():
        return []
    from datetime import datetime

    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    given = any(a.startswith("hydra.run.dir=") for a in args)
    run_dir = None if given or comm.rank else f"outputs/{datetime.now():%Y-%m-%d/%H-%M-%S}"
    run_dir = comm.bcast(run_dir, root=0)
    extra = [f"hydra.run.dir={run_dir}"] if run_dir else []
    if comm.rank > 0:
        extra += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    return extra


def cli() -> None:
    """Entry point: reject unknown config-group choices and keys in one line, then hand over to Hydra.

    A run folder pinned on the command line (`hydra.run.dir=X`) is locked and checked here, before Hydra
    writes `.hydra/` into it, so a refused run leaves a live or finished run's folder as it was.
    """
    interrupts.install()
    try:
        _ARGS[:] = sys.argv[1:]
        message = check_group_overrides(sys.argv[1:]) or check_key_overrides(sys.argv[1:])
        if message:
            print(f"error: {message}", file=sys.stderr)
            sys.exit(EXIT_BAD_INPUT)
        sys.argv.extend(mpi_rank_overrides(sys.argv[1:]))
        if mpi_rank() == 0:
            try:
                run_folder.precheck(sys.argv[1:])
            except RunFolderError as exc:
                print(f"error: {exc}", file=sys.stderr)
                sys.exit(EXIT_BAD_INPUT)
        main()
    except KeyboardInterrupt as exc:  # before the job started, or after it ended
        interrupts.quiet()
        print(f"interrupted by {signal.Signals(interrupts.signum_of(exc)).name}", file=sys.stderr)
        interrupts.shutdown_ray()
        sys.exit(interrupts.EXIT_OFFSET + interrupts.signum_of(exc))


if __name__ == "__main__":
    cli()
