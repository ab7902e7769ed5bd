"""The weighted mean (FedAvg's aggregation, McMahan et al. 2017, "Communication-Efficient Learning of Deep
Networks from Decentralized Data", Algorithm 1): the linear rule, for completeness and as the reference the
robust rules are compared with. Runtimes keep summing partials for it (`needs_stack = False`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from raypfl.aggregators.base import Aggregator, Estimates, first_row, rows, weighted_mean


@dataclass
class Mean(Aggregator):
    """sum_i w_i x_i / sum_i w_i per statistic, with that statistic's client weights. No knobs."""

    name = "mean"
    needs_stack = False

    def combine(
        self, vectors: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray]
    ) -> tuple[Estimates, dict[str, float]]:
        if rows(vectors, weights) == 1:
            return first_row(vectors), {}
        return {name: weighted_mean(vectors[name], weights[name], name) for name in sorted(vectors)}, {}
