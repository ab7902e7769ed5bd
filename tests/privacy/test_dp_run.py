"""A DP-FedAvg run (issue 16): the epsilon it reports per round is what dp-accounting computes for the same
(z, sampling, rounds, delta), and Poisson cohorts (empty ones included) run through."""

from __future__ import annotations

import dp_accounting as dpa
import pytest

from raypfl.config import ClientsSpec
from raypfl.driver.experiment import run_experiment
from raypfl.driver.selection import CohortSampler
from tests.conftest import SMALL_RUN, make_config

DP = [
    *SMALL_RUN,
    "train.rounds=6",
    "algorithm.weighting=uniform",
    "postprocess=[clip,central_dp]",
    "clip.bound=0.5",
    "privacy.noise_multiplier=1.3",
    "privacy.noise_cohort_size=50",
    "privacy.population=1000",
]


def dp_accounting_epsilon(event, rounds: int, relation) -> float:
    accountant = dpa.rdp.RdpAccountant(neighboring_relation=relation)
    return accountant.compose(event, rounds).get_epsilon(1e-5)


@pytest.mark.slow
def test_reported_epsilon_is_dp_accountings_for_poisson_cohorts(tmp_path, data_root):
    result = run_experiment(make_config(*DP, "clients.selection=poisson"), tmp_path)
    event = dpa.PoissonSampledDpEvent(50 / 1000, dpa.GaussianDpEvent(1.3))
    for r, row in enumerate(result.rounds, 1):
        want = dp_accounting_epsilon(event, r, dpa.NeighboringRelation.ADD_OR_REMOVE_ONE)
        assert row["epsilon"] == pytest.approx(want, abs=1e-6)  # metrics.csv keeps 6 decimals
    # the run's cohorts are Poisson draws: some rounds selected nobody, and went through unchanged
    sampler = CohortSampler(ClientsSpec(num=10, per_round=2, selection="poisson"), 0)
    sizes = [len(sampler.cohort(r)) for r in range(1, 7)]
    assert 0 in sizes and [row["clients"] for row in result.rounds] == sizes
    for row, size in zip(result.rounds, sizes):  # the noise std in the mean is z C / M; no noise if empty
        assert row.get("dp_noise_std", "") == (pytest.approx(1.3 * 0.5 / 50) if size else "")
    assert result.rounds[-1]["test_acc"] > 0.1


@pytest.mark.slow
def test_reported_epsilon_is_dp_accountings_for_fixed_size_cohorts(tmp_path, data_root):
    """Sampling without replacement (clients.selection=random): RDP under replace-one, whose sensitivity is
    2C, so the Gaussian's multiplier relative to it is z/2 (raypfl.privacy.accountant's docstring)."""
    result = run_experiment(make_config(*DP, "clients.selection=random", "train.rounds=2"), tmp_path)
    event = dpa.SampledWithoutReplacementDpEvent(1000, 50, dpa.GaussianDpEvent(1.3 / 2))
    for r, row in enumerate(result.rounds, 1):
        want = dp_accounting_epsilon(event, r, dpa.NeighboringRelation.REPLACE_ONE)
        assert row["epsilon"] == pytest.approx(want, abs=1e-6)
