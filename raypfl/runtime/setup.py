"""What every worker of a federation is built from: the same object on every runtime."""

from __future__ import annotations

from dataclasses import dataclass

from raypfl.algorithms.base import Algorithm
from raypfl.data.datasets import Dataset
from raypfl.data.partitions import Partition


@dataclass(frozen=True)
class FederationSetup:
    """Dataset (shared, read-only), partition (clients as index arrays), model, algorithm and root seed."""

    dataset: Dataset
    partition: Partition
    model_name: str
    algorithm: Algorithm
    seed: int
    torch_threads: int = 1
