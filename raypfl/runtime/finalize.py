"""What the server does to a round's aggregate before the algorithm's server half sees it.

A robust aggregator (`aggregator=median|trimmed_mean|krum|multikrum|rfa`) turns the clients' stacked
updates into an ordinary aggregate; then server-side postprocessors (`central_dp`) act on it. The
algorithm's `server_update` sees an Aggregate either way, so no algorithm knows about either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from raypfl.algorithms.aggregate import Aggregate, Stacked


@dataclass(frozen=True)
class RoundFinalizer:
    """Combine stacked updates (`aggregator`), then apply the server steps (seeded per version)."""

    seed: int
    aggregator: Any = None  # a raypfl.aggregators.Aggregator that needs every client's update, or None
    server_steps: Any = None  # a raypfl.postprocess.ServerPipeline, or None

    def __call__(self, aggregate: Aggregate, version: int) -> tuple[Aggregate, dict[str, float]]:
        """The round's aggregate as the algorithm's server half should see it, and what was done to it."""
        metrics: dict[str, float] = {}
        if isinstance(aggregate, Stacked):
            if not aggregate.rows:
                return Aggregate(clients=list(aggregate.clients), rejected=list(aggregate.rejected)), metrics
            vectors, weights = aggregate.matrices()
            estimate, found = self.aggregator.combine(vectors, weights)
            aggregate = aggregate.combine(estimate, weights)
            metrics.update(found)
        if self.server_steps is not None and aggregate.clients:
            aggregate, found = self.server_steps.apply(aggregate, self.seed, version)
            metrics.update(found)
        return aggregate, metrics
