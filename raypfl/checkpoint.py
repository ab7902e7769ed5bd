"""Checkpoints: everything needed to continue a run from its last complete round, written atomically.

The file is written to a temporary name beside the target, flushed and fsynced, then renamed over the
old checkpoint (`os.replace` is atomic on POSIX), so a crash mid-write leaves the last good one intact.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

from raypfl.errors import ConfigError

FILENAME = "checkpoint.pkl"
FORMAT = 1
#: Config keys a resumed run must share with the checkpointed one (the rest, e.g. train.rounds, may change).
FINGERPRINT_KEYS = (
    "seed",
    "dataset.name",
    "dataset.alpha",  # synthetic: the generated federation
    "dataset.beta",
    "dataset.iid",
    "dataset.num_features",
    "dataset.num_classes",
    "dataset.size_log_mean",
    "dataset.size_log_sigma",
    "dataset.min_size",
    "dataset.max_size",
    "dataset.test_clients",
    "dataset.test_samples",
    "dataset.train_limit",
    "dataset.test_limit",
    "model.name",
    "partition",
    "algorithm",
    "clients.num",
    "clients.per_round",
    "clients.selection",
    "optim",
    "train.local_epochs",
    "train.local_steps",
    "train.batch_size",
)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write `state` to `path` atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        pickle.dump({"format": FORMAT, **state}, f, protocol=pickle.HIGHEST_PROTOCOL)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def checkpoint_path(location: str | Path) -> Path:
    """A run folder or a checkpoint file -> the checkpoint file."""
    path = Path(location).expanduser()
    return path / FILENAME if path.is_dir() else path


def load_checkpoint(location: str | Path) -> dict[str, Any]:
    """Read a checkpoint; a clear ConfigError if it is missing or unreadable."""
    path = checkpoint_path(location)
    if not path.is_file():
        raise ConfigError(f"resume={location}: no checkpoint at {path} (a run folder holds {FILENAME})")
    try:
        with path.open("rb") as f:
            state = pickle.load(f)
    except Exception as exc:
        raise ConfigError(f"resume={location}: {path} is not a readable checkpoint ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError(f"resume={location}: {path} is not a raypfl checkpoint (format {FORMAT})")
    return state


def fingerprint(config: dict[str, Any]) -> dict[str, Any]:
    """The settings that must not change between a run and its resumption."""
    out = {}
    for key in FINGERPRINT_KEYS:
        node: Any = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out[key] = node
    return out


def check_compatible(saved: dict[str, Any], current: dict[str, Any], location: str | Path) -> None:
    """Refuse to resume under settings that would make a different run."""
    for key, value in saved.items():
        if current.get(key) != value:
            raise ConfigError(
                f"resume={location}: the checkpoint was made with {key}={value}, this run has "
                f"{key}={current.get(key)}; use the same settings (train.rounds may change)"
            )
