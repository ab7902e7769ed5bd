"""The dataset a config names: a function of the user's, a torchvision dataset on disk, or synthetic."""

from __future__ import annotations

from omegaconf import DictConfig

from raypfl.data.custom import load_custom_dataset
from raypfl.data.datasets import Dataset, load_dataset
from raypfl.data.synthetic import NAME as SYNTHETIC
from raypfl.data.synthetic import synthetic_dataset, synthetic_spec


def load_data(cfg: DictConfig) -> Dataset:
    """The dataset of `dataset.*`: a function of the user's (`dataset._target_`), loaded from disk, or
    (synthetic) its generated test set."""
    d = cfg.dataset
    if d.get("_target_") is not None:
        return load_custom_dataset(d)
    if d.name == SYNTHETIC:
        return synthetic_dataset(synthetic_spec(d), cfg.seed)
    return load_dataset(d.name, d.root, d.download, d.get("train_limit"), d.get("test_limit"))
