"""FedProx (Li et al., MLSys 2020, "Federated Optimization in Heterogeneous Networks", Algorithm 2):
FedAvg whose clients minimise h_k(w) = F_k(w) + mu/2 ||w - w_t||^2."""

from __future__ import annotations

from dataclasses import dataclass

from raypfl.algorithms.fedavg import FedAvg
from raypfl.config import knob


@dataclass
class FedProx(FedAvg):
    """Each local step adds mu (w - w_global) to the gradient (the proximal term's gradient); the server
    averages like FedAvg. Works with `runtime.vectorize=true` (the lock-step half adds the same term).

    The paper's tolerance for inexact local solutions (gamma) is the local work itself (`train.*`, and
    per-client work from load balancing); mu=0 is FedAvg.
    """

    name = "fedprox"
    mu: float = knob(0.01, ge=0)

    def proximal_mu(self) -> float:
        return self.mu
