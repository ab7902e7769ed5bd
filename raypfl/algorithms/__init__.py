"""Algorithms, each owning its client and server halves. `build_algorithm` makes one from the config."""

from __future__ import annotations

from omegaconf import DictConfig

from raypfl.algorithms.base import Algorithm, ClientContext
from raypfl.algorithms.fedavg import FedAvg
from raypfl.config import optim_spec, train_spec
from raypfl.errors import ConfigError

ALGORITHMS = {"fedavg": FedAvg}

__all__ = ["ALGORITHMS", "Algorithm", "ClientContext", "FedAvg", "build_algorithm"]


def build_algorithm(cfg: DictConfig) -> Algorithm:
    """The algorithm named by `algorithm.name`, built from `algorithm.*`, `optim.*` and `train.*`."""
    params = {k: v for k, v in cfg.algorithm.items() if k != "name"}
    try:
        cls = ALGORITHMS[cfg.algorithm.name]
    except KeyError:
        raise ConfigError(
            f"unknown algorithm={cfg.algorithm.name} (choose from: {', '.join(ALGORITHMS)})"
        ) from None
    return cls(optim_spec(cfg), train_spec(cfg), **params)
