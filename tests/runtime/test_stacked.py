"""Stacked partials for robust aggregators, the server's finalizer, and empty (Poisson) cohorts (issue 16)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from raypfl.aggregators import build_aggregator
from raypfl.algorithms.aggregate import MODEL, Aggregate, ClientUpdate, Stacked
from raypfl.config import ClientsSpec
from raypfl.driver.selection import CohortSampler
from raypfl.postprocess import ServerPipeline
from raypfl.postprocess.central_dp import CentralGaussian
from raypfl.runtime.finalize import RoundFinalizer
from raypfl.runtime.parameter_server import ParameterServer

D = 50


def updates(n: int = 7) -> list[ClientUpdate]:
    rng = np.random.default_rng(0)
    return [
        ClientUpdate(c, {MODEL: rng.normal(size=D).astype(np.float32)}, {MODEL: float(c + 1)})
        for c in range(n)
    ]


def stacks(groups: list[list[int]]) -> list[Stacked]:
    everyone = updates()
    parts = []
    for group in groups:
        part = Stacked()
        for c in group:
            assert part.add(everyone[c])
        parts.append(part)
    return parts


def fedavg_step(broadcast, state, aggregate):
    return {MODEL: (broadcast[MODEL] + aggregate.mean(MODEL)).astype(np.float32)}, state


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "krum", "multikrum", "rfa"])
def test_any_grouping_of_clients_over_workers_gives_the_same_bits(rule):
    finalize = RoundFinalizer(0, build_aggregator({"name": rule, **({"f": 1} if "krum" in rule else {})}))
    models = []
    for groups in ([[0, 1, 2, 3, 4, 5, 6]], [[4, 0], [6, 2, 1], [5, 3]], [[6], [5], [4], [3], [2], [1], [0]]):
        server = ParameterServer({MODEL: np.zeros(D, np.float32)}, fedavg_step, finalize=finalize)
        server.expect(0, len(groups), 7)
        for part in reversed(stacks(groups)):  # arrival order must not matter either
            server.push(0, part)
        assert sorted(server.round_summary()["clients"]) == list(range(7))
        models.append(server.pull(1)[MODEL])
    assert all(m.tobytes() == models[0].tobytes() for m in models)
    assert np.abs(models[0]).max() > 0


def test_stacked_rejects_non_finite_updates_and_pickles():
    part = Stacked()
    bad = ClientUpdate(9, {MODEL: np.full(D, np.nan, np.float32)}, {MODEL: 1.0})
    assert not part.add(bad) and part.rejected == [9] and not part.has_weight
    assert part.add(updates()[0]) and part.has_weight and part.nbytes == D * 4
    copy = pickle.loads(pickle.dumps(part))
    assert copy.clients == [0] and copy.rows[0][0][MODEL].tobytes() == part.rows[0][0][MODEL].tobytes()
    with pytest.raises(TypeError):
        part.merge(Aggregate())
    vectors, weights = stacks([[3, 1, 2]])[0].matrices()
    assert vectors[MODEL].shape == (3, D) and weights[MODEL].tolist() == [2.0, 3.0, 4.0]  # id order


def test_central_noise_is_drawn_once_per_version_whatever_the_partials():
    step = CentralGaussian(noise_multiplier=1.0, bound=1.0, per_round=4)
    finalize = RoundFinalizer(5, None, ServerPipeline([step]))
    results = []
    for groups in ([[0, 1, 2, 3]], [[0, 1], [2, 3]], [[3], [1], [0, 2]]):
        everyone = updates(4)
        parts = []
        for group in groups:
            part = Aggregate()
            for c in group:
                everyone[c].weights[MODEL] = 1.0  # uniform weighting, as DP-FedAvg needs
                part.add(everyone[c])
            parts.append(part)
        server = ParameterServer({MODEL: np.zeros(D, np.float32)}, fedavg_step, finalize=finalize)
        server.expect(0, len(parts), 4)
        for part in parts:
            server.push(0, part)
        results.append(server.pull(1)[MODEL])
        assert server.round_summary()["server_metrics"]["dp_noise_std"] == 0.25
    assert all(np.abs(r - results[0]).max() <= 1e-6 for r in results)  # float64 sums, grouped differently
    plain = np.mean([u.statistics[MODEL] for u in updates(4)], axis=0)
    assert np.abs(results[0] - plain).max() > 0.1  # noise of std 0.25 was added


def test_an_empty_cohort_closes_at_once_and_keeps_the_model():
    server = ParameterServer({MODEL: np.ones(D, np.float32)}, fedavg_step)
    server.expect(0, 0, 0)
    assert server.latest == 1 and server.round_summary()["quorum_met"]
    np.testing.assert_array_equal(server.pull(1)[MODEL], np.ones(D, np.float32))


def test_poisson_cohorts_vary_in_size_and_are_seeded():
    spec = ClientsSpec(num=200, per_round=20, selection="poisson")
    sampler = CohortSampler(spec, 3)
    sizes = [len(sampler.cohort(r)) for r in range(1, 301)]
    assert len(set(sizes)) > 5 and abs(np.mean(sizes) - 20) < 1.5  # Binomial(200, 0.1)
    assert sampler.cohort(7) == CohortSampler(spec, 3).cohort(7) != sampler.cohort(8)
    eligible = list(range(0, 200, 2))  # only the present clients can be drawn
    assert set(sampler.cohort(7, eligible)) <= set(eligible)
    tiny = CohortSampler(ClientsSpec(num=10, per_round=1, selection="poisson"), 0)
    assert any(tiny.cohort(r) == [] for r in range(1, 60))  # 0.9^10: an empty round every ~3
