"""FedAvg (McMahan et al., 2017): local SGD on each client, weighted average of the updates at the server."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from raypfl.aggregate import Aggregate, ClientUpdate
from raypfl.algorithms.base import ClientContext
from raypfl.config import OptimSpec, TrainSpec

# The client half imports torch where it runs (inside its methods): the server half is unpickled in the
# parameter-server actor, which then stays a small numpy-only process.


class FedAvg:
    """Clients send `local - global`; the server moves `server_lr` of the way to the weighted mean.

    `weighting="samples"` weights a client by its number of training samples, `"uniform"` equally.
    With `optim.persistent_state=true` a client's optimizer state (e.g. momentum) survives across rounds.
    """

    def __init__(
        self, optim: OptimSpec, train: TrainSpec, weighting: str = "samples", server_lr: float = 1.0
    ):
        self.optim = optim
        self.train = train
        self.weighting = weighting
        self.server_lr = server_lr
        self.stateful_clients = optim.persistent_state

    def client_update(self, ctx: ClientContext, global_weights: np.ndarray) -> tuple[ClientUpdate, Any]:
        import torch
        from torch.utils._pytree import tree_map

        from raypfl.training import make_optimizer, train_local
        from raypfl.weights import get_flat

        optimizer = make_optimizer(ctx.model.parameters(), self.optim)
        if self.stateful_clients and ctx.state is not None:
            optimizer.load_state_dict(ctx.state)
        train = replace(self.train, **ctx.work) if ctx.work else self.train
        result = train_local(ctx.model, optimizer, ctx.x, ctx.y, ctx.indices, train, ctx.generator)
        delta = get_flat(ctx.model) - global_weights
        weight = float(len(ctx.indices)) if self.weighting == "samples" else 1.0
        metrics = {
            "samples": len(ctx.indices),
            "train_loss": result.loss,
            "train_acc": result.accuracy,
            "steps": result.steps,
        }
        state = None
        if self.stateful_clients:  # kept by the driver: as CPU tensors, whatever device trained it
            state = tree_map(lambda t: t.cpu() if isinstance(t, torch.Tensor) else t, optimizer.state_dict())
        return ClientUpdate(ctx.client, delta, weight, metrics), state

    def client_updates(
        self, contexts: list[ClientContext], global_weights: np.ndarray
    ) -> list[tuple[ClientUpdate, Any]]:
        """`client_update` for many clients at once, in lock-step (`runtime.vectorize=true`).

        All contexts share one model holding the global weights; see `raypfl.vectorized`.
        """
        import torch

        from raypfl.vectorized import ClientJob, train_lockstep
        from raypfl.weights import flat_names

        model = contexts[0].model
        start = {name: p.detach() for name, p in model.named_parameters()}
        jobs = [
            ClientJob(
                ctx.x,
                ctx.y,
                ctx.indices,
                ctx.generator,
                replace(self.train, **ctx.work) if ctx.work else self.train,
            )
            for ctx in contexts
        ]
        stacked, results = train_lockstep(model, start, jobs, self.optim)
        flat = torch.cat([stacked[name].reshape(len(jobs), -1) for name in flat_names(model)], dim=1)
        deltas = flat.cpu().numpy() - global_weights[None, :]
        updates = []
        for ctx, delta, result in zip(contexts, deltas, results):
            weight = float(len(ctx.indices)) if self.weighting == "samples" else 1.0
            metrics = {
                "samples": len(ctx.indices),
                "train_loss": result.loss,
                "train_acc": result.accuracy,
                "steps": result.steps,
            }
            updates.append((ClientUpdate(ctx.client, delta, weight, metrics), None))
        return updates

    def server_update(self, global_weights: np.ndarray, aggregate: Aggregate) -> np.ndarray:
        step = self.server_lr * aggregate.mean()
        return (global_weights.astype(np.float64) + step).astype(np.float32)
