"""Seeded attacks (issue 16): who is malicious, what each kind sends, and label flipping on the worker."""

from __future__ import annotations

import numpy as np
import pytest

from raypfl.algorithms.aggregate import MODEL, ClientUpdate
from raypfl.attacks import DEFAULT_SCALE, Attack, malicious_clients


def update(client: int, values) -> ClientUpdate:
    vector = np.asarray(values, np.float32)
    return ClientUpdate(
        client, {MODEL: vector, "tau": np.ones(1)}, {MODEL: 2.0, "tau": 2.0}, {"train_loss": 1.0}
    )


def test_the_malicious_set_is_fixed_by_the_root_seed():
    chosen = malicious_clients(7, 100, 0.2)
    assert len(chosen) == 20 and chosen == malicious_clients(7, 100, 0.2)
    assert chosen != malicious_clients(8, 100, 0.2)
    assert malicious_clients(7, 100, 0.0) == frozenset()
    assert (
        Attack.build("none", 0.2, None, 100, 7) is None
        and Attack.build("sign_flip", 0.0, None, 100, 7) is None
    )


@pytest.mark.parametrize(("kind", "factor"), [("sign_flip", -4.0), ("scaled", 10.0)])
def test_update_attacks_scale_the_honest_update(kind, factor):
    attack = Attack.build(kind, 0.5, None, 10, 0)
    bad, good = min(attack.malicious), min(set(range(10)) - attack.malicious)
    honest = update(bad, [1.0, -2.0, 0.5])
    poisoned = attack.poison_update(honest, 3)
    np.testing.assert_array_equal(poisoned.statistics[MODEL], factor * honest.statistics[MODEL])
    assert poisoned.statistics["tau"] is honest.statistics["tau"] and poisoned.weights == honest.weights
    assert poisoned.metrics["malicious"] == 1.0 and DEFAULT_SCALE[kind] == abs(factor)
    assert attack.poison_update(update(good, [1.0]), 3).metrics.get("malicious") is None  # honest: untouched
    custom = Attack.build(kind, 0.5, 2.0, 10, 0).poison_update(honest, 3)
    np.testing.assert_array_equal(custom.statistics[MODEL], np.sign(factor) * 2.0 * honest.statistics[MODEL])


def test_gaussian_attack_is_seeded_per_round_and_client():
    attack = Attack.build("gaussian", 0.5, 3.0, 10, 0)
    bad = sorted(attack.malicious)
    first = attack.poison_update(update(bad[0], np.zeros(20000)), 1).statistics[MODEL]
    assert first.dtype == np.float32 and abs(first.std() - 3.0) < 0.1
    again = attack.poison_update(update(bad[0], np.zeros(20000)), 1).statistics[MODEL]
    np.testing.assert_array_equal(first, again)
    other = attack.poison_update(update(bad[0], np.zeros(20000)), 2).statistics[MODEL]
    assert not np.array_equal(first, other)


def test_label_flip_poisons_only_malicious_clients_data(data_root):
    from raypfl.data.load import load_data
    from raypfl.driver.experiment import build_setup
    from raypfl.runtime.worker import ClientWorker
    from tests.conftest import SMALL_RUN, make_config

    cfg = make_config(*SMALL_RUN, "attack.kind=label_flip", "attack.fraction=0.3")
    setup = build_setup(cfg, load_data(cfg))
    worker = ClientWorker(setup)
    attack = setup.attack
    assert len(attack.malicious) == 3
    for client in range(10):
        x, y, indices = worker.client_data(client, 1)
        labels = setup.dataset.train_y[indices]
        want = 9 - labels if client in attack.malicious else labels
        np.testing.assert_array_equal(y[indices].numpy(), want)
        update = attack.poison_update(ClientUpdate(client, {MODEL: np.ones(3, np.float32)}, {MODEL: 1.0}), 1)
        assert update.statistics[MODEL].tolist() == [1.0, 1.0, 1.0]  # data poisoning leaves the update
