"""Hydra callbacks for sweeps: one shared local Ray for sequential sweeps, and the sweep report."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from raypfl.tracking.report import DEFAULT_TARGET, report

log = logging.getLogger("raypfl")


class SharedRay(Callback):
    """With the basic launcher, jobs run one after another in this process: start Ray once for all of them.

    (The Ray launcher starts its own Ray for the sweep; single runs start and stop their own.)
    """

    def __init__(self) -> None:
        self.started = False

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if config.runtime.get("name") != "ray" or "raypfl_launcher" in str(
            config.hydra.launcher.get("_target_")
        ):
            return
        from raypfl.config import runtime_spec
        from raypfl.runtime.ray_start import start_ray

        self.started = start_ray(runtime_spec(config))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if self.started:
            import ray

            ray.shutdown()
            self.started = False


class SweepReport(Callback):
    """When a sweep ends, write its summary and exit non-zero if any job failed."""

    def __init__(self, target: float = DEFAULT_TARGET):
        self.target = target

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            rows = report(sweep_dir, self.target)
        except FileNotFoundError as exc:
            log.error("no sweep report: %s", exc)
            return
        failed = [r["job"] for r in rows if r["status"] != "ok"]
        if failed:
            log.error(
                "%d of %d jobs failed (%s); the others' results are in %s",
                len(failed),
                len(rows),
                ", ".join(failed),
                sweep_dir / "summary.csv",
            )
            sys.exit(1)
