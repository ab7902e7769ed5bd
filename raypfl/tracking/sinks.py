"""Where metrics go besides the always-on CSV files (`logger.*`)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def build_sinks(cfg: DictConfig, out_dir: Path, group: str | None, name: str | None) -> list:
    """Trackers besides the always-on CSV files, from `logger.*`."""
    logger = cfg.get("logger") or {"name": "none"}
    if logger["name"] == "none":
        return []
    if logger["name"] == "wandb":
        from raypfl.tracking.wandb_sink import WandbSink

        config = OmegaConf.to_container(cfg, resolve=True)
        return [
            WandbSink(
                config,
                out_dir,
                logger["project"],
                logger.get("entity"),
                group,
                name,
                logger.get("mode"),
                list(logger.get("tags") or []),
            )
        ]
    raise ValueError(f"logger={logger['name']} is not supported")
