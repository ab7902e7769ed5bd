"""The coordinate-wise median (Yin, Chen, Ramchandran and Bartlett, ICML 2018, "Byzantine-Robust Distributed
Learning: Towards Optimal Statistical Rates", Definition 1; Option I of their Algorithm 1).

Each coordinate of each statistic is the median of the n clients' values there (for even n, the mean of the
two middle values, as `np.median`). The client weights are ignored: the paper's rule is unweighted, and a
weight would let one client with many samples move the median alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from raypfl.aggregators.base import Aggregator, Estimates, blocks, first_row, middle, rows, transposed


def coordinate_median(x: np.ndarray) -> np.ndarray:
    """The coordinate-wise median of (n, d) rows, float64, block by block."""
    out = np.empty(x.shape[1], dtype=np.float64)
    for cols in blocks(x.shape[1]):
        out[cols] = middle(np.sort(transposed(x, cols), axis=1))
    return out


@dataclass
class Median(Aggregator):
    """Coordinate-wise median of every statistic (weights ignored). No knobs; robust while fewer than half of
    the clients are Byzantine."""

    name = "median"

    def combine(
        self, vectors: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray]
    ) -> tuple[Estimates, dict[str, float]]:
        if rows(vectors, weights) == 1:
            return first_row(vectors), {}
        return {name: coordinate_median(vectors[name]) for name in sorted(vectors)}, {}
