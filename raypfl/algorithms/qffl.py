"""q-FFL solved by q-FedAvg (Li, Sanjabi, Beirami and Smith, ICLR 2020, "Fair Resource Allocation in
Federated Learning", Algorithm 2): the federation minimises sum_k p_k F_k^(q+1) / (q + 1), which weighs
clients with a higher loss more as q grows (q = 0: FedAvg's objective).

Client k evaluates the global model w on its training data (F_k, the mean cross-entropy, before any local
step), runs local SGD from w to w_bar_k, and sends

    dw_k    = L (w - w_bar_k)
    Delta_k = F_k^q dw_k
    h_k     = q F_k^(q-1) ||dw_k||^2 + L F_k^q

and the server steps w <- w - sum_k Delta_k / sum_k h_k. L estimates the Lipschitz constant of the
gradients; the paper's code takes L = 1/lr. With q = 0, Delta_k = dw_k and h_k = L: the new model is the
plain mean of the w_bar_k, i.e. FedAvg with uniform weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from raypfl.algorithms.aggregate import MODEL, Aggregate, Arrays, ClientUpdate
from raypfl.algorithms.base import Algorithm, ClientContext
from raypfl.algorithms.fedavg import local_sgd, metrics
from raypfl.config import knob

#: The statistic holding a client's h_k (a 1-element float64 array).
H = "h"
#: F_k is floored at this before F_k^q and F_k^(q-1): a loss of exactly 0 (possible in float32 when a
#: client's data is fitted perfectly) would otherwise give 0^(q-1) = inf for 0 < q < 1, or h = 0 for
#: every client (0/0) for q >= 1. Far below any loss a client reports, so it changes nothing else.
LOSS_FLOOR = 1e-12


@dataclass
class QFFL(Algorithm):
    """Clients send the statistics `model` = Delta_k and `h` = h_k (weight 1 each: the paper sums over
    the cohort); the server steps w - sum(model) / sum(h).

    `q` >= 0 is the fairness knob (0: FedAvg with uniform weights); `lipschitz` is L (null: 1/optim.lr, as
    in the paper's code). Clients also report `loss_before` = F_k. With `optim.persistent_state=true` a
    client's optimizer state survives across rounds, as FedAvg's does.
    """

    name = "qffl"
    statistics = (MODEL, H)
    q: float = knob(1.0, ge=0)
    lipschitz: float | None = knob(None, gt=0, null="1/optim.lr")

    def statistic_sizes(self, model_size: int) -> dict[str, int]:
        return {MODEL: model_size, H: 1}

    @property
    def stateful_clients(self) -> bool:  # type: ignore[override]
        return self.optim.persistent_state

    @property
    def lipschitz_constant(self) -> float:
        """L: the `lipschitz` knob, or 1/optim.lr if it is null."""
        return self.lipschitz if self.lipschitz is not None else 1.0 / self.optim.lr

    # --- client half -----------------------------------------------------------------------------------

    def client_update(self, ctx: ClientContext, broadcast: Arrays) -> tuple[ClientUpdate, Any]:
        import torch

        from raypfl.models.weights import get_flat
        from raypfl.training.local import evaluate

        # F_k: the global model's mean loss on the client's training data, in eval mode, before training
        rows = torch.tensor(np.asarray(ctx.indices), dtype=torch.int64)  # a copy: partitions are read-only
        loss_sum, _, count = evaluate(ctx.model, ctx.x[rows], ctx.y[rows])
        loss = loss_sum / max(count, 1)

        result, state = local_sgd(ctx, self.optim, self.local_train(ctx), keep_state=self.stateful_clients)

        dw = self.lipschitz_constant * (
            broadcast[MODEL].astype(np.float64) - get_flat(ctx.model).astype(np.float64)
        )
        delta, h = self.fair_step(loss, dw)
        update = ClientUpdate(
            ctx.client,
            {MODEL: delta.astype(np.float32), H: np.array([h], np.float64)},
            {MODEL: 1.0, H: 1.0},
            {**metrics(ctx, result), "loss_before": loss},
        )
        return update, state

    def fair_step(self, loss: float, dw: np.ndarray) -> tuple[np.ndarray, float]:
        """(Delta_k, h_k) from F_k and dw_k = L (w - w_bar_k), in float64."""
        f = max(float(loss), LOSS_FLOOR)
        fq = f**self.q
        h = self.lipschitz_constant * fq
        if self.q > 0:  # for q = 0 the first term is 0 (and F^(q-1) is not needed)
            h += self.q * f ** (self.q - 1.0) * float(np.dot(dw, dw))
        return fq * dw, h

    # --- server half -----------------------------------------------------------------------------------

    def server_update(
        self, broadcast: Arrays, state: dict[str, Any], aggregate: Aggregate
    ) -> tuple[Arrays, dict[str, Any]]:
        step = aggregate.sum(MODEL) / float(aggregate.sum(H)[0])
        model = (broadcast[MODEL].astype(np.float64) - step).astype(np.float32)
        return {**broadcast, MODEL: model}, state
