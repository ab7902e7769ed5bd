"""Robust Federated Aggregation, RFA (Pillutla, Kakade and Harchaoui, IEEE Transactions on Signal Processing
2022, "Robust Aggregation for Federated Learning", arXiv:1912.13445): the weighted geometric median
argmin_v sum_i alpha_i ||v - x_i||, approximated by the smoothed Weiszfeld algorithm.

Each pass is one weighted mean (one call of the secure-average oracle in the paper): the first with the
weights alpha_i, every later one with beta_i = alpha_i / max(nu, ||v - x_i||) around the previous iterate v.
nu (`smoothing`) keeps a client that sits on v from taking all the weight. As in the authors' TensorFlow
Federated code (`RobustWeiszfeldFactory`: 5 passes, smoothing 1e-6) the number of passes is fixed.

alpha_i is the client's weight of the `model` statistic (of the first statistic in name order if there is
no `model`), normalised; the distances are over the concatenation of all statistics, and the same
coefficients are applied to every statistic (SCAFFOLD's control variates follow the model's clients).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from raypfl.aggregators.base import Aggregator, Estimates, combination, distances_to, first_row, rows
from raypfl.algorithms.aggregate import MODEL
from raypfl.config import knob


def anchor(names: Mapping[str, np.ndarray]) -> str:
    """The statistic whose client weights are RFA's alpha: `model`, else the first name in sorted order."""
    return MODEL if MODEL in names else sorted(names)[0]


@dataclass
class RFA(Aggregator):
    """Geometric median by `passes` smoothed Weiszfeld passes (the first is the weighted mean); `smoothing`
    is nu. Stops early only at an exact fixed point (the coefficients repeat). Metric `rfa_passes`."""

    name = "rfa"
    passes: int = knob(5, ge=1, note="weighted means computed; the first is the plain weighted mean")
    smoothing: float = knob(1e-6, gt=0, note="nu: distances below it count as nu")

    def coefficients(self, vectors: Mapping[str, np.ndarray], alpha: np.ndarray) -> tuple[np.ndarray, int]:
        """(the final (n,) coefficients, summing to 1, the passes done) of the smoothed Weiszfeld algorithm
        on the stacked clients, from weights alpha."""
        total = float(alpha.sum())
        if total <= 0:
            raise ValueError(f"RFA: the clients' weights of {anchor(vectors)!r} sum to {total}")
        coef = alpha / total
        done = 1
        while done < self.passes:
            point = {name: combination(x, coef) for name, x in vectors.items()}
            beta = alpha / np.maximum(self.smoothing, distances_to(vectors, point))
            new = beta / beta.sum()
            if np.array_equal(new, coef):  # the next iterate would be this one, bit for bit
                break
            coef = new
            done += 1
        return coef, done

    def combine(
        self, vectors: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray]
    ) -> tuple[Estimates, dict[str, float]]:
        if rows(vectors, weights) == 1:
            return first_row(vectors), {"rfa_passes": 0.0}
        alpha = np.asarray(weights[anchor(vectors)], dtype=np.float64)
        coef, done = self.coefficients(vectors, alpha)
        return {name: combination(vectors[name], coef) for name in sorted(vectors)}, {
            "rfa_passes": float(done)
        }
