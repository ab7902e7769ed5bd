"""What every worker of a federation is built from: the same object on every runtime."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from raypfl.algorithms.base import Algorithm
from raypfl.config import FaultsSpec
from raypfl.data.datasets import Dataset
from raypfl.data.partitions import Partition
from raypfl.models.zoo import ModelSpec


@dataclass(frozen=True)
class FederationSetup:
    """Dataset (shared, read-only), partition (clients as index arrays), model, algorithm, seed, faults.

    `model` is a small picklable spec (a shipped name, or a factory's path and its keyword arguments):
    every worker (Ray actor, MPI rank, the driver) builds the same model from it with `build_model`.
    """

    dataset: Dataset
    partition: Partition
    model: ModelSpec
    algorithm: Algorithm
    seed: int
    torch_threads: int = 1
    faults: FaultsSpec | None = None  # injected faults and retry policy (None: none)
    speed: np.ndarray | None = None  # per-client slowdown factors >= 1 (None: every client at full speed)
    vectorize: bool = False  # train a worker's clients in lock-step (`runtime.vectorize`)
    eval_local: int = 0  # test each client's local model on this many test images (`train.eval_clients`)
    attack: Any = None  # raypfl.attacks.Attack: the malicious clients and what they do (None: no attack)
    postprocess: Any = None  # raypfl.postprocess.ClientPipeline: client steps on each update (None: none)
    finalize: Any = None  # raypfl.runtime.finalize.RoundFinalizer: robust aggregator, server steps (None)

    @property
    def stacks(self) -> bool:
        """True if workers send their clients' updates stacked (a robust aggregator needs each of them)."""
        return self.finalize is not None and self.finalize.aggregator is not None

    @property
    def stateful_clients(self) -> bool:
        """True if clients keep state across rounds: the algorithm's or a postprocessor's (error feedback)."""
        return self.algorithm.stateful_clients or bool(
            self.postprocess is not None and self.postprocess.stateful
        )
