"""The DP-FedAvg accountant (raypfl/privacy/accountant.py), against dp-accounting and first principles."""

from __future__ import annotations

import math

import dp_accounting as dpa
import numpy as np
import pytest
from dp_accounting import dp_event as ev
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from dp_accounting.rdp import rdp_privacy_accountant as rpa
from scipy.special import logsumexp

from raypfl.errors import ConfigError
from raypfl.privacy import PLD_RANDOM_MESSAGE, Accountant
from raypfl.privacy.accountant import _round_rdp

DELTA = 1e-5
# N=100 clients, M=10 per round, T=100 rounds (design16 §7 table, re-measured with dp-accounting 0.6.0).
POISSON_RDP = Accountant("poisson", population=100, cohort=10, delta=DELTA)
POISSON_PLD = Accountant("poisson", population=100, cohort=10, delta=DELTA, kind="pld")
RANDOM_RDP = Accountant("random", population=100, cohort=10, delta=DELTA)


def test_poisson_epsilons_match_the_design_table() -> None:
    assert POISSON_RDP.epsilon(2.0, 100) == pytest.approx(2.581, abs=5e-4)
    assert POISSON_PLD.epsilon(2.0, 100) == pytest.approx(2.337, abs=5e-4)
    assert RANDOM_RDP.epsilon(2.0, 100) == pytest.approx(14.054, abs=5e-4)


def test_epsilon_is_a_direct_dp_accounting_computation() -> None:
    poisson = ev.SelfComposedDpEvent(ev.PoissonSampledDpEvent(0.1, ev.GaussianDpEvent(2.0)), 100)
    rdp = dpa.rdp.RdpAccountant().compose(poisson).get_epsilon(DELTA)
    pld = dpa.pld.PLDAccountant(value_discretization_interval=1e-4).compose(poisson).get_epsilon(DELTA)
    wor = ev.SelfComposedDpEvent(ev.SampledWithoutReplacementDpEvent(100, 10, ev.GaussianDpEvent(1.0)), 100)
    replace_one = dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    assert POISSON_RDP.epsilon(2.0, 100) == rdp
    assert POISSON_PLD.epsilon(2.0, 100) == pld
    assert RANDOM_RDP.epsilon(2.0, 100) == replace_one.compose(wor).get_epsilon(DELTA)
    assert POISSON_RDP.event(2.0) == ev.PoissonSampledDpEvent(0.1, ev.GaussianDpEvent(2.0))


def test_edge_cases() -> None:
    assert POISSON_RDP.epsilon(2.0, 0) == 0.0
    assert POISSON_PLD.epsilon(0.0, 5) == math.inf
    assert RANDOM_RDP.epsilon(0.0, 5) == math.inf
    assert POISSON_RDP.epsilons_at(0.0, [0, 3]) == [0.0, math.inf]
    assert POISSON_RDP.epsilons_at(2.0, [0])[0] == 0.0
    with pytest.raises(ValueError, match="noise multiplier"):
        POISSON_RDP.epsilon(-1.0, 3)
    with pytest.raises(ValueError, match="cohort"):
        Accountant("poisson", population=10, cohort=11, delta=DELTA)
    with pytest.raises(ValueError, match="delta"):
        Accountant("poisson", population=10, cohort=1, delta=1.0)
    with pytest.raises(ValueError, match="sampling"):
        Accountant("fixed", population=10, cohort=1, delta=DELTA)


def test_pld_with_sampling_without_replacement_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as err:
        Accountant("random", population=100, cohort=10, delta=DELTA, kind="pld")
    assert str(err.value) == PLD_RANDOM_MESSAGE
    assert str(err.value).startswith("privacy.accountant=pld has no event for fixed-size sampling")


@pytest.mark.parametrize(
    ("accountant", "checked"), [(POISSON_RDP, (1, 37, 100)), (RANDOM_RDP, (37,))], ids=["poisson", "random"]
)
def test_cached_per_round_rdp_equals_a_fresh_compose(accountant: Accountant, checked: tuple[int]) -> None:
    # epsilons() scales one round's RDP vector, read from RdpAccountant's private _orders/_rdp: pin both.
    fresh = accountant.make_accountant().compose(accountant.event(2.0))
    orders, per_round = _round_rdp(accountant, 2.0)
    assert np.array_equal(fresh._orders, orders) and np.array_equal(fresh._rdp, per_round)
    eps = accountant.epsilons(2.0, 100)
    assert len(eps) == 100 and all(a < b for a, b in zip(eps, eps[1:]))
    for r in checked:
        direct = accountant.make_accountant().compose(accountant.event(2.0), r).get_epsilon(DELTA)
        assert eps[r - 1] == direct
    assert eps[99] == accountant.epsilon(2.0, 100)
    assert accountant.epsilons_at(2.0, [100, 1]) == [eps[99], eps[0]]


def test_pld_epsilons_at_are_fresh_composes() -> None:
    composed = [POISSON_PLD.make_accountant().compose(POISSON_PLD.event(2.0), r) for r in (10, 100)]
    assert POISSON_PLD.epsilons_at(2.0, [10, 100]) == [acc.get_epsilon(DELTA) for acc in composed]


def test_calibrate_round_trips_and_is_quiet(capfd: pytest.CaptureFixture[str]) -> None:
    z = POISSON_RDP.calibrate(4.0, 100)
    assert z == pytest.approx(1.482, abs=1e-3)  # design16 §7
    assert 0.98 * 4.0 <= POISSON_RDP.epsilon(z, 100) <= 4.0
    assert POISSON_RDP.epsilon(z - 1e-3, 100) > 4.0  # the smallest such z, within tolerance
    assert "converge" not in capfd.readouterr().err  # absl's ~1000 warnings are silenced


@pytest.mark.slow
@pytest.mark.parametrize("accountant", [POISSON_PLD, RANDOM_RDP], ids=["poisson-pld", "random-rdp"])
def test_calibrate_round_trips_slow(accountant: Accountant) -> None:
    z = accountant.calibrate(4.0, 100)
    assert 0.98 * 4.0 <= accountant.epsilon(z, 100) <= 4.0


# Sampling without replacement: the noise multiplier passed to dp-accounting is z/2 (the module docstring says
# why). The two tests below would fail with GaussianDpEvent(z).


def test_random_without_sampling_is_the_gaussian_with_sensitivity_2c() -> None:
    """M == P: every client every round, so the mechanism is the plain Gaussian on a sum whose sensitivity
    under replace-one is 2C: RDP of order a is a (2C)² / (2 (zC)²) = 2a/z² per round (Mironov 2017,
    Prop. 7)."""
    z, rounds = 2.0, 10
    everyone = Accountant("random", population=10, cohort=10, delta=DELTA)
    orders = np.array(rpa.DEFAULT_RDP_ORDERS, dtype=float)
    closed_form = rpa.compute_epsilon(orders, rounds * 2 * orders / z**2, DELTA)[0]
    assert everyone.epsilon(z, rounds) == pytest.approx(closed_form, rel=1e-12)
    as_add_remove = dpa.rdp.RdpAccountant().compose(ev.GaussianDpEvent(z / 2), rounds)
    assert everyone.epsilon(z, rounds) == pytest.approx(as_add_remove.get_epsilon(DELTA), rel=1e-12)
    wrong = dpa.rdp.RdpAccountant().compose(ev.GaussianDpEvent(z), rounds).get_epsilon(DELTA)
    assert everyone.epsilon(z, rounds) > 1.5 * wrong


def _worst_pair(q: float, z: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Log densities of one round's output on a grid, for two client sets that differ in one client.

    Every other client sends +C (C = 1), the replaced client +C in D and -C in D'. With a cohort of M drawn
    without replacement, D's sum is M·C whatever the cohort; D''s is M·C, or (M-2)·C when the replaced client
    is in the cohort (probability q). Shifted by M·C: N(0, z²) against (1-q) N(0, z²) + q N(-2, z²).
    """
    x = np.linspace(-20 * z - 2, 20 * z + 2, 80_001)

    def normal(mean: float) -> np.ndarray:
        return -0.5 * ((x - mean) / z) ** 2 - math.log(z * math.sqrt(2 * math.pi))

    mixture = np.logaddexp(math.log1p(-q) + normal(0.0), math.log(q) + normal(-2.0))
    return normal(0.0), mixture, x[1] - x[0]


def test_random_rdp_dominates_a_concrete_neighbouring_pair() -> None:
    """A valid RDP bound is >= the Rényi divergence of every neighbouring pair, in both directions."""
    q, z = 0.1, 2.0
    log_p, log_q, dx = _worst_pair(q, z)
    orders, per_round = _round_rdp(RANDOM_RDP, z)
    wrong = rpa._compute_rdp_sample_wor_gaussian(q, z, orders)  # the convention without /2
    checked = 0
    for a in (2, 3, 4, 6, 8, 12, 16):
        i = int(np.flatnonzero(orders == a)[0])
        both = [logsumexp(a * u + (1 - a) * v) for u, v in ((log_p, log_q), (log_q, log_p))]
        pair = (max(both) + math.log(dx)) / (a - 1)
        assert per_round[i] >= pair * (1 + 1e-6), a
        assert wrong[i] < pair, a
        checked += 1
    assert checked == 7


def test_random_epsilon_is_at_least_the_pairs_tight_epsilon() -> None:
    """Over 100 rounds the pair above is a Poisson-subsampled Gaussian with sensitivity 2: dp-accounting's
    optimistic PLD gives a lower estimate of its tight ε, which the accountant must not undercut."""
    q, z, rounds = 0.1, 2.0, 100
    pair = pld_lib.from_gaussian_mechanism(z, sensitivity=2.0, sampling_prob=q, pessimistic_estimate=False)
    lower = pair.self_compose(rounds).get_epsilon_for_delta(DELTA)
    assert lower == pytest.approx(7.05, abs=0.02)
    assert RANDOM_RDP.epsilon(z, rounds) >= lower
    wrong = dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    wrong.compose(ev.SampledWithoutReplacementDpEvent(100, 10, ev.GaussianDpEvent(z)), rounds)
    assert wrong.get_epsilon(DELTA) < lower
