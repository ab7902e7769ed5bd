"""W&B tracking (`logger=wandb`): driver-only, offline without a login, never a key in a config file."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path

from raypfl.tracking.tracker import CLIENT_COLUMNS

log = logging.getLogger("raypfl")


def resolve_mode(requested: str | None) -> str:
    """`logger.mode`, else WANDB_MODE, else online if logged in, else offline."""
    mode = requested or os.environ.get("WANDB_MODE")
    if mode:
        return mode
    return "online" if _logged_in() else "offline"


def _logged_in() -> bool:
    """A key in WANDB_API_KEY or in ~/.netrc (where `wandb login` puts it); no network needed."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbSink:
    """Per-round metrics, a per-client table and the final model artifact, in one W&B run."""

    def __init__(
        self,
        config: dict,
        out_dir: Path,
        project: str,
        entity: str | None,
        group: str | None,
        name: str | None,
        mode: str | None,
        tags: list[str] | None = None,
    ):
        import wandb

        self.mode = resolve_mode(mode)
        self.run = wandb.init(
            project=project,
            entity=entity,
            group=group,
            name=name,
            config=config,
            dir=str(out_dir),
            mode=self.mode,
            tags=tags or None,
            reinit="finish_previous",
        )
        self.table_rows: list[list] = []
        log.info("wandb: %s run %s (group %s)", self.mode, self.run.id, group)

    def log_round(self, row: dict, client_rows: list[dict]) -> None:
        # FedAvg rows have METRIC_COLUMNS; the other paradigms' rows add their own numeric columns
        metrics = {k: v for k, v in row.items() if k != "round" and isinstance(v, (int, float))}
        self.run.log(metrics, step=int(row["round"]))
        # missing values (late clients have no loss, unbalanced runs no work): None, not "", for W&B types
        self.table_rows.extend(
            [[None if c.get(k, "") == "" else c[k] for k in CLIENT_COLUMNS] for c in client_rows]
        )

    def finish(self, out_dir: Path, model_path: Path | None) -> None:
        import wandb

        self.run.log({"client_metrics": wandb.Table(columns=CLIENT_COLUMNS, data=self.table_rows)})
        if model_path is not None and model_path.exists():
            artifact = wandb.Artifact(f"model-{self.run.id}", type="model")
            artifact.add_file(str(model_path))
            self.run.log_artifact(artifact)
        run_dir = self.run.dir
        self.run.finish()
        if self.mode == "offline":
            log.info("wandb: offline run saved; upload it with `wandb sync %s`", Path(run_dir).parent)
