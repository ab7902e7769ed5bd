"""Krum and Multi-Krum (Blanchard, El Mhamdi, Guerraoui and Stainer, NeurIPS 2017, "Machine Learning with
Adversaries: Byzantine Tolerant Gradient Descent": Krum in Section 4, Multi-Krum in Section 5).

Client i's score is the sum of its squared distances to its n - f - 2 nearest other clients (the distance
over the concatenation of all its statistics). Krum returns the statistics of the client with the lowest
score; Multi-Krum the weighted mean of the `keep` best-scored clients. The paper's guarantee
(Proposition 1) needs n > 2f + 2; if drops leave fewer clients, the score uses max(1, n - f - 2)
neighbours, as Flower's `aggregate_krum` does, and the round reports `aggregator_degraded` = 1.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from raypfl.aggregators.base import Aggregator, Estimates, first_row, rows, squared_distances, weighted_mean
from raypfl.config import knob
from raypfl.errors import ConfigError

log = logging.getLogger(__name__)


def krum_scores(dist: np.ndarray, neighbours: int) -> np.ndarray:
    """Each row's sum of its `neighbours` smallest squared distances to the OTHER rows (float64)."""
    n = dist.shape[0]
    scores = np.empty(n, dtype=np.float64)
    for i in range(n):
        others = np.delete(dist[i], i)
        scores[i] = np.sort(others)[:neighbours].sum()
    return scores


@dataclass
class Krum(Aggregator):
    """Krum with `f` Byzantine clients tolerated: the statistics of the client whose n - f - 2 nearest
    neighbours are closest (ties: the lowest row, i.e. the lowest client id). Weights are ignored.

    Metrics: `krum_selected` (the chosen row of the stack, sorted by client id) and `aggregator_degraded`
    (1 when n <= 2f + 2).
    """

    name = "krum"
    title: ClassVar[str] = "Krum"
    f: int = knob(1, ge=0, note="the Byzantine clients tolerated")
    _warned: bool = field(default=False, init=False, repr=False, compare=False)

    def check(self, per_round: int) -> None:
        if per_round > 2 * self.f + 2:
            return
        top = (per_round - 3) // 2  # the largest f with per_round > 2f + 2
        fix = (
            f"use aggregator.f <= {top} or more clients per round"
            if top >= 0
            else f"use clients.per_round >= {2 * self.f + 3}"
        )
        raise ConfigError(
            f"aggregator.f={self.f}: {self.title} needs clients.per_round > 2f+2 "
            f"({per_round} > {2 * self.f + 2} is false); {fix}"
        )

    def neighbours(self, n: int) -> int:
        """How many nearest neighbours a score sums: n - f - 2, at least 1 (Flower's rule when n is small)."""
        return max(1, n - self.f - 2)

    def degraded(self, n: int) -> bool:
        """True (and a warning, once) if n clients are too few for the paper's n > 2f + 2."""
        if n > 2 * self.f + 2:
            return False
        if not self._warned:
            self._warned = True
            log.warning(
                "%s with aggregator.f=%d got %d clients (needs > %d): scoring with %d neighbour(s) instead; "
                "the round reports aggregator_degraded=1",
                self.title,
                self.f,
                n,
                2 * self.f + 2,
                self.neighbours(n),
            )
        return True

    def scores(self, vectors: Mapping[str, np.ndarray]) -> np.ndarray:
        """The (n,) Krum scores of the stacked clients."""
        dist = squared_distances(vectors)
        return krum_scores(dist, self.neighbours(dist.shape[0]))

    def combine(
        self, vectors: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray]
    ) -> tuple[Estimates, dict[str, float]]:
        n = rows(vectors, weights)
        degraded = float(self.degraded(n))
        if n == 1:
            return first_row(vectors), {"krum_selected": 0.0, "aggregator_degraded": degraded}
        best = int(np.argmin(self.scores(vectors)))  # the first minimum: ties go to the lowest row
        estimates = {name: vectors[name][best].astype(np.float64) for name in sorted(vectors)}
        return estimates, {"krum_selected": float(best), "aggregator_degraded": degraded}


@dataclass
class MultiKrum(Krum):
    """Multi-Krum: the weighted mean (each statistic with its own client weights) of the `keep` clients
    with the lowest Krum scores (ties: the lower rows).

    `keep` (null: n - f, all but f of the clients that answered) is capped at n - f (at least 1) when
    drops leave fewer clients; metrics `multikrum_kept` and `aggregator_degraded`.
    """

    name = "multikrum"
    title: ClassVar[str] = "Multi-Krum"
    keep: int | None = knob(None, ge=1, null="n - f, all but f of the clients aggregated")

    def check(self, per_round: int) -> None:
        super().check(per_round)
        most = per_round - self.f
        if self.keep is not None and self.keep > most:
            raise ConfigError(
                f"aggregator.keep={self.keep}: Multi-Krum keeps at most clients.per_round - f = {most} "
                f"clients ({per_round} - {self.f}); use aggregator.keep <= {most} or null"
            )

    def kept(self, n: int) -> int:
        """How many best-scored clients are averaged out of n: keep (or n - f), at most max(1, n - f)."""
        most = max(1, n - self.f)
        return most if self.keep is None else min(self.keep, most)

    def combine(
        self, vectors: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray]
    ) -> tuple[Estimates, dict[str, float]]:
        n = rows(vectors, weights)
        kept = self.kept(n)
        short = self.keep is not None and kept < self.keep
        degraded = float(self.degraded(n) or short)
        if n == 1:
            return first_row(vectors), {"multikrum_kept": 1.0, "aggregator_degraded": degraded}
        order = np.argsort(self.scores(vectors), kind="stable")  # equal scores keep the lower row first
        chosen = np.zeros(n, dtype=bool)
        chosen[order[:kept]] = True
        # the others get weight 0: no copy of the kept rows (n * d * 4 bytes for the cnn at n = 100)
        estimates = {
            name: weighted_mean(vectors[name], np.where(chosen, weights[name], 0.0), name)
            for name in sorted(vectors)
        }
        return estimates, {"multikrum_kept": float(kept), "aggregator_degraded": degraded}
