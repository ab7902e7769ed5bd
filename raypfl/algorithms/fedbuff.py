"""FedBuff (Nguyen et al., 2022, "Federated Learning with Buffered Asynchronous Aggregation", AISTATS,
Algorithm 1): clients train asynchronously from whatever global model they downloaded; the server keeps
a buffer and steps once `buffer_size` (K) updates are in, each discounted by its staleness.

The client half is FedAvg's (local SGD, the update `local - global`). The server step is
    w <- w + server_lr * (1/K) * sum_i s(tau_i) * delta_i
with tau_i the number of server steps since client i's base version and s a staleness function from
Xie et al. (2019, "Asynchronous Federated Optimization", FedAsync): `constant` s = 1, `polynomial`
s = (1 + tau)^-a (FedBuff's experiments use a = 1/2), `hinge` s = 1 for tau <= b, else 1/(a(tau - b) + 1).
Which client runs when is the driver's business (raypfl.driver.stream): up to `concurrency` clients in
flight, a new one dispatched as soon as one finishes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from raypfl.algorithms.fedavg import FedAvg
from raypfl.config import WEIGHTINGS, knob
from raypfl.errors import ConfigError

STALENESS = ("constant", "polynomial", "hinge")


@dataclass
class FedBuff(FedAvg):
    """Buffered asynchronous FedAvg. `weighting=uniform` (the paper's 1/K) by default; `samples` weights
    each update by its client's data instead (the mean is then over the buffer's samples)."""

    name = "fedbuff"
    asynchronous: ClassVar[bool] = True
    weighting: str = knob("uniform", choices=WEIGHTINGS)
    concurrency: int = knob(20, ge=1)  # clients training at the same time
    buffer_size: int = knob(10, ge=1)  # K: updates per server step
    staleness: str = knob("polynomial", choices=STALENESS)
    staleness_a: float = knob(0.5, gt=0)  # polynomial: the exponent; hinge: the slope after b
    staleness_b: int = knob(10, ge=0)  # hinge: no discount up to this staleness

    def check(self) -> None:
        if self.buffer_size > self.concurrency:
            raise ConfigError(
                f"algorithm.buffer_size={self.buffer_size} must be <= algorithm.concurrency="
                f"{self.concurrency}: a server step waits for buffer_size updates of clients in flight"
            )

    def staleness_weight(self, staleness: int) -> float:
        """s(tau): how much an update `staleness` server steps old counts."""
        if self.staleness == "constant":
            return 1.0
        if self.staleness == "polynomial":
            return float((1.0 + staleness) ** -self.staleness_a)
        if staleness <= self.staleness_b:
            return 1.0
        return 1.0 / (self.staleness_a * (staleness - self.staleness_b) + 1.0)
