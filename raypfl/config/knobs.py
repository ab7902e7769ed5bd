"""Declared keys: a spec field's type (its annotation) and range or choices (`knob`), checked value by value.

`build_spec(cls, node, prefix)` builds a frozen spec from a config node; unknown keys, wrong types and
values out of range are ConfigErrors naming the key, e.g. `clients.per_round=120 > clients.num=100`.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from functools import cache
from numbers import Integral, Real
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from raypfl.errors import ConfigError

# --- declared keys: type (annotation) + range or choices (knob) ----------------------------------------


@dataclass(frozen=True)
class Range:
    """An interval of numbers; `None` ends are open-ended."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: `low` itself is outside
    high_open: bool = False

    def __contains__(self, value: Any) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{self.low:g}, {self.high:g}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return ""


def knob(
    default: Any,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    choices: tuple[str, ...] | None = None,
    null: str | None = None,
    expect: str | None = None,
    note: str | None = None,
) -> Any:
    """A spec field with its allowed values: a range (`gt`/`ge`, `lt`/`le`) or `choices`.

    For the error message: `expect` replaces the generic "an integer"/"a finite number"/..., `note` follows
    the range in parentheses, and `null` says what null means for an optional key.
    """
    low = gt if gt is not None else ge
    high = lt if lt is not None else le
    rng = Range(low, high, gt is not None, lt is not None) if low is not None or high is not None else None
    meta = {"range": rng, "choices": choices, "null": null, "expect": expect, "note": note}
    return field(default=default, metadata=meta)


def show(value: Any) -> str:
    """A config value as it is written on the command line: true, null, inf, [1, 2], abc."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    return str(value)


def _base_type(hint: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed) of an annotation like `int | None`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return (args[0] if len(args) == 1 else Any), len(args) < len(typing.get_args(hint))
    return hint, False


def _kind(base: Any) -> tuple[str, typing.Callable[[Any], bool]]:
    """(how the expected type reads in an error, a test of a value's type) for a base type."""
    origin = typing.get_origin(base) or base
    if base is bool:
        return "true or false", lambda v: isinstance(v, bool)
    if base is int:
        return "an integer", lambda v: isinstance(v, Integral) and not isinstance(v, bool)
    if base is float:
        return (
            "a finite number",
            lambda v: (
                isinstance(v, Real)
                and not isinstance(v, bool)
                and (isinstance(v, Integral) or math.isfinite(v))
            ),
        )
    if base is str:
        return "a string", lambda v: isinstance(v, str)
    if origin is dict:
        return "a mapping {key: value}", lambda v: isinstance(v, Mapping)
    if origin is list:
        item = (typing.get_args(base) or (Any,))[0]
        ok = _kind(item)[1] if item is not Any else (lambda v: True)
        return "a list", lambda v: isinstance(v, (list, tuple)) and all(ok(x) for x in v)
    return "a value", lambda v: True


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_value(cls: type, name: str, value: Any, key: str) -> None:
    """Raise ConfigError unless `value` fits the type and the knob of field `name` of spec `cls`."""
    spec_field = cls.__dataclass_fields__[name]
    base, optional = _base_type(_hints(cls)[name])
    meta = spec_field.metadata
    if value is None and optional:
        return
    what, fits = _kind(base)
    what = meta.get("expect") or what
    rng, choices, null, note = (meta.get(k) for k in ("range", "choices", "null", "note"))
    tail = f" ({note})" if note else ""
    tail += f" (or null: {null})" if optional and null else (" (or null)" if optional else "")
    if choices is not None:
        require(
            isinstance(value, str) and value in choices,
            f"{key}={show(value)} must be one of {', '.join(choices)}{tail}",
        )
        return
    bound = f" {rng}" if rng is not None else ""
    if not fits(value):
        raise ConfigError(f"{key}={show(value)} must be {what}{bound}{tail}")
    if rng is not None and value not in rng:
        # integers keep their kind in the message (`an integer >= 1`), numbers just the range (`> 0`)
        kind = f"{what} " if base is int else ""
        raise ConfigError(f"{key}={show(value)} must be {kind}{rng}{tail}")


def build_spec(cls: type, node: Any, prefix: str, context: str = "") -> Any:
    """Build a frozen spec from a config node; unknown keys, wrong types and values out of range are
    ConfigErrors naming the key (`context`, e.g. ` for dataset=mnist`, follows an unknown key's name)."""
    if isinstance(node, DictConfig):
        data = OmegaConf.to_container(node, resolve=True)
    elif node is None or isinstance(node, Mapping):
        data = dict(node or {})
    else:
        raise ConfigError(f"{prefix}={show(node)} must be a group of keys {prefix}.* (see conf/config.yaml)")
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(map(str, data)) - set(known))
    if unknown:
        raise ConfigError(f"unknown key {prefix}.{unknown[0]}{context} (known: {', '.join(sorted(known))})")
    for name in known:  # in declaration order: the first bad key of the group is reported
        if name in data:
            check_value(cls, name, data[name], f"{prefix}.{name}" if prefix else name)
    return cls(**data)


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
