"""FedExP (Jhunjhunwala, Wang and Joshi, ICLR 2023, "FedExP: Speeding Up Federated Averaging via
Extrapolation"): an algorithm written outside raypfl, both halves in one class.

    python -m raypfl algorithm=custom algorithm._target_=examples.fedexp.FedExP

Clients run local SGD and send their update Delta_i and its squared norm; the server extrapolates:
    eta_g = max(1, sum_i ||Delta_i||^2 / (2 |S| (||mean Delta||^2 + eps))),  x <- x + eta_g * mean Delta.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from raypfl.algorithms import Algorithm, ClientContext
from raypfl.algorithms.aggregate import MODEL, Aggregate, Arrays, ClientUpdate
from raypfl.config import knob

SQUARED_NORM = "squared_norm"


@dataclass
class FedExP(Algorithm):
    """FedAvg with an adaptive server step size >= 1 (uniform weights, as in the paper)."""

    name = "fedexp"
    eps: float = knob(1e-3, gt=0)  # the paper's epsilon: keeps eta_g finite when the mean update vanishes

    def client_update(self, ctx: ClientContext, broadcast: Arrays) -> tuple[ClientUpdate, Any]:
        from raypfl.models.weights import get_flat
        from raypfl.training.local import make_optimizer, train_local

        optimizer = make_optimizer(ctx.model.parameters(), self.optim)
        result = train_local(
            ctx.model, optimizer, ctx.x, ctx.y, ctx.indices, self.local_train(ctx), ctx.generator
        )
        delta = get_flat(ctx.model) - broadcast[MODEL]
        squared = np.array([np.dot(delta.astype(np.float64), delta)])
        statistics = {MODEL: delta, SQUARED_NORM: squared}
        metrics = {"samples": len(ctx.indices), "train_loss": result.loss, "steps": result.steps}
        return ClientUpdate(ctx.client, statistics, {MODEL: 1.0, SQUARED_NORM: 1.0}, metrics), None

    def server_update(
        self, broadcast: Arrays, state: dict[str, Any], aggregate: Aggregate
    ) -> tuple[Arrays, dict[str, Any]]:
        mean = aggregate.mean(MODEL)
        mean_squared_norm = float(aggregate.mean(SQUARED_NORM)[0])  # (1/|S|) sum_i ||Delta_i||^2
        eta = max(1.0, mean_squared_norm / (2.0 * (float(np.dot(mean, mean)) + self.eps)))
        model = (broadcast[MODEL].astype(np.float64) + eta * mean).astype(np.float32)
        return {MODEL: model}, {"eta_g": eta}
