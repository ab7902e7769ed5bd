"""FedAvg (McMahan et al., 2017, "Communication-Efficient Learning of Deep Networks from Decentralized
Data", Algorithm 1): local SGD on each client, the weighted mean of the updates applied at the server."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from raypfl.algorithms.aggregate import MODEL, Aggregate, Arrays, ClientUpdate
from raypfl.algorithms.base import Algorithm, ClientContext
from raypfl.config import WEIGHTINGS, knob

# The client half imports torch where it runs (inside its methods): the server half is unpickled in the
# parameter-server actor, which then stays a small numpy-only process.


@dataclass
class FedAvg(Algorithm):
    """Clients send `local - global` (statistic `model`); the server moves `server_lr` of the way to the
    weighted mean.

    `weighting="samples"` weights a client by its number of training samples (the paper's n_k / n),
    `"uniform"` equally. With `optim.persistent_state=true` a client's optimizer state (e.g. momentum)
    survives across rounds. Subclasses reuse the client half and change the server step (FedAvgM, FedOpt)
    or the local objective (`proximal_mu`, FedProx).
    """

    name = "fedavg"
    weighting: str = knob("samples", choices=WEIGHTINGS)
    server_lr: float = knob(1.0, gt=0)

    @property
    def stateful_clients(self) -> bool:  # type: ignore[override]
        return self.optim.persistent_state

    def proximal_mu(self) -> float:
        """The weight of a proximal term mu/2 ||w - w_global||^2 in the local loss (0: none)."""
        return 0.0

    def client_weight(self, ctx: ClientContext) -> float:
        return weight_of(ctx, self.weighting)

    # --- client half -----------------------------------------------------------------------------------

    def client_update(self, ctx: ClientContext, broadcast: Arrays) -> tuple[ClientUpdate, Any]:
        from raypfl.models.weights import get_flat

        adjust = proximal_adjust(ctx.model, self.proximal_mu())
        result, state = local_sgd(ctx, self.optim, self.local_train(ctx), adjust, self.stateful_clients)
        delta = get_flat(ctx.model) - broadcast[MODEL]
        update = ClientUpdate(
            ctx.client, {MODEL: delta}, {MODEL: self.client_weight(ctx)}, metrics(ctx, result)
        )
        return update, state

    def client_updates(
        self, contexts: list[ClientContext], broadcast: Arrays
    ) -> list[tuple[ClientUpdate, Any]]:
        """`client_update` for many clients at once, in lock-step (`runtime.vectorize=true`).

        All contexts share one model holding the global weights; see `raypfl.training.lockstep`. With
        `optim.persistent_state=true` each client's momentum comes from and goes back to its state, in
        torch's optimizer `state_dict` format (the plain path's: either path can resume the other's run).
        """
        from raypfl.training.lockstep import optimizer_states, stack_optimizer_states, train_lockstep

        model = contexts[0].model
        momentum = None
        if self.stateful_clients:
            momentum = stack_optimizer_states(model, self.optim, [ctx.state for ctx in contexts])
        jobs = jobs_of(self, contexts)
        stacked, results = train_lockstep(
            model, start_weights(model), jobs, self.optim, self.proximal_mu(), momentum=momentum
        )
        deltas = lockstep_flat(model, stacked) - broadcast[MODEL][None, :]
        n = len(contexts)
        states = optimizer_states(model, self.optim, momentum, n) if self.stateful_clients else [None] * n
        return [
            (
                ClientUpdate(
                    ctx.client, {MODEL: delta}, {MODEL: self.client_weight(ctx)}, metrics(ctx, result)
                ),
                state,
            )
            for ctx, delta, result, state in zip(contexts, deltas, results, states)
        ]

    # --- server half -----------------------------------------------------------------------------------

    def server_update(
        self, broadcast: Arrays, state: dict[str, Any], aggregate: Aggregate
    ) -> tuple[Arrays, dict[str, Any]]:
        step = self.server_lr * aggregate.mean(MODEL)
        model = (broadcast[MODEL].astype(np.float64) + step).astype(np.float32)
        return {**broadcast, MODEL: model}, state


def weight_of(ctx: ClientContext, weighting: str) -> float:
    """A client's aggregation weight: its number of training samples (`samples`) or 1 (`uniform`)."""
    return float(len(ctx.indices)) if weighting == "samples" else 1.0


def metrics(ctx: ClientContext, result: Any) -> dict[str, float]:
    """A client's row in clients.csv from its local training."""
    return {
        "samples": len(ctx.indices),
        "train_loss": result.loss,
        "train_acc": result.accuracy,
        "steps": result.steps,
    }


def start_weights(model: Any) -> dict[str, Any]:
    """The lock-step start: the model's parameters (the global model the worker just loaded), by name."""
    return {name: p.detach() for name, p in model.named_parameters()}


def jobs_of(algorithm: Algorithm, contexts: list[ClientContext]) -> list[Any]:
    """One lock-step ClientJob per client: its data view, shuffling and local work."""
    from raypfl.training.lockstep import ClientJob

    return [
        ClientJob(ctx.x, ctx.y, ctx.indices, ctx.generator, algorithm.local_train(ctx)) for ctx in contexts
    ]


def lockstep_flat(model: Any, stacked: dict[str, Any]) -> np.ndarray:
    """Stacked lock-step parameters as one row per client, laid out as `get_flat` lays out the model."""
    import torch

    from raypfl.models.weights import flat_names

    n = len(next(iter(stacked.values())))
    return torch.cat([stacked[name].reshape(n, -1) for name in flat_names(model)], dim=1).cpu().numpy()


def local_sgd(
    ctx: ClientContext,
    optim: Any,
    train: Any,
    adjust: Callable[[], None] | None = None,
    keep_state: bool = False,
) -> tuple[Any, Any]:
    """One client's local training of `ctx.model`: the optimizer `optim` (an OptimSpec) names, the work
    `train` (a TrainSpec) sets, `adjust` run after each backward pass. With `keep_state` the optimizer's
    state is restored from `ctx.state` and returned (as CPU tensors, whatever device trained it: the driver
    keeps it). Returns (the TrainResult, the optimizer state or None)."""
    import torch
    from torch.utils._pytree import tree_map

    from raypfl.training.local import make_optimizer, train_local

    optimizer = make_optimizer(ctx.model.parameters(), optim)
    if keep_state and ctx.state is not None:
        optimizer.load_state_dict(ctx.state)
    result = train_local(ctx.model, optimizer, ctx.x, ctx.y, ctx.indices, train, ctx.generator, adjust)
    if not keep_state:
        return result, None
    return result, tree_map(lambda t: t.cpu() if isinstance(t, torch.Tensor) else t, optimizer.state_dict())


def proximal_adjust(model: Any, mu: float, anchor: np.ndarray | None = None):
    """The gradient of mu/2 ||w - anchor||^2, added after each backward pass (None if mu=0): FedProx's term
    and Ditto's.

    The anchor is a flat weight vector (as `get_flat` lays it out), by default the model's parameters now,
    i.e. the global model the worker just loaded.
    """
    if not mu:
        return None
    params = list(model.parameters())
    if anchor is None:
        anchor = [p.detach().clone() for p in params]
    else:
        from raypfl.models.weights import parameter_views, shared_tensor

        anchor = parameter_views(model, shared_tensor(anchor).to(params[0].device))

    def adjust() -> None:
        for p, p0 in zip(params, anchor):
            if p.grad is not None:
                p.grad.add_(p.detach() - p0, alpha=mu)

    return adjust
