"""Each client's own test set: `partition.client_test_fraction` of every client's samples held out.

The split is seeded per client (`seeding.HOLDOUT`), so it is the same on every runtime and every resume.
A client keeps at least one sample to train on and one to test on. The held-out samples never train:
`indices` (or `client_data`, for generated data) return the rest, and `size` counts the rest, so
aggregation weights and load balancing see the training part only.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from raypfl import seeding
from raypfl.errors import ConfigError

KEY = "partition.client_test_fraction"


class HeldOutPartition:
    """A static partition with a held-out test part per client (`test_indices`)."""

    def __init__(self, base, fraction: float, seed: int) -> None:
        self.base = base
        self.fraction = float(fraction)
        self.seed = int(seed)
        self.num_clients = base.num_clients
        sizes = np.asarray(base.sizes())
        small = np.flatnonzero(sizes < 2)
        if small.size:
            raise ConfigError(
                f"{KEY}={fraction}: client {int(small[0])} has {int(sizes[small[0]])} sample(s); "
                "every client needs at least 2 (one to train on, one to test on)"
            )
        self._split = lru_cache(maxsize=None)(self._draw)

    def _draw(self, client: int) -> tuple[np.ndarray, np.ndarray]:
        """(training positions, test positions) within the client's samples, each sorted."""
        n = self.base.size(client)
        n_test = min(n - 1, max(1, round(self.fraction * n)))
        order = seeding.rng(self.seed, seeding.HOLDOUT, client).permutation(n)
        return np.sort(order[n_test:]), np.sort(order[:n_test])

    def indices(self, client: int, round_idx: int = 1) -> np.ndarray:
        return self.base.indices(client, round_idx)[self._split(client)[0]]

    def test_indices(self, client: int) -> np.ndarray:
        """The client's held-out samples (indices into the training arrays)."""
        return self.base.indices(client)[self._split(client)[1]]

    def size(self, client: int) -> int:
        return int(self._split(client)[0].size)

    def sizes(self) -> np.ndarray:
        return np.array([self.size(c) for c in range(self.num_clients)], dtype=np.int64)

    def __getstate__(self) -> dict:  # the cache is rebuilt where the partition is unpickled
        return {k: v for k, v in self.__dict__.items() if k != "_split"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._split = lru_cache(maxsize=None)(self._draw)

    def __repr__(self) -> str:
        return f"HeldOut({self.base!r}, client_test_fraction={self.fraction})"


class HeldOutGenerated(HeldOutPartition):
    """The same for a partition that generates each client's data (`client_data`, e.g. synthetic)."""

    def indices(self, client: int, round_idx: int = 1) -> np.ndarray:
        return np.arange(self.size(client), dtype=np.int64)

    def test_indices(self, client: int) -> np.ndarray:
        return np.arange(self._split(client)[1].size, dtype=np.int64)

    def client_data(self, client: int, round_idx: int = 1) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.base.client_data(client, round_idx)
        keep = self._split(client)[0]
        return x[keep], y[keep]

    def client_test_data(self, client: int) -> tuple[np.ndarray, np.ndarray]:
        """The client's held-out samples: x, y."""
        x, y = self.base.client_data(client)
        held = self._split(client)[1]
        return x[held], y[held]


def hold_out(partition, fraction: float | None, seed: int):
    """`partition` with `fraction` of each client held out (unchanged when fraction is None)."""
    if fraction is None:
        return partition
    cls = HeldOutGenerated if hasattr(partition, "client_data") else HeldOutPartition
    return cls(partition, fraction, seed)
