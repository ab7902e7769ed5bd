"""Algorithms, each owning its client and server halves in one file. `build_algorithm` makes one from the
config: a shipped short name (`algorithm=fedadam`) or a class of the user's own (`algorithm._target_`)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from raypfl.algorithms.base import Algorithm, ClientContext, ServerSnapshot, Setting, missing_halves
from raypfl.algorithms.ditto import Ditto
from raypfl.algorithms.fedavg import FedAvg
from raypfl.algorithms.fedavgm import FedAvgM
from raypfl.algorithms.fedbuff import FedBuff
from raypfl.algorithms.fednova import FedNova
from raypfl.algorithms.fedopt import FedAdagrad, FedAdam, FedYogi
from raypfl.algorithms.fedper import FedPer
from raypfl.algorithms.fedprox import FedProx
from raypfl.algorithms.qffl import QFFL
from raypfl.algorithms.scaffold import Scaffold
from raypfl.config import RunSpec, run_spec
from raypfl.config.classes import checked_knobs, named_class
from raypfl.errors import ConfigError

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls
    for cls in (
        FedAvg,
        FedAvgM,
        FedAdam,
        FedYogi,
        FedAdagrad,
        FedProx,
        Scaffold,
        FedNova,
        QFFL,
        Ditto,
        FedPer,
        FedBuff,
    )
}

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "ClientContext",
    "ServerSnapshot",
    "Setting",
    "algorithm_class",
    "build_algorithm",
]


def algorithm_class(node: Any) -> type[Algorithm]:
    """The class `algorithm.*` names (`_target_` wins over `name`); ConfigError naming the key if there is
    none, it cannot be imported, it is not an Algorithm, or it lacks a half."""
    cls, where = named_class(node, "algorithm", ALGORITHMS, Algorithm)
    missing = missing_halves(cls)
    if missing:
        raise ConfigError(
            f"{where} does not implement {' and '.join(missing)} (an algorithm owns both halves)"
        )
    return cls


def algorithm_knobs(cls: type[Algorithm], node: Any) -> dict[str, Any]:
    """`algorithm.*` minus name/_target_, each checked against the class's field type and knob range."""
    return checked_knobs(cls, node, "algorithm", ALGORITHMS, blank="custom")


def build_algorithm(cfg: DictConfig, spec: RunSpec | None = None) -> Algorithm:
    """The algorithm of `algorithm.*`, with its knobs checked, bound to the run's optimizer and work
    (from `spec`, the config's typed run spec, if given)."""
    spec = spec or run_spec(cfg)
    cls = algorithm_class(cfg.algorithm)
    try:
        algorithm = cls(**algorithm_knobs(cls, cfg.algorithm))
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"algorithm={cfg.algorithm.get('name')}: building it failed ({exc})") from None
    return algorithm.bind(Setting(spec.optim, spec.train, spec.clients.num, spec.clients.per_round))
