"""FedAvg's two halves: weighted/unweighted aggregation, server learning rate, persistent optimizer state."""

from __future__ import annotations

import numpy as np
import torch

from raypfl.algorithms import FedAvg, build_algorithm
from raypfl.algorithms.aggregate import Aggregate, ClientUpdate
from raypfl.algorithms.base import ClientContext, Setting
from raypfl.config import OptimSpec, TrainSpec
from raypfl.models.weights import get_flat, set_flat
from raypfl.models.zoo import build_model
from tests.conftest import make_config


def update(client: int, vector: np.ndarray, weight: float) -> ClientUpdate:
    return ClientUpdate(client, {"model": vector}, {"model": weight})


def aggregate_of(updates: list[tuple[float, float]]) -> Aggregate:
    agg = Aggregate()
    for i, (value, weight) in enumerate(updates):
        agg.add(update(i, np.full(4, value, np.float32), weight))
    return agg


def fedavg(optim: OptimSpec, train: TrainSpec, **knobs) -> FedAvg:
    return FedAvg(**knobs).bind(Setting(optim, train, num_clients=10, per_round=2))


def test_server_update_weights_by_samples_and_applies_server_lr():
    algo = fedavg(OptimSpec(), TrainSpec(), weighting="samples", server_lr=0.5)
    old = {"model": np.zeros(4, np.float32)}
    new, state = algo.server_update(old, {}, aggregate_of([(1.0, 100.0), (4.0, 300.0)]))
    np.testing.assert_allclose(new["model"], 0.5 * (1 * 100 + 4 * 300) / 400)
    assert state == {} and new["model"].dtype == np.float32


def test_uniform_weighting_gives_plain_mean():
    cfg = make_config("algorithm.weighting=uniform")
    algo = build_algorithm(cfg)
    ctx_updates = []
    for client, n in [(0, 10), (1, 30)]:
        torch.manual_seed(0)
        model = build_model("mlp")
        x = torch.randn(40, 1, 28, 28)
        y = torch.randint(0, 10, (40,))
        ctx = ClientContext(client, 1, model, x, y, np.arange(n), torch.Generator().manual_seed(1), None)
        sent, _ = algo.client_update(ctx, {"model": get_flat(model)})
        ctx_updates.append(sent)
    assert [u.weights for u in ctx_updates] == [{"model": 1.0}, {"model": 1.0}]
    assert [u.metrics["samples"] for u in ctx_updates] == [10, 30]


def test_nan_update_is_rejected_not_averaged():
    agg = Aggregate()
    assert agg.add(update(0, np.ones(4, np.float32), 1.0))
    assert not agg.add(update(1, np.array([1, np.nan, 1, 1], np.float32), 1.0))
    assert not agg.add(update(2, np.array([np.inf, 0, 0, 0], np.float32), 1.0))
    # a statistic besides the model is checked too
    bad = ClientUpdate(
        3,
        {"model": np.ones(4, np.float32), "control": np.full(4, np.nan, np.float32)},
        {"model": 1.0, "control": 1.0},
    )
    assert not agg.add(bad)
    assert agg.clients == [0] and agg.rejected == [1, 2, 3]
    np.testing.assert_array_equal(agg.mean(), np.ones(4))


def _client_round(algo: FedAvg, state, model, seed: int = 0):
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(4))
    start = get_flat(model)
    ctx = ClientContext(0, 1, model, x, y, np.arange(64), torch.Generator().manual_seed(seed), state)
    sent, new_state = algo.client_update(ctx, {"model": start})
    set_flat(model, start)
    return sent, new_state


def test_persistent_optimizer_state_changes_the_next_update():
    torch.manual_seed(0)
    model = build_model("mlp")
    spec = TrainSpec(local_epochs=1, batch_size=16)
    stateful = fedavg(OptimSpec(lr=0.05, momentum=0.9, persistent_state=True), spec)
    first, state = _client_round(stateful, None, model)
    assert stateful.stateful_clients and state is not None and state["state"]  # momentum buffers kept
    fresh, _ = _client_round(stateful, None, model)
    resumed, _ = _client_round(stateful, state, model)
    np.testing.assert_array_equal(
        first.statistics["model"], fresh.statistics["model"]
    )  # same seed, no state: same update
    assert (
        np.abs(resumed.statistics["model"] - fresh.statistics["model"]).max() > 1e-4
    )  # momentum carried over changes it


def test_stateless_fedavg_keeps_no_state():
    torch.manual_seed(0)
    model = build_model("mlp")
    algo = fedavg(OptimSpec(momentum=0.9), TrainSpec(batch_size=16))
    sent, state = _client_round(algo, None, model)
    assert state is None and not algo.stateful_clients
    assert sent.metrics["steps"] == 4 and np.isfinite(sent.metrics["train_loss"])


def test_local_steps_replace_epochs():
    torch.manual_seed(0)
    model = build_model("mlp")
    algo = fedavg(OptimSpec(), TrainSpec(local_steps=7, batch_size=16))
    sent, _ = _client_round(algo, None, model)
    assert sent.metrics["steps"] == 7  # more than one pass over 64 samples
