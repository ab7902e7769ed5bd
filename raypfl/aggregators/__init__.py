"""Aggregation rules acting on STACKED client statistics: the weighted mean and robust stand-ins for it.
`build_aggregator` makes one from the config's `aggregator.*`: a shipped short name (`aggregator=krum`) or a
class of the user's own (`aggregator._target_=pkg.MyRule`, an `Aggregator` subclass)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from raypfl.aggregators.base import Aggregator, as_aggregate, stack_updates
from raypfl.aggregators.krum import Krum, MultiKrum
from raypfl.aggregators.mean import Mean
from raypfl.aggregators.median import Median
from raypfl.aggregators.rfa import RFA
from raypfl.aggregators.trimmed_mean import TrimmedMean
from raypfl.config.classes import checked_knobs, knobs, named_class
from raypfl.errors import ConfigError

AGGREGATORS: dict[str, type[Aggregator]] = {
    cls.name: cls for cls in (Mean, Median, TrimmedMean, Krum, MultiKrum, RFA)
}

__all__ = [
    "AGGREGATORS",
    "RFA",
    "Aggregator",
    "Krum",
    "Mean",
    "Median",
    "MultiKrum",
    "TrimmedMean",
    "aggregator_class",
    "as_aggregate",
    "build_aggregator",
    "knobs",
    "stack_updates",
]


def aggregator_class(node: Mapping[str, Any]) -> type[Aggregator]:
    """The class `aggregator.*` names (`_target_` wins over `name`); ConfigError naming the key if there is
    none, it cannot be imported, or it is not an Aggregator."""
    cls, where = named_class(node, "aggregator", AGGREGATORS, Aggregator)
    if cls.combine is Aggregator.combine:
        raise ConfigError(f"{where} does not implement combine(vectors, weights)")
    return cls


def aggregator_knobs(cls: type[Aggregator], node: Mapping[str, Any]) -> dict[str, Any]:
    """`aggregator.*` minus name/_target_, each checked against the class's field type and knob range."""
    return checked_knobs(cls, node, "aggregator", AGGREGATORS, blank="mean")


def build_aggregator(node: Mapping[str, Any] | None, per_round: int | None = None) -> Aggregator:
    """The aggregator of `aggregator.*` (`name` plus knobs, or a `_target_`), its knobs checked; also
    `check(per_round)` when the cohort size is given. No node (or an empty one) is the weighted mean."""
    if node is None or len(node) == 0:
        aggregator: Aggregator = Mean()
    else:
        if not isinstance(node, Mapping):
            raise ConfigError(f"aggregator={node} must be a group of keys aggregator.* (see conf/aggregator)")
        cls = aggregator_class(node)
        data = aggregator_knobs(cls, node)
        try:
            aggregator = cls(**data)
        except ConfigError:
            raise
        except Exception as exc:
            label = node.get("_target_") or node.get("name")
            raise ConfigError(f"aggregator={label}: building it failed ({exc})") from None
    if per_round is not None:
        aggregator.check(per_round)
    return aggregator
