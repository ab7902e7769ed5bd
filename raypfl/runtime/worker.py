"""A client worker: trains cohorts of clients on one model in place and returns ONE partial sum per round.

It is the body of a Ray client actor and of the sequential runtime alike; it never knows which
algorithm it runs, only that the algorithm has a client half.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
import torch

from raypfl import seeding
from raypfl.aggregate import Aggregate
from raypfl.algorithms.base import ClientContext
from raypfl.models import build_model
from raypfl.runtime.setup import FederationSetup
from raypfl.training import evaluate
from raypfl.weights import set_flat


def _tensor(array: np.ndarray) -> torch.Tensor:
    """Wrap a (possibly read-only, shared-memory) array without copying it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Ray's zero-copy arrays are read-only; we never write
        return torch.from_numpy(array)


def client_seed(root: int, round_idx: int, client: int) -> int:
    """The seed of one client's training in one round, whoever trains it."""
    return seeding.derive_seed(root, seeding.CLIENT, round_idx, client)


class ClientWorker:
    """Holds one model, a view of the training data and the state of the clients it trains."""

    def __init__(self, setup: FederationSetup, rebuild_model: bool = False):
        torch.set_num_threads(setup.torch_threads)
        self.rebuild_model = rebuild_model  # build a fresh model per client (the "faithful" seed-system mode)
        self.setup = setup
        self.algorithm = setup.algorithm
        data = setup.dataset
        self.x, self.y = _tensor(data.train_x), _tensor(data.train_y)
        self.test_x, self.test_y = _tensor(data.test_x), _tensor(data.test_y)
        torch.manual_seed(setup.seed)  # weights are overwritten before use; this keeps init cheap and quiet
        self.model = self._new_model()
        self.client_states: dict[int, Any] = {}

    def _new_model(self) -> torch.nn.Module:
        data = self.setup.dataset
        return build_model(self.setup.model_name, data.in_shape, data.num_classes)

    def train_cohort(
        self, global_weights: np.ndarray, round_idx: int, clients: list[int]
    ) -> tuple[Aggregate, list[dict[str, float]]]:
        """Train `clients` from `global_weights`; return their weighted partial sum and per-client metrics."""
        partial = Aggregate()
        metrics: list[dict[str, float]] = []
        for client in clients:
            start = time.perf_counter()
            seed = client_seed(self.setup.seed, round_idx, client)
            if self.rebuild_model:
                self.model = self._new_model()
            torch.manual_seed(seed)  # dropout and any other torch randomness of this client
            set_flat(self.model, global_weights)
            ctx = ClientContext(
                client=client,
                round_idx=round_idx,
                model=self.model,
                x=self.x,
                y=self.y,
                indices=self.setup.partition.indices(client, round_idx),
                generator=torch.Generator().manual_seed(seed),
                state=self.client_states.get(client),
            )
            update, state = self.algorithm.client_update(ctx, global_weights)
            if self.algorithm.stateful_clients:
                self.client_states[client] = state
            accepted = partial.add(update)
            metrics.append(
                {
                    "round": round_idx,
                    "client": client,
                    **update.metrics,
                    "accepted": accepted,
                    "seconds": time.perf_counter() - start,
                }
            )
        return partial, metrics

    def evaluate(self, weights: np.ndarray, start: int, stop: int) -> tuple[float, int, int]:
        """(summed loss, correct, count) of `weights` on test samples [start, stop)."""
        set_flat(self.model, weights)
        return evaluate(self.model, self.test_x[start:stop], self.test_y[start:stop])

    def ready(self) -> bool:
        """Answers once the worker is built (data mapped, model made)."""
        return True

    def num_clients_with_state(self) -> int:
        return len(self.client_states)
