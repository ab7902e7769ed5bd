"""FedAvgM (Hsu, Qi and Brown, 2019, "Measuring the Effects of Non-Identical Data Distribution for
Federated Visual Classification", Sec. 3): FedAvg with momentum on the server."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from raypfl.algorithms.aggregate import MODEL, Aggregate, Arrays
from raypfl.algorithms.fedavg import FedAvg
from raypfl.config import knob


@dataclass
class FedAvgM(FedAvg):
    """The server keeps a momentum buffer of the mean update: v <- beta v + mean(delta), w <- w + lr v.

    (The paper writes it with the pseudo-gradient -mean(delta) and w <- w - lr v: the same step.) With
    `server_momentum=0` it is FedAvg. The buffer is server state: checkpointed and handed over.
    """

    name = "fedavgm"
    server_lr: float = knob(1.0, gt=0)
    server_momentum: float = knob(0.9, ge=0, lt=1)

    def server_init(self, model: np.ndarray) -> tuple[Arrays, dict[str, Any]]:
        return {MODEL: model}, {"momentum": np.zeros(model.shape, np.float64)}

    def server_update(
        self, broadcast: Arrays, state: dict[str, Any], aggregate: Aggregate
    ) -> tuple[Arrays, dict[str, Any]]:
        momentum = self.server_momentum * state["momentum"] + aggregate.mean(MODEL)
        model = (broadcast[MODEL].astype(np.float64) + self.server_lr * momentum).astype(np.float32)
        return {**broadcast, MODEL: model}, {**state, "momentum": momentum}
