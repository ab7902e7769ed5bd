"""Linear aggregation: clients' weighted updates summed into partials, partials merged at the server."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class ClientUpdate:
    """What one client sends: a flat update vector, its aggregation weight and its metrics."""

    client: int
    vector: np.ndarray
    weight: float
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Aggregate:
    """A weighted sum of client updates (float64), with the total weight and who is in it.

    Workers send ONE Aggregate per round (their partial sum); the server merges them.
    Non-finite updates are rejected and recorded, never summed.
    """

    total: np.ndarray | None = None
    weight: float = 0.0
    clients: list[int] = field(default_factory=list)
    rejected: list[int] = field(default_factory=list)

    def add(self, update: ClientUpdate) -> bool:
        """Add `weight * vector`; returns False (and logs) if the update is not finite."""
        if not np.isfinite(update.vector).all() or not np.isfinite(update.weight):
            log.warning("rejected client %d: its update contains NaN/Inf", update.client)
            self.rejected.append(update.client)
            return False
        scaled = update.vector.astype(np.float64) * update.weight
        self.total = scaled if self.total is None else self.total + scaled
        self.weight += update.weight
        self.clients.append(update.client)
        return True

    def merge(self, other: Aggregate) -> None:
        """Fold another partial into this one."""
        if other.total is not None:
            self.total = other.total.copy() if self.total is None else self.total + other.total
        self.weight += other.weight
        self.clients.extend(other.clients)
        self.rejected.extend(other.rejected)

    def mean(self) -> np.ndarray:
        """The weighted mean update; raises if nothing was aggregated."""
        if self.total is None or self.weight <= 0:
            raise ValueError("no client update was aggregated this round")
        return self.total / self.weight
