"""Ditto (Li, Hu, Beirami, Smith, ICML 2021, "Ditto: Fair and Robust Federated Learning Through
Personalization", Algorithm 1): FedAvg for the global model, plus a personal model per client pulled
towards the global one by lambda/2 ||v - w||^2."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np

from raypfl.algorithms.aggregate import MODEL, Arrays, ClientUpdate
from raypfl.algorithms.base import Algorithm, ClientContext
from raypfl.algorithms.fedavg import FedAvg, local_sgd, proximal_adjust
from raypfl.config import OptimSpec, knob
from raypfl.errors import ConfigError


@dataclass
class Ditto(FedAvg):
    """The global half is FedAvg; each client also keeps a personal model v_k (its state).

    Client k in round t receives w^t and (1) trains its copy of w^t exactly as FedAvg does (same optimizer,
    local work and weighting) and sends `model` = w_k - w^t; then (2) trains v_k on its data with the local
    objective F_k(v) + lam/2 ||v - w^t||^2: the gradient lam (v - w^t) is added after each backward, the
    anchor is the RECEIVED global model w^t. v_k starts as w^t at the client's first participation. The
    personal update is plain SGD (Algorithm 1's v_k <- v_k - eta (grad F_k(v_k) + lam (v_k - w^t))) with
    step `personal_lr` (default `optim.lr`) for `personal_epochs` epochs (default: the same local work as
    the global update, `train.*`); it continues the client's generator after the global update, so the
    global update is bit for bit FedAvg's. The server half is FedAvg's.

    Client state: v_k (flat float32, the model's parameters and floating buffers). A client that never
    trained is served the global model. `optim.persistent_state=true` is refused (the state is v_k only).
    """

    name = "ditto"
    stateful_clients: ClassVar[bool] = True  # type: ignore[assignment]  # FedAvg's is a property
    # lam: the official code's clean-data runs (run_*_clean_ditto_lam1.sh) use 1; the paper picks it from
    # {0.1, 1, 2} per device ({0.05, 0.1, 0.2} under strong attacks)
    lam: float = knob(1.0, ge=0)
    personal_epochs: int | None = knob(None, ge=1, null="the same local work as the global update, train.*")
    personal_lr: float | None = knob(None, gt=0, null="optim.lr")

    # the lock-step half FedAvg has would skip the personal models: Ditto has none
    client_updates = Algorithm.client_updates

    def check(self) -> None:
        super().check()
        if self.optim.persistent_state:
            raise ConfigError(
                "algorithm=ditto keeps each client's personal model as its state: "
                "optim.persistent_state=true is not supported"
            )

    # --- client half -----------------------------------------------------------------------------------

    def client_update(self, ctx: ClientContext, broadcast: Arrays) -> tuple[ClientUpdate, Any]:
        # (1) the global half: FedAvg's update of w^t (ctx.state is v_k, not optimizer state: hidden from it)
        update, _ = FedAvg.client_update(self, replace(ctx, state=None), broadcast)
        # (2) the personal half: v_k on F_k(v) + lam/2 ||v - w^t||^2, from v_k (w^t at first)
        result, personal = self.personal_update(ctx, broadcast)
        update.metrics["personal_train_loss"] = result.loss
        update.metrics["personal_train_acc"] = result.accuracy
        return update, personal

    def personal_update(self, ctx: ClientContext, broadcast: Arrays) -> tuple[Any, np.ndarray]:
        """Train v_k (ctx.state, or w^t if None) in ctx.model; (its TrainResult, the new v_k)."""
        from raypfl.models.weights import get_flat, set_flat

        w = np.asarray(broadcast[MODEL], dtype=np.float32)
        set_flat(ctx.model, ctx.state if ctx.state is not None else w)
        adjust = proximal_adjust(ctx.model, self.lam, anchor=w)  # + lam (v - w^t)
        lr = self.optim.lr if self.personal_lr is None else self.personal_lr
        spec = self.local_train(ctx)
        if self.personal_epochs is not None:
            spec = replace(spec, local_epochs=self.personal_epochs, local_steps=None)
        result, _ = local_sgd(ctx, OptimSpec(name="sgd", lr=lr), spec, adjust)  # plain SGD, lr
        return result, get_flat(ctx.model)

    # --- personalization -------------------------------------------------------------------------------

    def personal_model(self, state: Any, broadcast: Arrays) -> np.ndarray | None:
        """v_k; the global model for a client that never trained."""
        return broadcast[MODEL] if state is None else np.asarray(state, dtype=np.float32)
