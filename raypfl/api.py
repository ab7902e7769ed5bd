"""The Python API, for notebooks and scripts: the same config, checks and outputs as the command line.

    from raypfl.api import run
    result = run(["+experiment=fedavg", "algorithm=fedadam", "train.rounds=5"], out_dir="runs/fedadam")
    result.final_accuracy, result.rounds[-1], result.server.state["m"]

`run` composes conf/config.yaml with the overrides (as `python -m raypfl OVERRIDES` would), checks them
(an unknown key or value raises `ConfigError`, before any runtime starts), claims the run folder, runs the
experiment and returns its `RunResult`. `run_config` takes a composed config instead (`compose`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig

from raypfl.cli import CONF_DIR, check_group_overrides, check_key_overrides
from raypfl.dispatch import run_job
from raypfl.driver.result import RunResult
from raypfl.errors import ConfigError
from raypfl.jobs import run_folder
from raypfl.tracking.report import write_result
from raypfl.validation import validate


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """conf/config.yaml with `overrides` (e.g. `["+experiment=fedavg", "algorithm=fedprox"]`), checked."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    args = list(overrides)
    message = check_group_overrides(args) or check_key_overrides(args)
    if message:
        raise ConfigError(message)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=args)
    validate(cfg)
    return cfg


def run(overrides: Sequence[str] = (), out_dir: str | Path | None = None) -> RunResult:
    """Run one experiment; outputs go to `out_dir` (default: outputs/api/DATE/TIME)."""
    return run_config(compose(overrides), out_dir)


def run_config(cfg: DictConfig, out_dir: str | Path | None = None) -> RunResult:
    """Run a composed config (see `compose`) in `out_dir`; returns the RunResult (raises on bad input,
    RunStopped if the run stopped on a fault or never updated its model)."""
    validate(cfg)
    if cfg.runtime.name == "mpi":
        raise ConfigError("runtime=mpi: start MPI runs with mpiexec from the command line (see README, MPI)")
    folder = (
        Path(out_dir) if out_dir is not None else Path("outputs/api") / f"{datetime.now():%Y-%m-%d/%H-%M-%S}"
    )
    started = time.time()
    lock = run_folder.claim(folder, cfg.get("overwrite", False), cfg.get("resume"))
    try:
        result = run_job(cfg, folder, started=started)
        result.check_trained()
        write_result(folder, started, "ok", final_acc=result.final_accuracy)
        return result
    except Exception as exc:
        if folder.is_dir():  # a run that failed before it made its folder leaves nothing behind
            write_result(folder, started, "failed", f"{type(exc).__name__}: {exc}")
        raise
    finally:
        lock.release()
