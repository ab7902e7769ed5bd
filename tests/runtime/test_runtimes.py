"""Sequential and Ray runtimes give the same global model for the same seed; actors keep client state.

The module's Ray tests share one set of actors (`KeptActors`): the first starts them as any run does
(fresh processes), the others re-initialise them with their own setup instead of starting three more
processes each (a process importing torch costs more CPU than these tests' rounds).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raypfl.config import RuntimeSpec
from raypfl.data.load import load_data
from raypfl.driver.experiment import build_setup, initial_snapshot, run_experiment
from raypfl.runtime.base import RoundPlan
from tests.conftest import TINY, make_config
from tests.runtime.kept_actors import KeptActors, use_kept

DIRICHLET = [
    *TINY,
    "dataset.train_limit=1500",  # half of TINY's: tiny_cnn still goes from ~30% to ~70% in 3 rounds
    "dataset.test_limit=500",
    "partition=dirichlet",
    "partition.alpha=0.3",
    "model=tiny_cnn",
    "clients.per_round=5",
]


@pytest.fixture(scope="module")
def sequential_run(tmp_path_factory, data_root):
    cfg = make_config(*DIRICHLET, "runtime=sequential")
    return run_experiment(cfg, tmp_path_factory.mktemp("seq"))


def test_dirichlet_clients_have_unequal_sizes(data_root):
    cfg = make_config(*DIRICHLET)
    setup = build_setup(cfg, load_data(cfg))
    sizes = [setup.partition.size(c) for c in range(setup.partition.num_clients)]
    assert max(sizes) > 1.5 * min(sizes)


#: Why 1e-5 holds on every CPU: each client trains with the same kernels and thread count on every runtime,
#: so its float32 update is the same bits; only the float64 sum of the updates is grouped differently
#: (per actor, then partials in slot order, vs one by one), which can change a float32 weight only when a
#: sum lands within ~1e-16 of a float32 rounding boundary (~1e-9 per weight per round). Measured: 0.0.
CROSS_RUNTIME = 1e-5


def test_ray_and_sequential_give_the_same_model(sequential_run, ray_session, kept, monkeypatch, tmp_path):
    """5 clients a round on 3 actors (2, 2 and 1 of them): the result does not depend on how the clients are
    spread over actors (tests/algorithms/test_algorithm_runtimes.py runs every algorithm on 2). Fresh
    actors, started by this run (kept afterwards for the module's other Ray tests)."""
    kept.kill(ray_session)  # whatever ran before: this run starts its own
    use_kept(monkeypatch, kept)
    ray_run = run_experiment(
        make_config(*DIRICHLET, "runtime=ray", "runtime.num_actors=3", "runtime.cpus_per_actor=0.5"), tmp_path
    )
    diff = np.abs(ray_run.weights - sequential_run.weights).max()
    assert diff <= CROSS_RUNTIME, f"max abs difference {diff}"
    assert [r["test_acc"] for r in ray_run.rounds] == pytest.approx(
        [r["test_acc"] for r in sequential_run.rounds]
    )
    assert sequential_run.rounds[-1]["test_acc"] > sequential_run.rounds[0]["test_acc"]  # it learns


def test_faithful_model_per_client_mode_gives_the_same_model(sequential_run, tmp_path):
    faithful = run_experiment(
        make_config(*DIRICHLET, "runtime=sequential", "runtime.rebuild_model=true"), tmp_path
    )
    assert np.abs(faithful.weights - sequential_run.weights).max() <= 1e-6


def test_different_seed_gives_a_different_model(sequential_run, tmp_path):
    other = run_experiment(make_config(*DIRICHLET, "runtime=sequential", "seed=1"), tmp_path)
    assert np.abs(other.weights - sequential_run.weights).max() > 1e-3


def test_actors_return_one_partial_and_client_states(ray_session, kept, data_root):
    cfg = make_config(*TINY, "optim.persistent_state=true", "optim.momentum=0.9")
    setup = build_setup(cfg, load_data(cfg))
    runtime = KeptActors(RuntimeSpec(num_actors=2), kept)  # a RayRuntime (on the module's actors)
    runtime.start(setup, initial_snapshot(setup, cfg.model.name, cfg.seed))
    try:
        weights_ref = runtime.server.pull.remote(0)
        partial, metrics, states = ray_session.get(
            runtime.actors[0].train_cohort.options(num_returns=3).remote(weights_ref, 1, [0, 2, 4], None, {})
        )
        assert partial.clients == [0, 2, 4] and len(metrics) == 3  # one object for three clients
        assert partial.weights["model"] == sum(setup.partition.size(c) for c in (0, 2, 4))
        assert sorted(states) == [0, 2, 4]  # the driver keeps client state (it survives actor deaths)
        assert all(m["status"] == "ok" for m in metrics)
        result = runtime.run_round(RoundPlan(2, [0, 1, 2, 3], states={0: states[0], 2: states[2]}))
        assert sorted(result.client_states) == [0, 1, 2, 3]
        momentum = result.client_states[0]["state"][0]["momentum_buffer"]
        assert not torch.equal(momentum, states[0]["state"][0]["momentum_buffer"])
        # plan.evaluate: the evaluation of the round's new version is queued behind the training, on every
        # actor, and evaluate_async takes it (no round trip via the driver); it equals a fresh one
        runtime.run_round(RoundPlan(3, [1, 3, 5, 7], evaluate=True))
        queued_version, (_, _, parts) = runtime._queued_evaluation
        assert queued_version == runtime.version == 2 and len(parts) == 2
        queued = runtime.evaluate_async()()
        assert runtime._queued_evaluation is None
        assert (queued.loss, queued.accuracy) == pytest.approx(
            (runtime.evaluate().loss, runtime.evaluate().accuracy)
        )
    finally:
        runtime.close()


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["fedavg", "scaffold"])
def test_vectorized_clients_inside_ray_actors_match_sequential(
    data_root, ray_session, kept, monkeypatch, tmp_path, algorithm
):
    """Ray actors run the lock-step path (`runtime.vectorize=true`, tests/training/test_vectorize.py) with
    the sequential runtime's kernels (1 thread each, same process type); only the float64 sums of partials
    are grouped differently, which reaches the float32 model only when a sum lands within ~1e-16 of a
    float32 rounding boundary: equal in practice. SCAFFOLD: lock-step clients' control variates travel
    through the driver to the actors and back, as plain clients' do."""
    overrides = (*TINY, f"algorithm={algorithm}", "runtime.vectorize=true")
    seq = run_experiment(make_config(*overrides, "runtime=sequential"), tmp_path / "seq").weights
    use_kept(monkeypatch, kept)
    ray_vec = run_experiment(
        make_config(*overrides, "runtime=ray", "runtime.num_actors=2"), tmp_path / "ray"
    ).weights
    assert np.abs(seq - ray_vec).max() <= 1e-5
