"""SCAFFOLD (Karimireddy et al., ICML 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", Algorithm 1 with option II control variates)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from raypfl.algorithms.aggregate import MODEL, Aggregate, Arrays, ClientUpdate
from raypfl.algorithms.base import Algorithm, ClientContext
from raypfl.algorithms.fedavg import jobs_of, local_sgd, lockstep_flat, metrics, start_weights, weight_of
from raypfl.config import WEIGHTINGS, knob
from raypfl.errors import ConfigError

CONTROL = "control"


@dataclass
class Scaffold(Algorithm):
    """Control variates correct each client's drift.

    Server broadcast: the model x and the server control variate c. Client i (state: its own c_i, zeros
    at first) runs K local SGD steps y <- y - lr (g_i(y) - c_i + c), then (option II)
    c_i+ = c_i - c + (x - y) / (K lr), and sends the statistics `model` = y - x and `control` =
    c_i+ - c_i (weight 1 each). Server: x <- x + server_lr * mean(model) and c <- c + (1/N) sum(control),
    i.e. c moves by |S|/N of the mean control delta. c is server state and part of the broadcast; every c_i
    is client state (kept by the driver, checkpointed, restored on resume).

    `weighting=uniform` is the paper's mean over the cohort; `samples` weights the model statistic by
    n_i as FedAvg does. Needs plain SGD (optim.momentum=0): option II assumes K steps of size lr.
    """

    name = "scaffold"
    statistics = (MODEL, CONTROL)
    stateful_clients: ClassVar[bool] = True
    weighting: str = knob("uniform", choices=WEIGHTINGS)
    server_lr: float = knob(1.0, gt=0)  # eta_g

    def check(self) -> None:
        if self.optim.name != "sgd" or self.optim.momentum:
            raise ConfigError(
                f"algorithm=scaffold needs plain SGD: optim.name=sgd and optim.momentum=0 (got "
                f"optim.name={self.optim.name}, optim.momentum={self.optim.momentum}); its control variates "
                "assume K steps of size optim.lr"
            )

    # --- server half -----------------------------------------------------------------------------------

    def server_init(self, model: np.ndarray) -> tuple[Arrays, dict[str, Any]]:
        return {MODEL: model, CONTROL: np.zeros(model.shape, np.float32)}, {}

    def server_update(
        self, broadcast: Arrays, state: dict[str, Any], aggregate: Aggregate
    ) -> tuple[Arrays, dict[str, Any]]:
        model = broadcast[MODEL].astype(np.float64) + self.server_lr * aggregate.mean(MODEL)
        num_clients = self._bound().num_clients
        control = broadcast[CONTROL].astype(np.float64) + aggregate.sum(CONTROL) / num_clients
        return {MODEL: model.astype(np.float32), CONTROL: control.astype(np.float32)}, state

    # --- client half -----------------------------------------------------------------------------------

    def client_update(self, ctx: ClientContext, broadcast: Arrays) -> tuple[ClientUpdate, Any]:
        from raypfl.models.weights import get_flat, parameter_views, shared_tensor

        x, c = broadcast[MODEL], broadcast[CONTROL]
        c_i = ctx.state if ctx.state is not None else np.zeros_like(c)
        correction = parameter_views(
            ctx.model, shared_tensor(c - c_i).to(next(ctx.model.parameters()).device)
        )
        params = list(ctx.model.parameters())

        def adjust() -> None:  # g_i(y) - c_i + c
            for p, corr in zip(params, correction):
                if p.grad is not None:
                    p.grad.add_(corr)

        result, _ = local_sgd(ctx, self.optim, self.local_train(ctx), adjust)
        return self._finish(ctx, x, c, c_i, get_flat(ctx.model), result)

    def client_updates(
        self, contexts: list[ClientContext], broadcast: Arrays
    ) -> list[tuple[ClientUpdate, Any]]:
        """`client_update` for many clients at once, in lock-step (`runtime.vectorize=true`): each client's
        gradient gets its own correction c - c_i at each of its steps, as on the plain path."""
        import torch

        from raypfl.training.lockstep import train_lockstep

        model = contexts[0].model
        x, c = broadcast[MODEL], broadcast[CONTROL]
        controls = [ctx.state if ctx.state is not None else np.zeros_like(c) for ctx in contexts]
        device = next(model.parameters()).device
        corrections = torch.from_numpy(np.stack([c - c_i for c_i in controls])).to(device)
        correction, offset = {}, 0
        for name, p in model.named_parameters():  # buffer-free models: get_flat's layout
            correction[name] = corrections[:, offset : offset + p.numel()].reshape(len(contexts), *p.shape)
            offset += p.numel()
        stacked, results = train_lockstep(
            model, start_weights(model), jobs_of(self, contexts), self.optim, correction=correction
        )
        ys = lockstep_flat(model, stacked)
        return [
            self._finish(ctx, x, c, c_i, y, result)
            for ctx, c_i, y, result in zip(contexts, controls, ys, results)
        ]

    def _finish(
        self, ctx: ClientContext, x: np.ndarray, c: np.ndarray, c_i: np.ndarray, y: np.ndarray, result: Any
    ) -> tuple[ClientUpdate, np.ndarray]:
        """The client's update (y - x, c_i+ - c_i) and its new control variate (option II)."""
        steps = max(result.steps, 1)
        c_i_new = (c_i.astype(np.float64) - c + (x.astype(np.float64) - y) / (steps * self.optim.lr)).astype(
            np.float32
        )
        weight = weight_of(ctx, self.weighting)
        update = ClientUpdate(
            ctx.client,
            {MODEL: y - x, CONTROL: c_i_new - c_i},
            {MODEL: weight, CONTROL: 1.0},
            metrics(ctx, result),
        )
        return update, c_i_new
