"""Adaptive federated optimization (Reddi et al., ICLR 2021, "Adaptive Federated Optimization",
Algorithm 2): FedAdagrad, FedYogi and FedAdam. Clients run FedAvg's local SGD; the server treats the mean
update Delta_t as a pseudo-gradient and takes an adaptive step:

    m_t = beta1 m_{t-1} + (1 - beta1) Delta_t
    v_t = v_{t-1} + Delta_t^2                                        (FedAdagrad)
    v_t = v_{t-1} - (1 - beta2) Delta_t^2 sign(v_{t-1} - Delta_t^2)  (FedYogi)
    v_t = beta2 v_{t-1} + (1 - beta2) Delta_t^2                      (FedAdam)
    x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)

with m_{-1} = 0 and v_{-1} = tau^2 (the paper asks v_{-1} >= tau^2). As in the paper there is no bias
correction; FedAdam's `bias_correction=true` applies Adam's (as Flower does:
eta_t = eta sqrt(1 - beta2^t) / (1 - beta1^t)). The three are one algorithm with one line of difference
(the second moment), so they share this file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from raypfl.algorithms.aggregate import MODEL, Aggregate, Arrays
from raypfl.algorithms.fedavg import FedAvg
from raypfl.config import knob


@dataclass
class FedOpt(FedAvg):
    """The shared server step of Algorithm 2; subclasses define the second moment (`second_moment`)."""

    server_lr: float = knob(0.01, gt=0)  # eta
    beta1: float = knob(0.9, ge=0, lt=1)
    beta2: float = knob(0.99, ge=0, lt=1)
    tau: float = knob(1e-3, gt=0)  # adaptivity: larger tau, closer to server SGD with momentum

    def server_init(self, model: np.ndarray) -> tuple[Arrays, dict[str, Any]]:
        first = np.zeros(model.shape, np.float64)
        second = np.full(model.shape, self.tau**2, np.float64)
        return {MODEL: model}, {"m": first, "v": second, "t": 0}

    def second_moment(self, v: np.ndarray, square: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def step_size(self, t: int) -> float:
        """eta for round t (1-based)."""
        return self.server_lr

    def server_update(
        self, broadcast: Arrays, state: dict[str, Any], aggregate: Aggregate
    ) -> tuple[Arrays, dict[str, Any]]:
        delta = aggregate.mean(MODEL)
        t = int(state["t"]) + 1
        m = self.beta1 * state["m"] + (1.0 - self.beta1) * delta
        v = self.second_moment(state["v"], delta * delta)
        step = self.step_size(t) * m / (np.sqrt(v) + self.tau)
        model = (broadcast[MODEL].astype(np.float64) + step).astype(np.float32)
        return {**broadcast, MODEL: model}, {"m": m, "v": v, "t": t}


@dataclass
class FedAdagrad(FedOpt):
    """FedAdagrad: v accumulates every squared update (beta2 is not used)."""

    name = "fedadagrad"
    server_lr: float = knob(0.1, gt=0)

    def second_moment(self, v: np.ndarray, square: np.ndarray) -> np.ndarray:
        return v + square


@dataclass
class FedYogi(FedOpt):
    """FedYogi: v moves towards the squared update by at most (1 - beta2) of it, additively."""

    name = "fedyogi"

    def second_moment(self, v: np.ndarray, square: np.ndarray) -> np.ndarray:
        return v - (1.0 - self.beta2) * square * np.sign(v - square)


@dataclass
class FedAdam(FedOpt):
    """FedAdam: v is an exponential moving average of the squared update."""

    name = "fedadam"
    bias_correction: bool = False  # Adam's (Flower applies it; the paper does not)

    def second_moment(self, v: np.ndarray, square: np.ndarray) -> np.ndarray:
        return self.beta2 * v + (1.0 - self.beta2) * square

    def step_size(self, t: int) -> float:
        if not self.bias_correction:
            return self.server_lr
        return self.server_lr * float(np.sqrt(1.0 - self.beta2**t)) / (1.0 - self.beta1**t)
