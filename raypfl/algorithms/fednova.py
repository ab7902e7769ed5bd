"""FedNova (Wang, Liu, Liang, Joshi and Poor, NeurIPS 2020, "Tackling the Objective Inconsistency Problem
in Heterogeneous Federated Optimization", Sec. 4): FedAvg whose clients' updates are normalised by the
amount of local work each did, so that clients running more steps do not pull the global model towards
their own objective.

Client i runs tau_i local SGD steps with momentum rho from x and reaches y_i. Its update is a sum of
tau_i gradients weighted by a_i; with PyTorch's SGD (v <- rho v + g, y <- y - lr v, v = 0 at the start)

    ||a_i||_1 = [tau_i - rho (1 - rho^tau_i) / (1 - rho)] / (1 - rho)      (= tau_i when rho = 0)
    d_i = (y_i - x) / ||a_i||_1                                             (the normalised update)
    x <- x + server_lr * tau_eff * sum_i p_i d_i,    tau_eff = sum_i p_i ||a_i||_1

with p_i the clients' weights normalised over the cohort (n_i / n by default). With equal tau_i and
rho = 0 this is FedAvg.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from raypfl.algorithms.aggregate import MODEL, Aggregate, Arrays, ClientUpdate
from raypfl.algorithms.base import ClientContext
from raypfl.algorithms.fedavg import FedAvg
from raypfl.errors import ConfigError

#: The statistic holding a client's ||a_i||_1 (a 1-element float64 array, weighted like `model`).
TAU = "tau"


@dataclass
class FedNova(FedAvg):
    """Clients send `model` = (y_i - x) / ||a_i||_1 and `tau` = ||a_i||_1, both weighted by p_i
    (`weighting`, as FedAvg); the server steps x + server_lr * mean(tau) * mean(model).

    tau_i is the number of steps the client actually took (its data size, `train.*` and any per-client
    work from load balancing decide it). The normaliser assumes local SGD starting from a zero momentum
    buffer: needs `optim.name=sgd` (checked); with `optim.persistent_state=true` the buffer carried over
    from the previous round makes ||a_i||_1 approximate. The paper's variants with weight decay or a
    proximal term in a_i are not implemented: `optim.weight_decay` is applied by the optimizer but left
    out of ||a_i||_1. Works with `runtime.vectorize=true` (the lock-step half normalises the same way).
    """

    name = "fednova"
    statistics = (MODEL, TAU)

    def statistic_sizes(self, model_size: int) -> dict[str, int]:
        return {MODEL: model_size, TAU: 1}

    def check(self) -> None:
        if self.optim.name != "sgd":
            raise ConfigError(
                f"algorithm=fednova needs optim.name=sgd (got optim.name={self.optim.name}): its normaliser "
                "||a_i||_1 counts SGD steps with momentum optim.momentum"
            )

    # --- client half -----------------------------------------------------------------------------------

    def client_update(self, ctx: ClientContext, broadcast: Arrays) -> tuple[ClientUpdate, Any]:
        update, state = super().client_update(ctx, broadcast)
        return self.normalise(update), state

    def client_updates(
        self, contexts: list[ClientContext], broadcast: Arrays
    ) -> list[tuple[ClientUpdate, Any]]:
        updates = super().client_updates(contexts, broadcast)
        return [(self.normalise(update), state) for update, state in updates]

    def normalise(self, update: ClientUpdate) -> ClientUpdate:
        """FedAvg's update y_i - x turned into FedNova's (d_i, ||a_i||_1), from the steps it took."""
        norm = normaliser(int(update.metrics["steps"]), self.optim.momentum)
        delta = update.statistics[MODEL]
        if norm > 0:  # a client that took no step sends d_i = 0 (its y_i - x) and ||a_i||_1 = 0
            delta = (delta.astype(np.float64) / norm).astype(np.float32)
        weight = update.weights[MODEL]
        return ClientUpdate(
            update.client,
            {MODEL: delta, TAU: np.array([norm], np.float64)},
            {MODEL: weight, TAU: weight},
            update.metrics,
        )

    # --- server half -----------------------------------------------------------------------------------

    def server_update(
        self, broadcast: Arrays, state: dict[str, Any], aggregate: Aggregate
    ) -> tuple[Arrays, dict[str, Any]]:
        tau_eff = float(aggregate.mean(TAU)[0])
        step = self.server_lr * tau_eff * aggregate.mean(MODEL)
        model = (broadcast[MODEL].astype(np.float64) + step).astype(np.float32)
        return {**broadcast, MODEL: model}, state


def normaliser(steps: int, momentum: float) -> float:
    """||a_i||_1 of `steps` SGD steps with momentum rho from a zero buffer (= steps when rho = 0)."""
    rho = float(momentum)
    if rho == 0.0:
        return float(steps)
    return (steps - rho * (1.0 - rho**steps) / (1.0 - rho)) / (1.0 - rho)
