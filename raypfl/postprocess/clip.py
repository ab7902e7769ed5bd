"""L2 clipping of a client's update: the step that bounds one client's influence (its sensitivity).

v <- v * min(1, C / ||v||_2), as in DP-FedAvg (McMahan, Ramage, Talwar, Zhang, ICLR 2018, Alg. 1,
"ClipFn"); it also bounds what a "scaled" model-poisoning attacker can contribute.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raypfl.config import knob
from raypfl.postprocess.base import ClientStep, Wire


@dataclass
class Clip(ClientStep):
    """Scale the update down to l2 norm `bound` if it is longer; its direction is kept.

    Metrics: `update_norm` (the norm before clipping) and `clipped` (1.0 if it was scaled). Both are
    per-client values computed from private data: logging them is not differentially private.
    """

    name = "clip"
    bound: float = knob(1.0, gt=0)

    def apply(
        self, vector: np.ndarray, wire: Wire, state: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, Wire, np.ndarray | None, dict[str, float]]:
        norm = float(np.linalg.norm(vector.astype(np.float64)))
        if norm <= self.bound:
            return vector, wire, None, {"update_norm": norm, "clipped": 0.0}
        clipped = (vector.astype(np.float64) * (self.bound / norm)).astype(np.float32)
        return clipped, wire, None, {"update_norm": norm, "clipped": 1.0}
