"""Shared fixtures: the data root, a config composer and ONE Ray for the whole session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"
DEFAULT_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("RAYPFL_DATA", str(DEFAULT_DATA))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(1)

#: Small enough for seconds per run, large enough that accuracy means something.
TINY = [
    "dataset.train_limit=3000",
    "dataset.test_limit=1000",
    "model=mlp",
    "clients.num=8",
    "clients.per_round=4",
    "train.rounds=3",
    "train.batch_size=20",
]


def make_config(*overrides: str):
    """Compose conf/config.yaml with overrides, as `python -m raypfl` would."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = Path(os.environ["RAYPFL_DATA"])
    assert (root / "MNIST" / "raw").is_dir(), f"MNIST raw files not found under {root}; set RAYPFL_DATA"
    return root


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray (2 CPUs, small object store) shared by every test that needs it."""
    import ray

    ray.init(address="local", num_cpus=2, object_store_memory=256 * 1024 * 1024, include_dashboard=False)
    try:
        yield ray
    finally:
        ray.shutdown()
