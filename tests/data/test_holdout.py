"""Each client's own test set (`partition.client_test_fraction`, raypfl.data.holdout)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from raypfl.data.holdout import HeldOutGenerated, HeldOutPartition, hold_out
from raypfl.data.partitions import StaticPartition
from raypfl.data.synthetic import SyntheticPartition, SyntheticSpec
from raypfl.errors import ConfigError


def test_held_out_samples_are_a_seeded_disjoint_fraction_of_each_client():
    base = StaticPartition([np.arange(0, 100), np.arange(100, 110), np.arange(110, 112)])
    part = hold_out(base, 0.2, seed=3)
    assert isinstance(part, HeldOutPartition)
    for client, (n_train, n_test) in enumerate([(80, 20), (8, 2), (1, 1)]):
        train, test = part.indices(client, round_idx=5), part.test_indices(client)
        assert (len(train), len(test)) == (n_train, n_test) and part.size(client) == n_train
        assert set(train).isdisjoint(test) and set(train) | set(test) == set(base.indices(client))
    assert part.sizes().tolist() == [80, 8, 1]
    again, other = hold_out(base, 0.2, seed=3), hold_out(base, 0.2, seed=4)
    assert np.array_equal(again.test_indices(0), part.test_indices(0))  # same seed, same split
    assert not np.array_equal(other.test_indices(0), part.test_indices(0))
    copied = pickle.loads(pickle.dumps(part))  # what a Ray actor or MPI rank receives
    assert np.array_equal(copied.indices(0), part.indices(0))
    assert hold_out(base, None, seed=3) is base


def test_a_client_with_one_sample_cannot_hold_one_out():
    base = StaticPartition([np.arange(0, 10), np.array([10])])
    with pytest.raises(ConfigError, match=r"^partition\.client_test_fraction=0\.2: client 1 has 1 sample"):
        hold_out(base, 0.2, seed=0)


def test_generated_clients_hold_out_part_of_their_own_samples():
    base = SyntheticPartition(SyntheticSpec(), num_clients=3, seed=0)
    part = hold_out(base, 0.25, seed=0)
    assert isinstance(part, HeldOutGenerated)
    x_all, y_all = base.client_data(1)
    x, y = part.client_data(1, round_idx=2)
    x_test, y_test = part.client_test_data(1)
    assert len(y) + len(y_test) == len(y_all) == base.size(1)
    assert len(y_test) == round(0.25 * len(y_all)) and part.size(1) == len(y)
    assert np.array_equal(part.indices(1), np.arange(len(y)))
    rows = {tuple(r) for r in x_all}
    assert {tuple(r) for r in x} | {tuple(r) for r in x_test} == rows
    assert {tuple(r) for r in x}.isdisjoint({tuple(r) for r in x_test})
