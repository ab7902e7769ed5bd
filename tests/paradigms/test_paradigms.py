"""Non-federated paradigms, in-process: gradient server, topologies, replica check, gossip maths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raypfl.config import OptimSpec
from raypfl.data.datasets import Dataset
from raypfl.errors import ConfigError
from raypfl.models.weights import get_flat, set_flat
from raypfl.paradigms.allreduce import ReplicaDivergence, check_replicas
from raypfl.paradigms.gossip import _mix_plan, consensus_distance, pairwise_average
from raypfl.paradigms.gradient_server import GradientServer, VersionEvicted
from raypfl.paradigms.spec import PSSpec
from raypfl.paradigms.topology import is_connected, mixing_matrix, neighbours, spectral_gap
from raypfl.paradigms.worker import ShardTrainer
from raypfl.validation import validate
from tests.conftest import make_config

MOMENTUM = OptimSpec(name="sgd", lr=0.1, momentum=0.9)
PLAIN = OptimSpec(name="sgd", lr=0.1)


def toy_dataset(n: int = 200, features: int = 12, seed: int = 0) -> Dataset:
    gen = np.random.default_rng(seed)
    x = gen.standard_normal((n, features)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + 2 * (x[:, 1] > 0).astype(np.int64)
    return Dataset("toy", x, y, x[:50], y[:50], num_classes=4)


def trainer(data: Dataset, shard: np.ndarray, key: int, weights: np.ndarray, batch: int = 8) -> ShardTrainer:
    return ShardTrainer(data, shard, "mlp", weights, MOMENTUM, batch, seed=3, key=key)


def initial(data: Dataset) -> np.ndarray:
    from raypfl.models.zoo import build_model

    torch.manual_seed(0)
    return get_flat(build_model("mlp", data.in_shape, data.num_classes))


def server(
    weights, mode="sync", optim=MOMENTUM, steps=100, total=10**9, eval_samples=10**9, **ps
) -> GradientServer:
    return GradientServer(
        weights, optim, PSSpec(**ps), 2, mode, total, eval_samples, steps if mode == "sync" else None
    )


def test_ps_sync_mean_of_two_workers_is_large_batch_sgd_on_the_union():
    data = toy_dataset()
    w0 = initial(data)
    shards = [np.arange(0, 100), np.arange(100, 200)]
    workers = [trainer(data, shards[k], k, w0) for k in range(2)]
    ps = server(w0, combine="mean")
    # the reference draws the very same batches: twin trainers with the same seeds and keys
    twins = [trainer(data, shards[k], k, w0) for k in range(2)]
    reference = twins[0].model
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.from_numpy(data.train_x), torch.from_numpy(data.train_y)
    for v in range(6):
        for k, w in enumerate(workers):
            grad, loss, n = w.gradient(ps.pull(v))
            ps.push(v, grad, k, v, loss, n)
        union = torch.cat([twins[0].next_batch(), twins[1].next_batch()])
        opt.zero_grad()
        F.cross_entropy(reference(x[union]), y[union]).backward()
        opt.step()
    assert ps.latest == 6
    assert np.max(np.abs(ps.pull_latest()[1] - get_flat(reference))) <= 1e-6
    # and the arithmetic is not trivially equal: the model did move
    assert np.max(np.abs(ps.pull_latest()[1] - w0)) > 1e-3


def test_ps_sync_sum_is_twice_the_mean_step():
    data = toy_dataset()
    w0 = initial(data)
    steps = {}
    for combine in ("sum", "mean"):
        workers = [
            ShardTrainer(data, np.arange(k * 100, k * 100 + 100), "mlp", w0, PLAIN, 8, 3, k) for k in range(2)
        ]
        ps = server(w0, optim=PLAIN, combine=combine)
        for k, w in enumerate(workers):
            ps.push(0, *w.gradient(ps.pull(0))[:1], k, 0, 0.0, 8)
        steps[combine] = ps.pull(1) - w0
    np.testing.assert_allclose(steps["sum"], 2 * steps["mean"], rtol=1e-5, atol=1e-7)


def test_ps_pull_versions_waiting_and_eviction():
    w0 = np.zeros(4, np.float32)
    ps = server(w0, optim=PLAIN, keep_versions=2)
    assert ps.pull(1) is None  # not published yet (the Ray actor's pull waits instead)
    for v in range(3):
        ps.push(v, np.ones(4, np.float32), 0, v, 0.0, 1)
        assert ps.latest == v  # the barrier holds until worker 1 pushes too
        ps.push(v, np.ones(4, np.float32), 1, v, 0.0, 1)
    version, weights = ps.pull_latest()
    assert version == 3 and np.allclose(weights, -0.3)
    assert np.allclose(ps.pull(2), -0.2)
    with pytest.raises(VersionEvicted, match="keeps the last 2"):
        ps.pull(1)
    with pytest.raises(ValueError, match="server is at version 3"):
        ps.push(1, np.ones(4, np.float32), 0, 1, 0.0, 1)
    ps.push(3, np.ones(4, np.float32), 0, 3, 0.0, 1)
    with pytest.raises(ValueError, match="pushed twice"):
        ps.push(3, np.ones(4, np.float32), 0, 3, 0.0, 1)


def test_ps_sync_stops_after_its_steps_and_keeps_points():
    ps = server(np.zeros(2, np.float32), optim=PLAIN, steps=3, eval_samples=4)
    for v in range(3):
        for k in range(2):
            ps.push(v, np.ones(2, np.float32), k, v, 1.5, 2)
    assert ps.done and ps.latest == 3
    points = ps.take_points()
    assert [p.samples for p in points] == [4, 8, 12] and [p.iteration for p in points] == [1, 2, 3]
    assert points[0].train_loss == pytest.approx(1.5)
    assert ps.take_points() == []


def test_ps_async_staleness_drop_and_scale():
    g = np.ones(3, np.float32)
    drop = server(np.zeros(3, np.float32), mode="async", optim=PLAIN, max_staleness=2, stale_policy="drop")
    for i in range(4):  # worker 0 publishes versions 1..4
        drop.push(i, g, 0, i, 0.0, 1)
    drop.push(1, g, 1, 0, 0.0, 1)  # staleness 3 > 2: dropped
    drop.push(3, g, 1, 1, 0.0, 1)  # staleness 1: applied fully
    assert drop.latest == 5 and drop.dropped == 1
    assert np.allclose(drop.pull_latest()[1], -0.5)
    stats = drop.stats()
    assert stats["workers"][1] == {
        "gradients": 2,
        "dropped": 1,
        "rejected": 0,
        "staleness_mean": 2.0,
        "staleness_max": 3,
        "histogram": {1: 1, 3: 1},
    }
    scale = server(
        np.zeros(3, np.float32), mode="async", optim=PLAIN, max_staleness=None, stale_policy="scale"
    )
    scale.push(0, g, 0, 0, 0.0, 1)
    scale.push(0, g, 1, 0, 0.0, 1)  # staleness 1: weight 1/2
    assert np.allclose(scale.pull_latest()[1], -0.1 - 0.05)


def test_non_finite_gradients_are_rejected_and_logged(caplog):
    g, bad = np.ones(2, np.float32), np.array([np.nan, 1.0], np.float32)
    sync = server(np.zeros(2, np.float32), optim=PLAIN, combine="mean")
    sync.push(0, bad, 0, 0, float("nan"), 1)
    sync.push(0, g, 1, 0, 0.5, 1)  # the barrier counts the rejected worker; the mean is over the accepted
    assert sync.latest == 1 and np.allclose(sync.pull(1), -0.1)
    sync.push(1, bad, 0, 1, 0.0, 1)
    sync.push(1, np.array([1.0, np.inf], np.float32), 1, 1, 0.0, 1)
    assert sync.latest == 2 and np.array_equal(sync.pull(2), sync.pull(1))  # nothing to apply: unchanged
    assert sync.stats()["rejected"] == 3 and sync.stats()["workers"][0]["rejected"] == 2
    asyn = server(np.zeros(2, np.float32), mode="async", optim=PLAIN)
    asyn.push(0, bad, 1, 0, 0.0, 1)
    assert asyn.latest == 0 and asyn.stats()["rejected"] == 1
    assert "rejected a non-finite gradient from worker 1" in caplog.text
    assert all(np.isfinite(w).all() for w in (sync.pull_latest()[1], asyn.pull_latest()[1]))


def test_ps_async_budget_ends_the_run():
    ps = server(np.zeros(2, np.float32), mode="async", optim=PLAIN, total=5)
    assert ps.push(0, np.ones(2, np.float32), 0, 0, 0.0, 3) is True
    assert ps.push(1, np.ones(2, np.float32), 1, 0, 0.0, 3) is False  # 6 >= 5 samples: done
    assert ps.push(2, np.ones(2, np.float32), 0, 1, 0.0, 3) is False and ps.after_budget == 1
    assert [p.samples for p in ps.take_points()] == [6]


@pytest.mark.parametrize(
    "topology,nodes", [("ring", 8), ("torus", 8), ("torus", 9), ("complete", 5), ("random_regular", 10)]
)
def test_mixing_matrices_are_doubly_stochastic_on_connected_graphs(topology, nodes):
    adj = neighbours(topology, nodes, degree=3, seed=1)
    assert is_connected(adj) and all(i not in a for i, a in enumerate(adj))
    assert all(i in adj[j] for i, a in enumerate(adj) for j in a)  # undirected
    w = mixing_matrix(adj)
    assert np.allclose(w, w.T) and np.all(w >= 0)
    assert np.allclose(w.sum(0), 1) and np.allclose(w.sum(1), 1)
    assert 0 < spectral_gap(w) <= 1


def test_topology_shapes():
    assert [len(a) for a in neighbours("ring", 6)] == [2] * 6
    assert [len(a) for a in neighbours("torus", 9)] == [4] * 9
    assert [len(a) for a in neighbours("random_regular", 10, 3, seed=4)] == [3] * 10
    assert neighbours("random_regular", 10, 3, seed=4) == neighbours("random_regular", 10, 3, seed=4)
    ring, complete = mixing_matrix(neighbours("ring", 8)), mixing_matrix(neighbours("complete", 8))
    assert np.allclose(ring[0, [7, 0, 1]], 1 / 3)
    assert spectral_gap(complete) == pytest.approx(1.0) and spectral_gap(ring) < 0.3


def test_replica_check_catches_a_perturbed_replica(caplog):
    caplog.set_level("INFO", logger="raypfl")
    w = np.random.default_rng(0).standard_normal(100).astype(np.float32)
    assert check_replicas([w, w.copy(), w.copy()]) == 0.0
    assert "replica check passed: 3 replicas" in caplog.text
    perturbed = w.copy()
    perturbed[17] += 1e-4
    with pytest.raises(ReplicaDivergence, match="diverged"):
        check_replicas([w, perturbed])
    nan = w.copy()
    nan[0] = np.nan
    with pytest.raises(ReplicaDivergence):
        check_replicas([w, nan])


def test_gossip_maths():
    models = [np.array([0.0, 0.0]), np.array([2.0, 0.0])]
    assert consensus_distance(models) == pytest.approx(1.0)
    assert consensus_distance([models[1], models[1]]) == 0.0
    g = pairwise_average(np.zeros(1), [np.array([4.0]), np.array([8.0])])
    assert g == pytest.approx([5.0])  # ((0 + 4) / 2 + 8) / 2: the last node counts most
    w = mixing_matrix(neighbours("ring", 4))
    needed, plan = _mix_plan(w, [0, 1])
    assert needed == [0, 1, 2, 3]
    x = [np.full(2, float(i), np.float32) for i in range(4)]
    mixed = [sum(c * x[needed[k]] for k, c in terms) for terms in plan]
    assert np.allclose(mixed[0], w[0] @ np.arange(4.0)) and np.allclose(mixed[1], w[1] @ np.arange(4.0))


def test_shard_trainer_batches_cover_the_shard_each_pass():
    data = toy_dataset()
    t = ShardTrainer(data, np.arange(10, 30), "mlp", initial(data), PLAIN, 8, seed=1, key=0)
    first = torch.cat([t.next_batch() for _ in range(3)])  # 8 + 8 + (4 of this pass, 4 of the next)
    assert sorted(first[:20].tolist()) == list(range(10, 30))
    assert len(first) == 24 and set(first[20:].tolist()) <= set(range(10, 30))
    grad, _, n = t.gradient()
    assert n == 8 and grad.shape == initial(data).shape and np.isfinite(grad).all()


def test_gradient_matches_autograd_on_the_flat_vector():
    data = toy_dataset()
    w0 = initial(data)
    t = ShardTrainer(data, np.arange(200), "mlp", w0, PLAIN, 16, seed=2, key=0)
    probe = ShardTrainer(data, np.arange(200), "mlp", w0, PLAIN, 16, seed=2, key=0)
    grad, _, _ = t.gradient(w0)
    batch = probe.next_batch()
    flat = torch.tensor(w0, requires_grad=True)
    set_flat(probe.model, w0)
    params = dict(probe.model.named_parameters())
    offset, split = 0, {}
    for name, p in params.items():
        split[name] = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    out = torch.func.functional_call(probe.model, split, (torch.from_numpy(data.train_x[batch.numpy()]),))
    F.cross_entropy(out, torch.from_numpy(data.train_y[batch.numpy()])).backward()
    assert np.allclose(grad, flat.grad.numpy(), atol=1e-6)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["+experiment=ps_sync", "ps.combine=max"], "ps.combine=max"),
        (["+experiment=allreduce", "distributed.workers=1"], "distributed.workers >= 2"),
        (["+experiment=gossip", "gossip.topology=star"], "gossip.topology=star"),
        (
            ["+experiment=gossip", "gossip.topology=random_regular", "gossip.nodes=5", "gossip.degree=3"],
            "even",
        ),
        (["+experiment=ps_async", "distributed.straggler=2"], "distributed.straggler=2"),
        (["+experiment=ps_async", "runtime=sequential"], "runs on Ray actors"),
        (["+experiment=ps_sync", "+distributed.steps=3"], "unknown key distributed.steps"),
        (["paradigm=federated_ish"], "paradigm=federated_ish"),
    ],
)
def test_bad_paradigm_config_is_one_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("+", r"\+").replace("[", r"\[")):
        validate(make_config(*overrides))


@pytest.mark.parametrize("experiment", ["ps_sync", "ps_async", "allreduce", "gossip"])
def test_shipped_paradigm_configs_validate(experiment):
    cfg = make_config(f"+experiment={experiment}")
    validate(cfg)
    assert cfg.paradigm == experiment and cfg.model.name == "mlp"


def test_a_local_allreduce_group_meets_on_the_loopback_only():
    """On a local (loopback) Ray the gloo group meets through a file store: no TCP store listening on
    every interface, and gloo's own socket on the loopback."""
    import ast
    import os
    import subprocess
    import sys

    from raypfl.paradigms.allreduce import rendezvous_address

    assert rendezvous_address("10.1.2.3").startswith("tcp://10.1.2.3:")
    address = rendezvous_address("127.0.0.1")
    assert address.startswith("file://")
    probe = (
        "import os, psutil, torch.distributed as dist\n"
        "os.environ.setdefault('GLOO_SOCKET_IFNAME', 'lo')\n"
        f"dist.init_process_group('gloo', init_method={address!r}, rank=0, world_size=1)\n"
        "me = psutil.Process()\n"
        "print([c.laddr.ip for c in me.net_connections('tcp') if c.status == psutil.CONN_LISTEN])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, env=os.environ
    )
    assert out.returncode == 0, out.stderr[-2000:]
    listening = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    assert listening and all(ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1") for ip in listening), listening
