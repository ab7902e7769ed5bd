"""Split a training set across clients.

Partitioners (``partition=NAME``; knobs under ``partition.*``):

- ``iid``: random permutation cut into equal shards.
- ``contiguous``: equal contiguous shards in dataset order, unshuffled.
- ``dirichlet``: label skew, per-class proportions ~ Dirichlet(alpha); knobs ``alpha``, ``min_size``.
- ``shards``: McMahan et al.'s pathological non-IID: label-sorted shards, ``k`` per client.
- ``quantity_skew``: client sizes uniform in [``min_size``, ``max_size``], disjoint samples.
- ``fresh_slices``: every client gets a new, unseen slice of ``slice_size`` samples every round.
- ``natural``: the dataset's own clients (writers, users): client k holds the samples of the k-th distinct
  client id in sorted order; ``clients.num`` must be their number.

A partitioner of the user's own: ``partition._target_: package.function``, called as
``function(labels, num_clients, seed, **kwargs)`` (plus ``client_ids=`` if its signature names it) with the
other keys of ``partition.*`` as keyword arguments; it returns one index array per client, checked
(as many as ``clients.num``, each non-empty, indices in range, no index given twice).

All randomness comes from ``seeding.rng(seed, PARTITION, ...)``: the same seed gives the same partition.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from numbers import Integral, Real
from typing import Any, Protocol, runtime_checkable

import numpy as np

from raypfl.data.registry import RESERVED as _TARGET_KEYS
from raypfl.data.registry import accepts, check_arguments, locate, node_dict, reason
from raypfl.errors import ConfigError
from raypfl.seeding import PARTITION, rng

__all__ = [
    "PARTITIONERS",
    "FreshSlicePartition",
    "Partition",
    "StaticPartition",
    "RESERVED",
    "build_partition",
    "check_partition_target",
]

#: Keys of `partition.*` that no partitioner takes: its name, a function of the user's, and the held-out
#: fraction every partition may have (applied after partitioning, raypfl.data.holdout).
RESERVED = (*_TARGET_KEYS, "client_test_fraction")

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


def natural(
    labels: np.ndarray, num_clients: int, seed: int, client_ids: np.ndarray | None = None
) -> StaticPartition:
    """The dataset's own clients: client k holds the samples of the k-th distinct client id (sorted order)."""
    if client_ids is None:
        raise ConfigError(
            "partition=natural needs a dataset with client ids (a dataset._target_ function that returns "
            "client_ids); this dataset has none"
        )
    codes = np.unique(np.asarray(client_ids), return_inverse=True)[1].reshape(-1)
    if len(codes) != len(labels):
        raise ConfigError(f"partition=natural: {len(codes)} client ids for {len(labels)} training samples")
    found = int(codes.max()) + 1 if len(codes) else 0
    if found != num_clients:
        raise ConfigError(
            f"partition=natural: the dataset has {found} clients (distinct client ids): set "
            f"clients.num={found} (not {num_clients})"
        )
    order = np.argsort(codes, kind="stable")  # each client's samples in dataset order
    return StaticPartition(np.split(order, np.cumsum(np.bincount(codes, minlength=found))[:-1]))


PARTITIONERS: dict[str, Callable[..., Partition]] = {
    "iid": iid,
    "contiguous": contiguous,
    "dirichlet": dirichlet,
    "shards": shards,
    "quantity_skew": quantity_skew,
    "fresh_slices": fresh_slices,
    "natural": natural,
}
#: How raypfl calls a partitioner (the shipped ones and a `partition._target_`).
CALL = "(labels, num_clients, seed, **kwargs)"


def _knob_names(builder: Callable[..., Partition]) -> list[str]:
    params = inspect.signature(builder).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def _check_call(name: str, num_clients: int, labels: np.ndarray) -> None:
    """clients.num is a count and the labels a non-empty 1-D array."""
    if isinstance(num_clients, bool) or not isinstance(num_clients, Integral) or num_clients < 1:
        raise ConfigError(f"clients.num={num_clients!r} must be an integer >= 1")
    if labels.ndim != 1 or labels.size == 0:
        raise ConfigError(f"partition{name} needs a non-empty 1-D label array, got shape {labels.shape}")


def build_partition(
    name: str,
    params: Mapping[str, Any],
    labels: np.ndarray,
    num_clients: int,
    seed: int,
    client_ids: np.ndarray | None = None,
) -> Partition:
    """Build partitioner `name` with knobs `params` over `labels`; a `_target_` in `params` (a function of the
    user's own) wins over `name`. `client_ids` (the dataset's, if any) go to a partitioner that takes them."""
    data = node_dict(params)
    target = data.get("_target_")
    knobs = {str(k): v for k, v in data.items() if k not in RESERVED}
    labels = np.asarray(labels)
    if target:
        _check_call(f"._target_={target}", num_clients, labels)
        return _custom_partition(str(target), knobs, labels, int(num_clients), int(seed), client_ids)
    builder = PARTITIONERS.get(name)
    if builder is None:
        raise ConfigError(f"unknown partition={name} (choose from: {', '.join(PARTITIONERS)})")
    allowed = _knob_names(builder)
    unknown = sorted(set(knobs) - set(allowed))
    if unknown:
        names = ", ".join(f"partition.{k}" for k in unknown)
        raise ConfigError(
            f"unknown key {names} for partition={name} (allowed: {', '.join(allowed) or 'none'})"
        )
    _check_call(f"={name}", num_clients, labels)
    if accepts(builder, "client_ids"):
        knobs["client_ids"] = client_ids
    return builder(labels, int(num_clients), int(seed), **knobs)


def check_partition_target(target: str, params: Mapping[str, Any]) -> Callable[..., Any]:
    """The function `partition._target_` names, checked to take (labels, num_clients, seed) and the keys of
    `partition.*` (nothing is called)."""
    fn = locate("partition._target_", target)
    knobs = {str(k): v for k, v in node_dict(params).items() if k not in RESERVED}
    supplied = ["client_ids"] if accepts(fn, "client_ids") else []
    where = f"partition._target_={target}"
    check_arguments(fn, knobs, "partition", where, positional=3, supplied=supplied, expected=CALL)
    return fn


def _custom_partition(
    target: str,
    knobs: dict[str, Any],
    labels: np.ndarray,
    num_clients: int,
    seed: int,
    client_ids: np.ndarray | None,
) -> StaticPartition:
    """Call `partition._target_` and check its index arrays: one per client, non-empty, in range, disjoint."""
    fn = check_partition_target(target, knobs)
    key = f"partition._target_={target}"
    if accepts(fn, "client_ids"):
        knobs = {**knobs, "client_ids": client_ids}
    try:
        result = fn(labels, num_clients, seed, **knobs)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{key}: it raised {reason(exc)}") from None
    if isinstance(result, (str, bytes, Mapping)) or not hasattr(result, "__len__"):
        what = type(result).__name__
        raise ConfigError(f"{key} returned a {what}; expected a list of index arrays, one per client")
    if len(result) != num_clients:
        raise ConfigError(f"{key} returned {len(result)} index arrays for clients.num={num_clients}")
    n = len(labels)
    parts = []
    for client, idx in enumerate(result):
        arr = np.asarray(idx.detach().cpu().numpy() if hasattr(idx, "detach") else idx).reshape(-1)
        if arr.size == 0:
            raise ConfigError(f"{key}: client {client} has no samples (an empty index array)")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ConfigError(f"{key}: client {client}'s indices have dtype {arr.dtype}; expected integers")
        outside = arr[(arr < 0) | (arr >= n)]
        if outside.size:
            raise ConfigError(
                f"{key}: client {client} has index {int(outside[0])}, outside the training set [0, {n})"
            )
        parts.append(arr.astype(np.int64))
    joined = np.concatenate(parts)
    if np.unique(joined).size != joined.size:
        owner = np.repeat(np.arange(num_clients), [len(p) for p in parts])
        order = np.argsort(joined, kind="stable")
        first = int(np.flatnonzero(joined[order][1:] == joined[order][:-1])[0])
        a, b = int(owner[order][first]), int(owner[order][first + 1])
        index = int(joined[order][first])
        who = f"client {a} lists it twice" if a == b else f"clients {a} and {b} both have it"
        raise ConfigError(f"{key}: index {index} is given more than once ({who}); clients must be disjoint")
    return StaticPartition(parts)
