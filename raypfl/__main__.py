"""`python -m raypfl +experiment=fedavg`: compose the config, check it, run it, report."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from raypfl.cli import EXIT_BAD_INPUT, check_group_overrides
from raypfl.config import validate
from raypfl.errors import RaypflError

log = logging.getLogger("raypfl")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """One job: validate (before Ray starts), run, return the final test accuracy (for sweepers)."""
    from raypfl.experiment import run_experiment

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        validate(cfg)
        result = run_experiment(cfg, out_dir)
    except RaypflError as exc:
        print(f"error: {exc}", file=sys.stderr)
        log.error("error: %s", exc)
        sys.exit(EXIT_BAD_INPUT)
    return result.final_accuracy


def cli() -> None:
    """Entry point: reject unknown config-group choices in one line, then hand over to Hydra."""
    message = check_group_overrides(sys.argv[1:])
    if message:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    main()


if __name__ == "__main__":
    cli()
