"""`python -m raypfl +experiment=fedavg`: compose the config, check it, run it, report."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from raypfl.cli import EXIT_BAD_INPUT, EXIT_STOPPED, check_group_overrides
from raypfl.config import validate
from raypfl.errors import RaypflError, RunStopped
from raypfl.report import write_result

log = logging.getLogger("raypfl")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """One job: validate (before Ray starts), run, return the final test accuracy (for sweepers).

    A single run exits with code 2 on bad input. In a sweep (-m) a failed job is recorded in its
    result.json and logged, and the sweep goes on; the sweep report lists it.
    """
    from raypfl.experiment import run_experiment

    started = time.time()
    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    sweeping = hydra_cfg.mode == RunMode.MULTIRUN
    group = Path(hydra_cfg.sweep.dir).name if sweeping else None
    name = f"job{hydra_cfg.job.num}" if sweeping else None
    try:
        validate(cfg)
        # in a sweep a job may run in a reused process: its clock starts with the job
        result = run_experiment(cfg, out_dir, group=group, name=name, started=started if sweeping else None)
    except Exception as exc:
        bad_input = isinstance(exc, RaypflError)
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
    """Entry point: reject unknown config-group choices in one line, then hand over to Hydra."""
    message = check_group_overrides(sys.argv[1:])
    if message:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    sys.argv.extend(mpi_rank_overrides(sys.argv[1:]))
    main()


if __name__ == "__main__":
    cli()
