"""Classes named by a config group (`algorithm=fedavg`, `aggregator=krum`, or `GROUP._target_=pkg.Class`): the
class resolved from a registry or imported, and its knobs (the dataclass's fields) checked, each failure one
ConfigError line naming the key. Shared by the algorithm and aggregator registries."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from raypfl.config.knobs import check_value
from raypfl.errors import ConfigError

#: Keys of such a group that are not knobs: the short name (a label for a `_target_`) and the target.
RESERVED = ("name", "_target_")


def named_class(
    node: Mapping[str, Any], group: str, registry: Mapping[str, type], base: type
) -> tuple[type, str]:
    """(the class `GROUP.*` names, how to name it in a message); `_target_` wins over `name`. ConfigError if
    there is none, it cannot be imported, or it is not a subclass of `base`."""
    target = node.get("_target_")
    if target:
        from hydra.utils import get_class

        try:
            cls = get_class(str(target))
        except Exception as exc:  # hydra wraps import errors; its message says what failed
            reason = " ".join(str(exc).split())[:300] or type(exc).__name__
            raise ConfigError(f"{group}._target_={target}: cannot import it ({reason})") from None
        where = f"{group}._target_={target}"
    else:
        name = node.get("name")
        if name not in registry:
            raise ConfigError(f"unknown {group}={name} (choose from: {', '.join(registry)})")
        cls, where = registry[name], f"{group}={name}"
    if not (isinstance(cls, type) and issubclass(cls, base)):
        package = base.__module__.rsplit(".", 1)[0]  # raypfl.algorithms.base -> raypfl.algorithms
        raise ConfigError(f"{where} is not a {package}.{base.__name__} subclass")
    return cls, where


def knobs(cls: type) -> list[str]:
    """The config keys a class takes (its dataclass init fields)."""
    if is_dataclass(cls):
        return [f.name for f in fields(cls) if f.init]
    return []


def checked_knobs(
    cls: type, node: Mapping[str, Any], group: str, registry: Mapping[str, type], blank: str
) -> dict[str, Any]:
    """`GROUP.*` minus name/_target_, each checked against the class's field type and knob range. A knob of
    a shipped choice left under a `_target_` gets a hint to start from the `blank` choice."""
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    data = {str(k): v for k, v in data.items() if k not in RESERVED}
    allowed = knobs(cls)
    label = node.get("_target_") or node.get("name")
    for key in data:
        if key not in allowed:
            hint = ""
            if node.get("_target_") and node.get("name") in registry:  # a target on a shipped node
                hint = f"; {group}.{key} is {node.get('name')}'s: start from {group}={blank}"
            raise ConfigError(
                f"unknown key {group}.{key} for {group}={label} "
                f"(its knobs: {', '.join(allowed) or 'none'}{hint})"
            )
    for key in allowed:
        if key in data:
            check_value(cls, key, data[key], f"{group}.{key}")
    return data
