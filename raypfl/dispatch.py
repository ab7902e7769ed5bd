"""One job, whatever its paradigm: federated rounds (the driver) or parameter-server SGD, all-reduce or
gossip (raypfl.paradigms). The command line, the Python API and `raypfl.compare` all start jobs here."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from raypfl.driver.experiment import run_experiment
from raypfl.driver.result import RunResult
from raypfl.paradigms.spec import FEDERATED, paradigm_of
from raypfl.tracking.sinks import build_sinks


def run_job(
    cfg: DictConfig,
    out_dir: Path,
    group: str | None = None,
    name: str | None = None,
    started: float | None = None,
) -> RunResult | None:
    """Run the config's paradigm in `out_dir` (see `run_experiment` for the arguments); None on MPI ranks
    other than 0."""
    if paradigm_of(cfg) == FEDERATED:
        return run_experiment(cfg, out_dir, group, name, started)
    from raypfl.paradigms.run import run_paradigm

    return run_paradigm(cfg, Path(out_dir), build_sinks(cfg, Path(out_dir), group, name), started)
