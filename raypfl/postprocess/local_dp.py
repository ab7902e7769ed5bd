"""Local Gaussian noise: each client perturbs its own clipped update before it leaves the device.

x <- clip(x) + N(0, (multiplier * C)^2 I), C = clip.bound: the Gaussian mechanism (Dwork and Roth 2014,
"The Algorithmic Foundations of Differential Privacy", Thm 3.22) applied by the client, so the server never
sees an un-noised update. `multiplier` is sigma relative to C; note that the sensitivity of one client's
clipped update under replacement is 2C, so (epsilon, delta) must be read against multiplier / 2.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from raypfl.config import knob
from raypfl.postprocess.base import ClientStep, Wire


@dataclass
class LocalGaussian(ClientStep):
    """Add N(0, (multiplier * bound)^2) to every coordinate (drawn in float64, returned as float32).

    `bound` is not a knob: the pipeline builder (`build_pipelines`) copies clip.bound into it (fields with
    metadata `internal` are not user keys). Metric: `local_dp_noise_std`.
    """

    name = "local_dp"
    may_raise_norm = True
    multiplier: float = knob(1.0, gt=0)
    bound: float = field(default=0.0, metadata={"internal": True})

    @property
    def std(self) -> float:
        """The noise's standard deviation per coordinate: multiplier * bound."""
        return self.multiplier * self.bound

    def apply(
        self, vector: np.ndarray, wire: Wire, state: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, Wire, np.ndarray | None, dict[str, float]]:
        if not self.bound > 0:
            raise ValueError(
                "local_dp: its bound was not set from clip.bound (build it with build_pipelines)"
            )
        noisy = vector.astype(np.float64) + rng.normal(0.0, self.std, size=vector.shape)
        return noisy.astype(np.float32), wire, None, {"local_dp_noise_std": self.std}
