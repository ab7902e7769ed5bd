"""Algorithms, each owning its client and server halves in one file. `build_algorithm` makes one from the
config: a shipped short name (`algorithm=fedadam`) or a class of the user's own (`algorithm._target_`)."""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from raypfl.algorithms.base import Algorithm, ClientContext, ServerSnapshot, Setting, missing_halves
from raypfl.algorithms.ditto import Ditto
from raypfl.algorithms.fedavg import FedAvg
from raypfl.algorithms.fedavgm import FedAvgM
from raypfl.algorithms.fednova import FedNova
from raypfl.algorithms.fedopt import FedAdagrad, FedAdam, FedYogi
from raypfl.algorithms.fedper import FedPer
from raypfl.algorithms.fedprox import FedProx
from raypfl.algorithms.qffl import QFFL
from raypfl.algorithms.scaffold import Scaffold
from raypfl.config import RunSpec, check_value, run_spec
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
    )
}
#: Keys of `algorithm.*` that are not knobs: the short name (a label for a `_target_`) and the target.
RESERVED = ("name", "_target_")

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
    target = node.get("_target_")
    if target:
        from hydra.utils import get_class

        try:
            cls = get_class(str(target))
        except Exception as exc:  # hydra wraps import errors; its message says what failed
            reason = " ".join(str(exc).split())[:300] or type(exc).__name__
            raise ConfigError(f"algorithm._target_={target}: cannot import it ({reason})") from None
        where = f"algorithm._target_={target}"
    else:
        name = node.get("name")
        if name not in ALGORITHMS:
            raise ConfigError(f"unknown algorithm={name} (choose from: {', '.join(ALGORITHMS)})")
        cls, where = ALGORITHMS[name], f"algorithm={name}"
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
        raise ConfigError(f"{where} is not a raypfl.algorithms.Algorithm subclass")
    missing = missing_halves(cls)
    if missing:
        raise ConfigError(
            f"{where} does not implement {' and '.join(missing)} (an algorithm owns both halves)"
        )
    return cls


def knobs(cls: type[Algorithm]) -> list[str]:
    """The config keys an algorithm class takes (its init fields)."""
    if is_dataclass(cls):
        return [f.name for f in fields(cls) if f.init]
    return []


def algorithm_knobs(cls: type[Algorithm], node: Any) -> dict[str, Any]:
    """`algorithm.*` minus name/_target_, each checked against the class's field type and knob range."""
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    data = {k: v for k, v in data.items() if k not in RESERVED}
    allowed = knobs(cls)
    label = node.get("_target_") or node.get("name")
    for key in data:
        if key not in allowed:
            hint = ""
            if node.get("_target_") and node.get("name") in ALGORITHMS:  # a target on a shipped node
                hint = f"; algorithm.{key} is {node.get('name')}'s: start from algorithm=custom"
            raise ConfigError(
                f"unknown key algorithm.{key} for algorithm={label} "
                f"(its knobs: {', '.join(allowed) or 'none'}{hint})"
            )
    for key in allowed:
        if key in data:
            check_value(cls, key, data[key], f"algorithm.{key}")
    return data


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
