"""Split a training set across clients.

Partitioners (``partition=NAME``; knobs under ``partition.*``):

- ``iid``: random permutation cut into equal shards.
- ``contiguous``: equal contiguous shards in dataset order, unshuffled.
- ``dirichlet``: label skew, per-class proportions ~ Dirichlet(alpha); knobs ``alpha``, ``min_size``.
- ``shards``: McMahan et al.'s pathological non-IID: label-sorted shards, ``k`` per client.
- ``quantity_skew``: client sizes uniform in [``min_size``, ``max_size``], disjoint samples.
- ``fresh_slices``: every client gets a new, unseen slice of ``slice_size`` samples every round.

All randomness comes from ``seeding.rng(seed, PARTITION, ...)``: the same seed gives the same partition.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from numbers import Integral, Real
from typing import Any, Protocol, runtime_checkable

import numpy as np

from raypfl.errors import ConfigError
from raypfl.seeding import PARTITION, rng

__all__ = ["PARTITIONERS", "FreshSlicePartition", "Partition", "StaticPartition", "build_partition"]

_DIRICHLET_TRIES = 100


@runtime_checkable
class Partition(Protocol):
    """Which training-set indices each client uses in each round."""

    num_clients: int

    def indices(self, client: int, round_idx: int) -> np.ndarray:
        """int64 indices into the training set for `client` in round `round_idx` (from 1)."""
        ...

    def size(self, client: int) -> int:
        """Number of samples `client` holds per round."""
        ...


def _check_client(client: int, num_clients: int) -> int:
    if not 0 <= client < num_clients:
        raise IndexError(f"client {client} out of range [0, {num_clients})")
    return int(client)


class StaticPartition:
    """A fixed index array per client; the same every round."""

    def __init__(self, client_indices: list[np.ndarray]) -> None:
        arrays = []
        for idx in client_indices:
            arr = np.array(idx, dtype=np.int64).reshape(-1)
            arr.setflags(write=False)  # shared with callers: keep it immutable
            arrays.append(arr)
        self._indices = arrays
        self.num_clients = len(arrays)

    def indices(self, client: int, round_idx: int = 1) -> np.ndarray:
        """The client's indices (read-only); `round_idx` is ignored."""
        return self._indices[_check_client(client, self.num_clients)]

    def size(self, client: int) -> int:
        return int(self._indices[_check_client(client, self.num_clients)].size)

    def sizes(self) -> np.ndarray:
        """Samples per client, as an int64 array of length num_clients."""
        return np.array([a.size for a in self._indices], dtype=np.int64)

    def __repr__(self) -> str:
        return f"StaticPartition(num_clients={self.num_clients}, total={int(self.sizes().sum())})"


class FreshSlicePartition:
    """Each (round, client) slot reads the next `slice_size` samples of an endless stream.

    Slot ``s = (round_idx - 1) * num_clients + client`` takes positions ``[s*slice_size, (s+1)*slice_size)``
    of a stream made of passes; pass ``p`` is a permutation drawn from ``rng(seed, PARTITION, p)``.
    Within a pass no sample repeats; a slice that straddles two passes (and slices from different
    passes) may share samples. Slices are computed on demand; the few most recent pass permutations
    are cached.
    """

    _CACHE_PASSES = 4

    def __init__(self, num_samples: int, num_clients: int, slice_size: int, seed: int) -> None:
        self.num_samples = int(num_samples)
        self.num_clients = int(num_clients)
        self.slice_size = int(slice_size)
        self.seed = int(seed)
        self._passes: dict[int, np.ndarray] = {}

    def _pass(self, p: int) -> np.ndarray:
        perm = self._passes.get(p)
        if perm is None:
            perm = rng(self.seed, PARTITION, p).permutation(self.num_samples).astype(np.int64)
            if len(self._passes) >= self._CACHE_PASSES:
                del self._passes[min(self._passes)]  # rounds move forward: drop the oldest pass
            self._passes[p] = perm
        return perm

    def indices(self, client: int, round_idx: int) -> np.ndarray:
        """The `slice_size` indices of this client's slot in round `round_idx` (from 1)."""
        client = _check_client(client, self.num_clients)
        if round_idx < 1:
            raise ValueError(f"round_idx={round_idx} must be >= 1")
        start = ((int(round_idx) - 1) * self.num_clients + client) * self.slice_size
        end = start + self.slice_size
        n = self.num_samples
        p0, p1 = start // n, (end - 1) // n
        if p0 == p1:
            return self._pass(p0)[start - p0 * n : end - p0 * n].copy()
        return np.concatenate([self._pass(p0)[start - p0 * n :], self._pass(p1)[: end - p1 * n]])

    def size(self, client: int) -> int:
        _check_client(client, self.num_clients)
        return self.slice_size

    def __repr__(self) -> str:
        return f"FreshSlicePartition(num_clients={self.num_clients}, slice_size={self.slice_size})"


# --- knob validation ----------------------------------------------------------------------------


def _int_knob(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ConfigError(f"partition.{key}={value!r} must be an integer >= {minimum}")
    if value < minimum:
        raise ConfigError(f"partition.{key}={value} must be >= {minimum}")
    return int(value)


def _positive_float_knob(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ConfigError(f"partition.{key}={value!r} must be a finite number > 0")
    if value <= 0:
        raise ConfigError(f"partition.{key}={value} must be > 0")
    return float(value)


def _need_samples(num_clients: int, n: int, per_client: int, why: str) -> None:
    if num_clients * per_client > n:
        raise ConfigError(
            f"clients.num={num_clients} needs >= {num_clients * per_client} samples ({why}) "
            f"but the dataset has {n}"
        )


# --- partitioners -------------------------------------------------------------------------------


def iid(labels: np.ndarray, num_clients: int, seed: int) -> StaticPartition:
    """Random permutation split into `num_clients` equal shards (sizes differ by at most 1)."""
    _need_samples(num_clients, len(labels), 1, "one per client")
    perm = rng(seed, PARTITION).permutation(len(labels))
    return StaticPartition(np.array_split(perm, num_clients))


def contiguous(labels: np.ndarray, num_clients: int, seed: int) -> StaticPartition:
    """Equal contiguous shards in dataset order, unshuffled; client 0 gets the first chunk."""
    _need_samples(num_clients, len(labels), 1, "one per client")
    return StaticPartition(np.array_split(np.arange(len(labels)), num_clients))


def dirichlet(
    labels: np.ndarray, num_clients: int, seed: int, *, alpha: float = 0.5, min_size: int = 10
) -> StaticPartition:
    """Label skew: each class is split across clients by proportions ~ Dirichlet(alpha).

    Redrawn (up to 100 times) until every client holds >= `min_size` samples; smaller alpha = more skew.
    """
    alpha = _positive_float_knob("alpha", alpha)
    min_size = _int_knob("min_size", min_size, 0)
    _need_samples(num_clients, len(labels), max(min_size, 1), f"partition.min_size={min_size} per client")
    gen = rng(seed, PARTITION)
    by_class = [gen.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    for _ in range(_DIRICHLET_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx in by_class:
            props = gen.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        client_indices = [np.concatenate(p) for p in parts]
        if min(len(c) for c in client_indices) >= min_size:
            return StaticPartition(client_indices)
    raise ConfigError(
        f"partition=dirichlet: no draw in {_DIRICHLET_TRIES} tries gave all clients.num={num_clients} "
        f"clients >= partition.min_size={min_size} samples; raise partition.alpha={alpha} "
        f"or lower partition.min_size"
    )


def shards(labels: np.ndarray, num_clients: int, seed: int, *, k: int = 2) -> StaticPartition:
    """Pathological non-IID (McMahan et al.): label-sorted data cut in num_clients*k shards, k per client."""
    k = _int_knob("k", k, 1)
    _need_samples(num_clients, len(labels), k, f"partition.k={k} non-empty shards per client")
    order = np.argsort(labels, kind="stable")
    pieces = np.array_split(order, num_clients * k)
    assignment = rng(seed, PARTITION).permutation(num_clients * k).reshape(num_clients, k)
    return StaticPartition([np.concatenate([pieces[s] for s in row]) for row in assignment])


def quantity_skew(
    labels: np.ndarray, num_clients: int, seed: int, *, min_size: int = 100, max_size: int = 2000
) -> StaticPartition:
    """Client sizes uniform on the integers [min_size, max_size]; disjoint samples from one permutation."""
    min_size = _int_knob("min_size", min_size, 1)
    max_size = _int_knob("max_size", max_size, 1)
    if min_size > max_size:
        raise ConfigError(f"partition.min_size={min_size} must be <= partition.max_size={max_size}")
    gen = rng(seed, PARTITION)
    sizes = gen.integers(min_size, max_size, size=num_clients, endpoint=True)
    total = int(sizes.sum())
    if total > len(labels):
        raise ConfigError(
            f"partition=quantity_skew drew {total} samples for clients.num={num_clients} but the dataset has "
            f"{len(labels)}; lower partition.max_size={max_size} or clients.num"
        )
    perm = gen.permutation(len(labels))
    return StaticPartition(np.split(perm[:total], np.cumsum(sizes)[:-1]))


def fresh_slices(
    labels: np.ndarray, num_clients: int, seed: int, *, slice_size: int = 50
) -> FreshSlicePartition:
    """A new slice of `slice_size` samples per client per round, read from a stream of seeded passes."""
    slice_size = _int_knob("slice_size", slice_size, 1)
    if slice_size > len(labels):
        raise ConfigError(f"partition.slice_size={slice_size} must be <= dataset size {len(labels)}")
    return FreshSlicePartition(len(labels), num_clients, slice_size, seed)


PARTITIONERS: dict[str, Callable[..., Partition]] = {
    "iid": iid,
    "contiguous": contiguous,
    "dirichlet": dirichlet,
    "shards": shards,
    "quantity_skew": quantity_skew,
    "fresh_slices": fresh_slices,
}


def _knob_names(builder: Callable[..., Partition]) -> list[str]:
    params = inspect.signature(builder).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def build_partition(
    name: str, params: Mapping[str, Any], labels: np.ndarray, num_clients: int, seed: int
) -> Partition:
    """Build partitioner `name` with knobs `params` (the key `name` is ignored) over `labels`."""
    builder = PARTITIONERS.get(name)
    if builder is None:
        raise ConfigError(f"unknown partition={name} (choose from: {', '.join(PARTITIONERS)})")
    knobs = {str(k): v for k, v in (params or {}).items() if k != "name"}
    allowed = _knob_names(builder)
    unknown = sorted(set(knobs) - set(allowed))
    if unknown:
        names = ", ".join(f"partition.{k}" for k in unknown)
        raise ConfigError(
            f"unknown key {names} for partition={name} (allowed: {', '.join(allowed) or 'none'})"
        )
    if isinstance(num_clients, bool) or not isinstance(num_clients, Integral) or num_clients < 1:
        raise ConfigError(f"clients.num={num_clients!r} must be an integer >= 1")
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ConfigError(f"partition={name} needs a non-empty 1-D label array, got shape {labels.shape}")
    return builder(labels, int(num_clients), int(seed), **knobs)
