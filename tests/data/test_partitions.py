from __future__ import annotations

import numpy as np
import pytest

from raypfl.data.partitions import (
    PARTITIONERS,
    FreshSlicePartition,
    Partition,
    StaticPartition,
    build_partition,
)
from raypfl.errors import ConfigError

N_CLASSES = 10
N = 6000


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return np.random.default_rng(1234).permutation(np.repeat(np.arange(N_CLASSES), N // N_CLASSES))


def all_indices(part: Partition, round_idx: int = 1) -> list[np.ndarray]:
    return [part.indices(c, round_idx) for c in range(part.num_clients)]


def assert_disjoint(parts: list[np.ndarray]) -> np.ndarray:
    joined = np.concatenate(parts)
    assert np.unique(joined).size == joined.size, "clients share samples"
    return joined


def assert_disjoint_cover(parts: list[np.ndarray], n: int = N) -> None:
    joined = assert_disjoint(parts)
    assert np.array_equal(np.sort(joined), np.arange(n)), "partition does not cover the dataset"


def distinct_labels(part: Partition, labels: np.ndarray) -> np.ndarray:
    return np.array([np.unique(labels[i]).size for i in all_indices(part)])


def test_registry_and_protocol(labels):
    assert set(PARTITIONERS) == {
        "iid", "contiguous", "dirichlet", "shards", "quantity_skew", "fresh_slices", "natural"
    }  # fmt: skip
    for name in PARTITIONERS:
        params = {"max_size": 300} if name == "quantity_skew" else {}
        ids = np.arange(N) % 20  # natural: the dataset's own clients
        part = build_partition(name, params, labels, 20, seed=0, client_ids=ids)
        assert isinstance(part, Partition)
        assert part.num_clients == 20
        for c in (0, 19):
            idx = part.indices(c, 1)
            assert idx.dtype == np.int64
            assert idx.size == part.size(c)
            assert idx.min() >= 0 and idx.max() < N


@pytest.mark.parametrize("name", ["iid", "contiguous"])
def test_equal_shards(name, labels):
    part = build_partition(name, {"name": name}, labels, 7, seed=3)  # 6000/7: sizes 858 and 857
    assert isinstance(part, StaticPartition)
    sizes = part.sizes()
    assert sizes.max() - sizes.min() <= 1
    assert sizes.sum() == N
    assert_disjoint_cover(all_indices(part))
    assert np.array_equal(part.indices(2, 1), part.indices(2, 5)), "static partition changed across rounds"


def test_contiguous_in_order(labels):
    part = build_partition("contiguous", {}, labels, 7, seed=3)
    assert np.array_equal(np.concatenate(all_indices(part)), np.arange(N))
    assert part.indices(0, 1)[0] == 0


def test_iid_shuffled_and_seeded(labels):
    a = build_partition("iid", {}, labels, 10, seed=3)
    b = build_partition("iid", {}, labels, 10, seed=3)
    c = build_partition("iid", {}, labels, 10, seed=4)
    joined = np.concatenate(all_indices(a))
    assert not np.array_equal(joined, np.arange(N))
    assert all(np.array_equal(x, y) for x, y in zip(all_indices(a), all_indices(b)))
    assert not np.array_equal(joined, np.concatenate(all_indices(c)))
    # iid clients see (nearly) every label
    assert distinct_labels(a, labels).min() == N_CLASSES


def test_dirichlet_disjoint_cover_min_size(labels):
    part = build_partition("dirichlet", {"alpha": 0.3, "min_size": 40}, labels, 20, seed=0)
    assert_disjoint_cover(all_indices(part))
    assert part.sizes().min() >= 40
    again = build_partition("dirichlet", {"alpha": 0.3, "min_size": 40}, labels, 20, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip(all_indices(part), all_indices(again)))


def test_dirichlet_skew_grows_as_alpha_shrinks(labels):
    def skew(alpha: float) -> tuple[float, float]:
        part = build_partition("dirichlet", {"alpha": alpha, "min_size": 10}, labels, 10, seed=0)
        hists = np.stack([np.bincount(labels[i], minlength=N_CLASSES) / i.size for i in all_indices(part)])
        tv = 0.5 * np.abs(hists - 1 / N_CLASSES).sum(axis=1).mean()  # total variation from uniform
        return float(distinct_labels(part, labels).mean()), float(tv)

    labels_skewed, tv_skewed = skew(0.1)
    labels_flat, tv_flat = skew(100.0)
    assert labels_flat == N_CLASSES
    assert labels_skewed < 0.7 * N_CLASSES
    assert tv_skewed > 0.5 > 0.1 > tv_flat


@pytest.mark.parametrize("alpha", [0, -1.0, 0.0])
def test_dirichlet_bad_alpha(alpha, labels):
    with pytest.raises(ConfigError, match=r"partition\.alpha"):
        build_partition("dirichlet", {"alpha": alpha}, labels, 10, seed=0)


def test_dirichlet_impossible_min_size(labels):
    with pytest.raises(ConfigError, match=r"partition\.min_size"):
        build_partition("dirichlet", {"alpha": 0.5, "min_size": 700}, labels, 10, seed=0)
    with pytest.raises(ConfigError, match=r"partition\.alpha"):  # feasible in count, hopeless at this alpha
        build_partition("dirichlet", {"alpha": 0.01, "min_size": 500}, labels, 10, seed=0)


def test_shards(labels):
    part = build_partition("shards", {"k": 2}, labels, 100, seed=0)  # 200 shards of 30, each one label
    assert isinstance(part, StaticPartition)
    assert set(part.sizes().tolist()) == {60}
    assert_disjoint_cover(all_indices(part))
    n_labels = distinct_labels(part, labels)
    assert n_labels.max() <= 2
    assert n_labels.mean() > 1.5  # two random shards rarely share a label
    other = build_partition("shards", {"k": 2}, labels, 100, seed=1)
    assert not all(np.array_equal(x, y) for x, y in zip(all_indices(part), all_indices(other)))


def test_shards_k1_and_bad_k(labels):
    part = build_partition("shards", {"k": 1}, labels, 10, seed=0)
    assert distinct_labels(part, labels).max() == 1
    with pytest.raises(ConfigError, match=r"partition\.k=0"):
        build_partition("shards", {"k": 0}, labels, 10, seed=0)


def test_quantity_skew(labels):
    part = build_partition("quantity_skew", {"min_size": 50, "max_size": 400}, labels, 20, seed=0)
    sizes = part.sizes()
    assert sizes.min() >= 50 and sizes.max() <= 400
    assert np.unique(sizes).size > 1
    assert_disjoint(all_indices(part))


def test_quantity_skew_errors(labels):
    with pytest.raises(ConfigError, match=r"partition\.max_size"):
        build_partition("quantity_skew", {}, labels, 100, seed=0)  # ~100 * 1050 >> 6000
    with pytest.raises(ConfigError, match=r"partition\.min_size=0"):
        build_partition("quantity_skew", {"min_size": 0}, labels, 5, seed=0)
    with pytest.raises(ConfigError, match=r"partition\.min_size=300"):
        build_partition("quantity_skew", {"min_size": 300, "max_size": 200}, labels, 5, seed=0)


def test_fresh_slices_disjoint_within_pass(labels):
    num_clients, slice_size = 10, 50
    part = build_partition("fresh_slices", {"slice_size": slice_size}, labels, num_clients, seed=0)
    assert isinstance(part, FreshSlicePartition)
    assert part.size(3) == slice_size
    rounds = N // (num_clients * slice_size)  # 12 rounds fill exactly one pass
    slices = [part.indices(c, r) for r in range(1, rounds + 1) for c in range(num_clients)]
    assert all(s.size == slice_size and s.dtype == np.int64 for s in slices)
    assert_disjoint_cover(slices)
    assert not np.array_equal(part.indices(0, 1), part.indices(0, 2))
    # the next pass is a different permutation and reuses samples
    nxt = part.indices(0, rounds + 1)
    assert not np.array_equal(nxt, part.indices(0, 1))
    assert np.isin(nxt, np.concatenate(slices)).all()


def test_fresh_slices_deterministic_and_straddling(labels):
    a = build_partition("fresh_slices", {"slice_size": 700}, labels, 3, seed=5)
    b = build_partition("fresh_slices", {"slice_size": 700}, labels, 3, seed=5)
    c = build_partition("fresh_slices", {"slice_size": 700}, labels, 3, seed=6)
    for r in (4, 1, 3, 2, 9):  # out of order, through the cache
        for client in range(3):
            assert np.array_equal(a.indices(client, r), b.indices(client, r))
    assert not np.array_equal(a.indices(0, 1), c.indices(0, 1))
    # slot 8 = round 3, client 2 covers positions [5600, 6300): crosses into pass 1
    straddle = a.indices(2, 3)
    assert straddle.size == 700 and straddle.dtype == np.int64
    assert np.unique(straddle[:400]).size == 400 and np.unique(straddle[400:]).size == 300


def test_fresh_slices_too_large(labels):
    with pytest.raises(ConfigError, match=r"partition\.slice_size"):
        build_partition("fresh_slices", {"slice_size": N + 1}, labels, 2, seed=0)


def test_unknown_name_and_knob(labels):
    with pytest.raises(ConfigError, match=r"unknown partition=nope \(choose from: .*dirichlet"):
        build_partition("nope", {}, labels, 10, seed=0)
    with pytest.raises(ConfigError, match=r"partition\.alpah"):
        build_partition("dirichlet", {"alpah": 0.5}, labels, 10, seed=0)
    with pytest.raises(ConfigError, match=r"partition\.alpha"):
        build_partition("iid", {"alpha": 0.5}, labels, 10, seed=0)


def test_too_many_clients(labels):
    with pytest.raises(ConfigError, match=r"clients\.num"):
        build_partition("iid", {}, labels, N + 1, seed=0)
    with pytest.raises(ConfigError, match=r"clients\.num"):
        build_partition("contiguous", {}, labels, 0, seed=0)


def test_static_partition_direct():
    part = StaticPartition([np.array([3, 1]), np.array([], dtype=np.int32), [0, 2, 4]])
    assert part.num_clients == 3
    assert part.sizes().tolist() == [2, 0, 3]
    assert part.size(2) == 3
    assert part.indices(2, 7).dtype == np.int64
    with pytest.raises(IndexError):
        part.indices(3, 1)
