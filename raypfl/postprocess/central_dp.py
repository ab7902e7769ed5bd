"""Central Gaussian noise on the round's aggregate: DP-FedAvg with a fixed denominator.

McMahan, Ramage, Talwar, Zhang, ICLR 2018, "Learning differentially private recurrent language models",
Alg. 1 (the fixed-denominator estimator): with every client's update clipped to l2 norm C and weighted 1,
the server releases (sum of updates + N(0, sigma^2 I)) / m, where m is the expected cohort size, so one
client moves the mean by at most C/m. With sigma = z C m / M the mean's noise std is z C / M: M = m is the
paper's setting; M > m ("noise_cohort_size", as in pfl-research) simulates the noise of a larger cohort.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raypfl.algorithms.aggregate import MODEL, Aggregate
from raypfl.postprocess.base import ServerStep


@dataclass
class CentralGaussian(ServerStep):
    """Add N(0, (z C m / M)^2) (float64) to the summed `model` statistic and fix its weight to m.

    Fields (set by the builder, not user knobs): `noise_multiplier` z (privacy.noise_multiplier or
    calibrated from privacy.epsilon), `bound` C (clip.bound), `per_round` m (clients.per_round) and
    `noise_cohort_size` M (privacy.noise_cohort_size; None: m). Needs weight 1 per client
    (algorithm.weighting=uniform): `apply` raises otherwise. Metric: `dp_noise_std` = z C / M.
    """

    name = "central_dp"
    noise_multiplier: float
    bound: float
    per_round: int
    noise_cohort_size: int | None = None

    def __post_init__(self) -> None:
        if not self.noise_multiplier >= 0:
            raise ValueError(f"central_dp: noise_multiplier={self.noise_multiplier} must be >= 0")
        if not self.bound > 0:
            raise ValueError(f"central_dp: bound={self.bound} must be > 0 (clip.bound)")
        if self.per_round < 1:
            raise ValueError(f"central_dp: per_round={self.per_round} must be >= 1")
        if self.noise_cohort_size is not None and self.noise_cohort_size < 1:
            raise ValueError(f"central_dp: noise_cohort_size={self.noise_cohort_size} must be >= 1")

    @property
    def cohort(self) -> int:
        """M: the cohort size the noise is calibrated for."""
        return self.per_round if self.noise_cohort_size is None else self.noise_cohort_size

    @property
    def sum_std(self) -> float:
        """The std of the noise added to the sum: z C m / M."""
        return self.noise_multiplier * self.bound * self.per_round / self.cohort

    @property
    def mean_std(self) -> float:
        """The std of the noise in the released mean: z C / M."""
        return self.noise_multiplier * self.bound / self.cohort

    def apply(self, aggregate: Aggregate, rng: np.random.Generator) -> tuple[Aggregate, dict[str, float]]:
        if not aggregate.clients:
            return aggregate, {}
        if MODEL not in aggregate.totals:
            raise ValueError(f"central_dp: the aggregate has no summed {MODEL!r} statistic to noise")
        weight = aggregate.weights[MODEL]
        if weight != len(aggregate.clients):
            raise ValueError(
                f"central_dp: the {MODEL!r} weights sum to {weight:g} over {len(aggregate.clients)} clients; "
                "DP-FedAvg needs weight 1 per client (algorithm.weighting=uniform)"
            )
        total = aggregate.totals[MODEL]
        noise = rng.normal(0.0, self.sum_std, size=total.shape)
        released = Aggregate(
            totals={**aggregate.totals, MODEL: total.astype(np.float64) + noise},
            weights={**aggregate.weights, MODEL: float(self.per_round)},
            clients=list(aggregate.clients),
            rejected=list(aggregate.rejected),
        )
        return released, {"dp_noise_std": self.mean_std}
