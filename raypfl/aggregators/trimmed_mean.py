"""The coordinate-wise trimmed mean (Yin, Chen, Ramchandran and Bartlett, ICML 2018, "Byzantine-Robust
Distributed Learning: Towards Optimal Statistical Rates", Definition 2; Option II of their Algorithm 1).

For each coordinate of each statistic, the floor(beta * n) smallest and the floor(beta * n) largest of the n
clients' values are dropped and the rest averaged (scipy's `trim_mean`, which Flower's FedTrimmedAvg uses).
beta < 1/2 always leaves n - 2 floor(beta * n) >= 1 values. The client weights are ignored, as in the paper.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from raypfl.aggregators.base import Aggregator, Estimates, blocks, first_row, rows, transposed
from raypfl.config import knob

log = logging.getLogger(__name__)


def trimmed_mean(x: np.ndarray, cut: int) -> np.ndarray:
    """The mean of each column of (n, d) rows without its `cut` smallest and `cut` largest values, float64."""
    n = x.shape[0]
    out = np.empty(x.shape[1], dtype=np.float64)
    for cols in blocks(x.shape[1]):
        ordered = np.sort(transposed(x, cols), axis=1)
        out[cols] = ordered[:, cut : n - cut].mean(axis=1)
    return out


@dataclass
class TrimmedMean(Aggregator):
    """Coordinate-wise beta-trimmed mean of every statistic (weights ignored).

    `beta` in [0, 0.5): the fraction trimmed from EACH side (0: the plain unweighted mean). With n clients,
    floor(beta * n) per side, so a smaller cohort (drops) trims fewer. Metric `trimmed_per_side`.
    """

    name = "trimmed_mean"
    beta: float = knob(0.1, ge=0, lt=0.5, note="the fraction dropped from each side")

    def cut(self, n: int) -> int:
        """floor(beta * n): the values dropped per side of each coordinate."""
        return math.floor(self.beta * n)

    def check(self, per_round: int) -> None:
        if self.beta > 0 and self.cut(per_round) == 0:
            log.warning(
                "aggregator.beta=%g trims nothing from cohorts of clients.per_round=%d "
                "(floor(beta * n) = 0): trimmed_mean is the unweighted mean there",
                self.beta,
                per_round,
            )

    def combine(
        self, vectors: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray]
    ) -> tuple[Estimates, dict[str, float]]:
        n = rows(vectors, weights)
        if n == 1:
            return first_row(vectors), {"trimmed_per_side": 0.0}
        cut = self.cut(n)
        estimates = {name: trimmed_mean(vectors[name], cut) for name in sorted(vectors)}
        return estimates, {"trimmed_per_side": float(cut)}
