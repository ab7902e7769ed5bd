"""Linear aggregation of named statistics: clients' weighted statistics summed into partials, partials merged.

A client sends named statistics (`model` for its model update, and whatever its algorithm adds, e.g.
SCAFFOLD's `control`), each with its own weight. A worker sums its clients into ONE partial per round
(`Aggregate.add`); the server merges the partials (`Aggregate.merge`) and asks for weighted means.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

#: Named arrays: a broadcast, a client's statistics, a server state.
Arrays = dict[str, np.ndarray]

#: The name of the global model in a broadcast, and of a client's model update in its statistics.
MODEL = "model"


@dataclass
class ClientUpdate:
    """What one client sends: named statistics, the weight of each, and its metrics."""

    client: int
    statistics: Arrays
    weights: dict[str, float]
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if set(self.statistics) != set(self.weights):
            raise ValueError(
                f"client {self.client}: statistics {sorted(self.statistics)} and weights "
                f"{sorted(self.weights)} must name the same things"
            )

    @property
    def nbytes(self) -> int:
        """Bytes this update moves to the server."""
        return sum(int(v.nbytes) for v in self.statistics.values())

    def finite(self) -> bool:
        """True if every statistic and weight is finite."""
        return all(np.isfinite(w) for w in self.weights.values()) and all(
            np.isfinite(v).all() for v in self.statistics.values()
        )


@dataclass
class Aggregate:
    """Weighted sums (float64) of named statistics, each with its total weight, and who is in them.

    Workers send ONE Aggregate per round (their partial sum); the server merges them.
    Non-finite updates are rejected and recorded, never summed.
    """

    totals: Arrays = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    clients: list[int] = field(default_factory=list)
    rejected: list[int] = field(default_factory=list)

    def add(self, update: ClientUpdate) -> bool:
        """Add `weight * statistic` for each statistic; False (and a log line) if the update is not finite."""
        if not update.finite():
            log.warning("rejected client %d: its update contains NaN/Inf", update.client)
            self.rejected.append(update.client)
            return False
        for name, vector in update.statistics.items():
            weight = update.weights[name]
            scaled = vector.astype(np.float64) * weight
            self.totals[name] = scaled if name not in self.totals else self.totals[name] + scaled
            self.weights[name] = self.weights.get(name, 0.0) + weight
        self.clients.append(update.client)
        return True

    def merge(self, other: Aggregate) -> None:
        """Fold another partial into this one."""
        for name, total in other.totals.items():
            self.totals[name] = total.copy() if name not in self.totals else self.totals[name] + total
        for name, weight in other.weights.items():
            self.weights[name] = self.weights.get(name, 0.0) + weight
        self.clients.extend(other.clients)
        self.rejected.extend(other.rejected)

    def scaled(self, factor: float) -> Aggregate:
        """This partial with every weighted sum times `factor` and the weights as they are: its updates
        count `factor` times in a mean over the round's weight (asynchronous FL's staleness discount)."""
        totals = {name: total * factor for name, total in self.totals.items()}
        return Aggregate(totals, dict(self.weights), list(self.clients), list(self.rejected))

    @property
    def nbytes(self) -> int:
        """Bytes of the weighted sums (what a worker pushes to the server)."""
        return sum(int(v.nbytes) for v in self.totals.values())

    @property
    def has_weight(self) -> bool:
        """True if some statistic was summed with a positive total weight."""
        return any(w > 0 for w in self.weights.values())

    def mean(self, name: str = MODEL) -> np.ndarray:
        """The weighted mean of statistic `name`; raises if nothing of it was aggregated."""
        total = self.totals.get(name)
        if total is None or self.weights.get(name, 0.0) <= 0:
            raise ValueError(f"no client statistic {name!r} was aggregated this round")
        return total / self.weights[name]

    def sum(self, name: str) -> np.ndarray:
        """The weighted sum of statistic `name` (zeros-free: raises if none was aggregated)."""
        if name not in self.totals:
            raise ValueError(f"no client statistic {name!r} was aggregated this round")
        return self.totals[name]


@dataclass
class Stacked(Aggregate):
    """Every client's statistics kept apart, for aggregators that need them all (median, Krum, ...).

    A worker still sends ONE object per round: its clients' float32 statistics, stacked. The server merges
    the stacks and, at the round's close, `combine`s them (rows sorted by client id, so the result does not
    depend on how clients were spread over workers) into an ordinary Aggregate: each statistic's robust
    estimate of the mean, times its total weight. The cost: the server holds n x d float32 values.
    """

    rows: dict[int, tuple[Arrays, dict[str, float]]] = field(default_factory=dict)

    def add(self, update: ClientUpdate) -> bool:
        """Keep the client's statistics (float32) and weights; reject a non-finite update."""
        if not update.finite():
            log.warning("rejected client %d: its update contains NaN/Inf", update.client)
            self.rejected.append(update.client)
            return False
        statistics = {name: np.asarray(v, np.float32) for name, v in update.statistics.items()}
        self.rows[update.client] = (statistics, dict(update.weights))
        self.clients.append(update.client)
        return True

    def scaled(self, factor: float) -> Aggregate:
        raise TypeError("stacked updates are combined by a robust aggregator; they are not scaled")

    def merge(self, other: Aggregate) -> None:
        if not isinstance(other, Stacked):
            raise TypeError("a stacked aggregate merges only stacked partials (every worker stacks)")
        self.rows.update(other.rows)
        self.clients.extend(other.clients)
        self.rejected.extend(other.rejected)

    @property
    def has_weight(self) -> bool:
        return any(w > 0 for _, weights in self.rows.values() for w in weights.values())

    @property
    def nbytes(self) -> int:
        """Bytes of the stacked statistics (what a worker sends instead of one float64 partial)."""
        return sum(int(v.nbytes) for statistics, _ in self.rows.values() for v in statistics.values())

    def matrices(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(statistic -> (n, d) matrix, statistic -> (n,) weights), rows in client-id order."""
        order = sorted(self.rows)
        names = sorted({name for statistics, _ in self.rows.values() for name in statistics})
        vectors = {name: np.stack([self.rows[c][0][name] for c in order]) for name in names}
        weights = {name: np.array([self.rows[c][1][name] for c in order], np.float64) for name in names}
        return vectors, weights

    def combine(self, estimate: Arrays, weights: dict[str, np.ndarray]) -> Aggregate:
        """The ordinary Aggregate whose weighted means are `estimate` (each statistic's robust mean)."""
        total = {name: float(w.sum()) for name, w in weights.items()}
        totals = {name: np.asarray(estimate[name], np.float64) * total[name] for name in estimate}
        return Aggregate(totals, total, list(self.clients), list(self.rejected))
