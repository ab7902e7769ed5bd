"""Synthetic(alpha, beta) (Shamir et al. 2014; Li et al., FedProx 2020): a federation generated, not loaded.

Client k draws its own model and input distribution:

    u_k ~ N(0, alpha),  W_k (features x classes), b_k (classes) ~ N(u_k, 1)
    B_k ~ N(0, beta),   v_k (features) ~ N(B_k, 1)
    x ~ N(v_k, Sigma),  Sigma diagonal with Sigma_jj = j^-1.2,   y = argmax softmax(x W_k + b_k)

As in FedProx's generator, alpha and beta are standard deviations (numpy's `normal(0, alpha)`), and the
number of samples of client k is `int(LogNormal(size_log_mean, size_log_sigma)) + min_size` (FedProx: 4, 2,
50), optionally capped at `max_size`. With `iid=true` (FedProx's Synthetic-IID) every client shares one
W, b ~ N(0, 1) and v_k = B_k (all features).

Everything comes from the root seed (`seeding.SYNTHETIC`) and the client id alone: client k's size, model
and samples are the same whatever `clients.num` is, and are generated on demand in O(size_k). The only
per-client state is the int32 array of sizes (4 bytes a client). A client's data is the same every round.

The central test set is `test_samples` held-out samples (a separate stream from training) from each of the
clients 0 .. test_clients-1: the same test set for every `clients.num`, so federations of 1k and 100k
clients are evaluated on the same data (ids are i.i.d. draws, so the first ones are a uniform sample of the
population; when clients.num < test_clients the extra ones are unseen clients of the same population).
Every test client counts equally (FedProx pools each client's 10% split, so weights clients by size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from numbers import Integral, Real
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from raypfl.data.datasets import Dataset
from raypfl.errors import ConfigError
from raypfl.seeding import SYNTHETIC, rng

__all__ = ["NAME", "SyntheticPartition", "SyntheticSpec", "synthetic_dataset", "synthetic_spec"]

NAME = "synthetic"
# sub-streams of seeding.SYNTHETIC: (root, SYNTHETIC, stream, *keys)
_SIZES, _MODEL, _TRAIN, _TEST, _SHARED = range(5)


@dataclass(frozen=True)
class SyntheticSpec:
    """`dataset.*` for dataset=synthetic (see conf/dataset/synthetic.yaml)."""

    name: str = NAME
    alpha: float = 1.0
    beta: float = 1.0
    iid: bool = False
    num_features: int = 60
    num_classes: int = 10
    size_log_mean: float = 4.0
    size_log_sigma: float = 2.0
    min_size: int = 50
    max_size: int | None = None
    test_clients: int = 100
    test_samples: int = 100

    def __post_init__(self) -> None:
        for key in ("alpha", "beta", "size_log_sigma"):
            _number(key, getattr(self, key), minimum=0.0)
        _number("size_log_mean", self.size_log_mean)
        if not isinstance(self.iid, bool):
            raise ConfigError(f"dataset.iid={self.iid!r} must be true or false")
        for key, minimum in (
            ("num_features", 1),
            ("num_classes", 2),
            ("min_size", 1),
            ("test_clients", 1),
            ("test_samples", 1),
        ):
            _integer(key, getattr(self, key), minimum)
        if self.max_size is not None:
            _integer("max_size", self.max_size, self.min_size)


def _number(key: str, value: Any, minimum: float | None = None) -> None:
    bound = "" if minimum is None else f" >= {minimum:g}"
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ConfigError(f"dataset.{key}={value!r} must be a finite number{bound}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"dataset.{key}={value} must be{bound}")


def _integer(key: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ConfigError(f"dataset.{key}={value!r} must be an integer >= {minimum}")


def synthetic_spec(node: DictConfig | dict | None) -> SyntheticSpec:
    """The spec from the `dataset` config node; unknown keys and bad values are ConfigErrors naming them."""
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
    if data.get("_target_", 0) is None:  # the group's `_target_: null` (set, it names a dataset function)
        del data["_target_"]
    known = [f.name for f in fields(SyntheticSpec)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown key dataset.{unknown[0]} for dataset={NAME} (known: {', '.join(known)})")
    return SyntheticSpec(**data)


class _Generator:
    """Client k's generating model and samples, from (seed, k) only."""

    def __init__(self, spec: SyntheticSpec, seed: int) -> None:
        self.spec = spec
        self.seed = int(seed)
        self.std = np.arange(1, spec.num_features + 1, dtype=np.float64) ** -0.6  # sqrt(j^-1.2)
        self.shared = None
        if spec.iid:
            gen = rng(self.seed, SYNTHETIC, _SHARED)
            self.shared = (
                gen.normal(0.0, 1.0, (spec.num_features, spec.num_classes)),
                gen.normal(0.0, 1.0, spec.num_classes),
            )

    def model(self, client: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(W_k, b_k, v_k) of `client`."""
        s = self.spec
        gen = rng(self.seed, SYNTHETIC, _MODEL, client)
        u, big_b = gen.normal(0.0, s.alpha), gen.normal(0.0, s.beta)
        if self.shared is not None:
            return *self.shared, np.full(s.num_features, big_b)
        w = gen.normal(u, 1.0, (s.num_features, s.num_classes))
        b = gen.normal(u, 1.0, s.num_classes)
        return w, b, gen.normal(big_b, 1.0, s.num_features)

    def samples(self, client: int, n: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
        """`n` samples of `client` from sub-stream `stream`: x float32 (n, features), y int64 (n,)."""
        w, b, v = self.model(client)
        gen = rng(self.seed, SYNTHETIC, stream, client)
        x = (v + gen.standard_normal((n, self.spec.num_features)) * self.std).astype(np.float32)
        y = np.argmax(x @ w + b, axis=1).astype(np.int64)  # softmax is monotone: argmax of the logits
        return x, y


def client_sizes(spec: SyntheticSpec, num_clients: int, seed: int) -> np.ndarray:
    """int32 sample counts; client k's count does not depend on num_clients (one sequential stream)."""
    draws = rng(seed, SYNTHETIC, _SIZES).lognormal(spec.size_log_mean, spec.size_log_sigma, num_clients)
    np.floor(draws, out=draws)  # in place: 8 bytes a client at the peak, 4 kept
    draws += spec.min_size
    np.minimum(draws, spec.max_size if spec.max_size is not None else np.iinfo(np.int32).max, out=draws)
    sizes = draws.astype(np.int32)
    sizes.setflags(write=False)
    return sizes


class SyntheticPartition:
    """The Partition of dataset=synthetic: it also generates each client's data (`client_data`)."""

    def __init__(self, spec: SyntheticSpec, num_clients: int, seed: int) -> None:
        if isinstance(num_clients, bool) or not isinstance(num_clients, Integral) or num_clients < 1:
            raise ConfigError(f"clients.num={num_clients!r} must be an integer >= 1")
        self.spec = spec
        self.num_clients = int(num_clients)
        self.seed = int(seed)
        self._sizes = client_sizes(spec, self.num_clients, self.seed)
        self._gen = _Generator(spec, self.seed)

    def _check(self, client: int) -> int:
        if not 0 <= client < self.num_clients:
            raise IndexError(f"client {client} out of range [0, {self.num_clients})")
        return int(client)

    def size(self, client: int) -> int:
        return int(self._sizes[self._check(client)])

    def sizes(self) -> np.ndarray:
        """Samples per client (read-only int32, length num_clients)."""
        return self._sizes

    def indices(self, client: int, round_idx: int = 1) -> np.ndarray:
        """0 .. size-1: positions in the client's own generated arrays (`client_data`)."""
        return np.arange(self.size(client), dtype=np.int64)

    def client_data(self, client: int, round_idx: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """The client's training samples (the same every round): x float32 (n, features), y int64 (n,)."""
        return self._gen.samples(client, self.size(client), _TRAIN)

    def __repr__(self) -> str:
        s = self.spec
        return (
            f"SyntheticPartition(alpha={s.alpha}, beta={s.beta}, iid={s.iid}, num_clients={self.num_clients})"
        )


def synthetic_dataset(spec: SyntheticSpec, seed: int) -> Dataset:
    """Held-out test samples of clients 0..test_clients-1; no shared training arrays (shape (0, features))."""
    gen = _Generator(spec, seed)
    parts = [gen.samples(c, spec.test_samples, _TEST) for c in range(spec.test_clients)]
    test_x = np.ascontiguousarray(np.concatenate([x for x, _ in parts]))
    test_y = np.concatenate([y for _, y in parts])
    train_x = np.zeros((0, spec.num_features), np.float32)
    return Dataset(NAME, train_x, np.zeros(0, np.int64), test_x, test_y, num_classes=spec.num_classes)
