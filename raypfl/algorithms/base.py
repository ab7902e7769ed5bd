"""What an algorithm is: a client half and a server half, owned together, runtime-agnostic."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from raypfl.aggregate import Aggregate, ClientUpdate

if TYPE_CHECKING:  # the server half runs where torch need not be imported (the parameter server)
    import torch
    from torch import nn


@dataclass
class ClientContext:
    """One client's round: the worker's model (global weights already loaded), data view and randomness."""

    client: int
    round_idx: int
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    indices: np.ndarray
    generator: torch.Generator
    state: Any = None  # what client_update returned as state last time this client trained (None at first)
    work: dict[str, Any] = field(default_factory=dict)  # train.* overrides for this client (load balancing)


class Algorithm(Protocol):
    """A federated algorithm. Runtimes call `client_update` on workers and `server_update` on the server."""

    #: True if clients keep state across rounds (then a runtime keeps each client on one worker).
    stateful_clients: bool

    def client_update(self, ctx: ClientContext, global_weights: np.ndarray) -> tuple[ClientUpdate, Any]:
        """Train one client from the global weights; return its update and its state to keep."""
        ...

    def server_update(self, global_weights: np.ndarray, aggregate: Aggregate) -> np.ndarray:
        """Turn the round's aggregated updates into the next global weights."""
        ...
