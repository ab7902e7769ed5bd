"""Privacy accounting for DP-FedAvg (McMahan et al. 2018, "Learning differentially private recurrent
language models"), on Google's dp-accounting library: nothing here composes privacy losses by hand.

The unit of privacy is one client. Each round the server sums the cohort's clipped updates (l2 norm <= C) and
adds N(0, (z·C)²) per coordinate: z is the noise multiplier, and the cohort has the M (`cohort`) clients the
noise is calibrated for, drawn from a `population` of P clients.

- ``sampling="poisson"``: each client joins independently with probability q = M/P. Neighbouring datasets
  add or remove one client, which moves the sum by at most C, so the sensitivity is C and the event is
  ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``. Accounted with RDP (Mironov 2017; Mironov, Talwar and
  Zhang 2019 for the sampled Gaussian) or PLD (privacy loss distributions: Meiser and Mohammadi 2018;
  Koskela et al. 2020; Doroshenko et al. 2022, "Connect the dots"). This is the recommended sampling.
- ``sampling="random"``: a uniformly random subset of exactly M clients (without replacement). Its
  amplification bound (Wang, Balle and Kasiviswanathan 2019, "Subsampled Rényi differential privacy and
  analytical moments accountant", Thm 27) holds under the REPLACE_ONE relation (P is public), where replacing
  one client moves the sum by up to 2C. dp-accounting has only an RDP bound for it, so ``kind="pld"`` is
  refused.

Why the ``random`` event is ``SampledWithoutReplacementDpEvent(P, M, GaussianDpEvent(z / 2))``
(dp-accounting 0.6.0 and 0.5.1, ``rdp/rdp_privacy_accountant.py``):

- l.1064-1091: the branch requires REPLACE_ONE and calls ``_compute_rdp_sample_wor_gaussian(q=M/P, sigma)``
  with the multiplier of the inner GaussianDpEvent.
- l.400-423: that function is Thm 27 of Wang et al. 2019, and its ``noise_multiplier`` is "the ratio of the
  standard deviation of the Gaussian noise to the l2-sensitivity". The base mechanism's RDP that it puts
  into the theorem is ``alpha / (2 sigma²)`` (l.450 for q = 1; l.495-497, ``cgf``, otherwise): the RDP of a
  Gaussian whose two neighbouring means are one sigma apart. Nothing is doubled for REPLACE_ONE, neither
  there nor in the plain GaussianDpEvent branch (l.1019-1024), and the PLD accountant uses sensitivity 1
  under every relation.
- Under REPLACE_ONE the sum's sensitivity is 2C, so sigma = z·C / (2C) = z/2. TensorFlow Privacy's
  ``compute_dp_sgd_privacy_lib`` makes the same correction (``noise_multiplier /= 2`` when microbatching
  doubles the sensitivity).

``tests/privacy/test_accountant.py`` checks this in two ways. With M == P the ε equals that of the
unsampled GaussianDpEvent(z/2). For a concrete pair of neighbouring client sets (every other client sends
+C, the replaced client +C or -C), the ``random`` accountant's ε is at least the pair's tight ε; the
convention without the /2 falls below it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from raypfl.errors import ConfigError

if TYPE_CHECKING:
    from dp_accounting import dp_event

SAMPLINGS = ("poisson", "random")
KINDS = ("rdp", "pld")
# PLD discretisation of the privacy loss; pfl-research's default. Smaller is tighter and slower.
PLD_DISCRETIZATION = 1e-4

PLD_RANDOM_MESSAGE = (
    "privacy.accountant=pld has no event for fixed-size sampling without replacement "
    "(clients.selection=random); use clients.selection=poisson or privacy.accountant=rdp"
)


def _dpa() -> Any:
    """dp_accounting, imported on first use: the import takes ~1 s (scipy.signal), which runs without DP
    need not pay."""
    try:
        import dp_accounting
    except ImportError as err:  # a core dependency, so only a broken install gets here
        raise ConfigError(
            f"privacy accounting needs dp-accounting ({err}); install it with "
            "`pip install 'dp-accounting>=0.4,<0.7'`"
        ) from None
    return dp_accounting


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence absl's logger (RDP prints ~1000 "failed to converge" warnings for orders 1.1-1.5 while
    calibrating; those orders are then dropped, so they are harmless) and numpy's overflow warnings."""
    import numpy as np

    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
            yield
    finally:
        absl.setLevel(level)


@dataclass(frozen=True)
class Accountant:
    """(ε, δ) of DP-FedAvg after a number of rounds, at noise multiplier z (noise std z·C on the cohort sum).

    sampling: "poisson" (each of `population` clients independently with prob cohort/population) or "random"
      (a uniformly random cohort of exactly `cohort` clients, without replacement).
    population: P, the number of clients sampled from.
    cohort: M, the cohort size the noise is calibrated for (pfl-research's noise_cohort_size).
    delta: the δ of the reported (ε, δ).
    kind: "rdp" (Rényi DP, Mironov 2017) or "pld" (privacy loss distributions, tighter, slower).
    """

    sampling: str
    population: int
    cohort: int
    delta: float
    kind: str = "rdp"

    def __post_init__(self) -> None:
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling={self.sampling!r} must be one of {SAMPLINGS}")
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} must be one of {KINDS}")
        if not 1 <= self.cohort <= self.population:
            raise ValueError(
                f"need 1 <= cohort <= population (cohort={self.cohort}, population={self.population})"
            )
        if not 0 < self.delta < 1:
            raise ValueError(f"delta={self.delta} must be in (0, 1)")
        if self.kind == "pld" and self.sampling == "random":
            raise ConfigError(PLD_RANDOM_MESSAGE)

    @property
    def sampling_probability(self) -> float:
        """q = M/P: a client's chance to be in a round's cohort (for both samplings)."""
        return self.cohort / self.population

    def event(self, z: float) -> dp_event.DpEvent:
        """One round's DpEvent at noise multiplier z (z = 0: no noise, a NonPrivateDpEvent)."""
        _check_z(z)
        ev = _dpa().dp_event
        if z == 0:
            return ev.NonPrivateDpEvent()
        if self.sampling == "poisson":
            return ev.PoissonSampledDpEvent(self.sampling_probability, ev.GaussianDpEvent(z))
        # Sensitivity 2C under REPLACE_ONE: see the module docstring.
        return ev.SampledWithoutReplacementDpEvent(self.population, self.cohort, ev.GaussianDpEvent(z / 2))

    def make_accountant(self) -> Any:
        """A fresh dp-accounting accountant with this accountant's kind and neighbouring relation."""
        dpa = _dpa()
        if self.kind == "pld":
            return dpa.pld.PLDAccountant(
                dpa.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=PLD_DISCRETIZATION
            )
        relation = (
            dpa.NeighboringRelation.ADD_OR_REMOVE_ONE
            if self.sampling == "poisson"
            else dpa.NeighboringRelation.REPLACE_ONE
        )
        return dpa.rdp.RdpAccountant(neighboring_relation=relation)

    def epsilon(self, z: float, rounds: int) -> float:
        """ε after `rounds` rounds: a fresh compose of `rounds` events (0 rounds: 0.0; z = 0: inf)."""
        _check_z(z)
        _check_rounds(rounds)
        if rounds == 0:
            return 0.0
        if z == 0:
            return math.inf
        return _epsilon(self, float(z), int(rounds))

    def epsilons(self, z: float, rounds: int) -> list[float]:
        """ε after each of rounds 1..`rounds`. Cheap for RDP (one RDP vector, scaled); for PLD this composes
        afresh for every round (0.2-1.4 s each), so ask epsilons_at for the rounds you need instead."""
        return self.epsilons_at(z, range(1, rounds + 1))

    def epsilons_at(self, z: float, rounds: Iterable[int]) -> list[float]:
        """ε after each of the given round counts, in the order given.

        RDP composes additively (Mironov 2017, Prop. 1): the RDP vector after r rounds is r times one round's,
        so one round's vector is computed once (cached) and converted at each r; a test pins that this equals
        a fresh compose. PLD has no such shortcut that is cheap, so each r gets a fresh compose.
        """
        _check_z(z)
        wanted = [int(r) for r in rounds]
        for r in wanted:
            _check_rounds(r)
        if z == 0:
            return [0.0 if r == 0 else math.inf for r in wanted]
        if self.kind == "pld":
            return [self.epsilon(z, r) for r in wanted]
        compute_epsilon = _dpa().rdp.rdp_privacy_accountant.compute_epsilon
        orders, per_round = _round_rdp(self, float(z))
        with _quiet():
            return [
                0.0 if r == 0 else float(compute_epsilon(orders, r * per_round, self.delta)[0])
                for r in wanted
            ]

    def calibrate(self, target_epsilon: float, rounds: int, tol: float = 1e-4) -> float:
        """The smallest z (within `tol`) with epsilon(z, rounds) <= target_epsilon.

        dp_accounting.calibrate_dp_mechanism runs Brent's method on ε(z) - target. Its root can sit just below
        the true z, so the result is re-checked here and raised by `tol` until ε <= target. For PLD, whose
        evaluations cost seconds at small z, the bracket comes from a coarse RDP calibration (RDP's ε is an
        upper bound, so its z is feasible for PLD too) stepped down by 0.8x until infeasible.
        """
        if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
            raise ValueError(f"target_epsilon={target_epsilon} must be a finite number > 0")
        if rounds < 1:
            raise ValueError(f"rounds={rounds} must be >= 1")
        if not tol > 0:
            raise ValueError(f"tol={tol} must be > 0")
        dpa = _dpa()
        if self.kind == "pld":
            z_rdp = dataclasses.replace(self, kind="rdp").calibrate(target_epsilon, rounds, tol=1e-2)
            bracket = self._bracket(z_rdp, target_epsilon, rounds)
        else:
            bracket = dpa.LowerEndpointAndGuess(0.0, 1.0)
        with _quiet():
            z = float(
                dpa.calibrate_dp_mechanism(
                    self.make_accountant,
                    lambda z: dpa.dp_event.SelfComposedDpEvent(self.event(z), rounds),
                    target_epsilon,
                    self.delta,
                    bracket,
                    tol=tol,
                )
            )
        for _ in range(1000):
            if self.epsilon(z, rounds) <= target_epsilon:
                return z
            z += tol
        raise RuntimeError(f"calibrate: epsilon({z}, {rounds}) is still above {target_epsilon}")

    def _bracket(self, z: float, target_epsilon: float, rounds: int) -> Any:
        """An ExplicitBracketInterval (lo, hi) with ε(lo) > target >= ε(hi), searched from a guess z."""
        hi = z
        while self.epsilon(hi, rounds) > target_epsilon:
            hi *= 1.25
        lo = 0.8 * hi
        while self.epsilon(lo, rounds) <= target_epsilon:
            hi, lo = lo, 0.8 * lo
        return _dpa().ExplicitBracketInterval(lo, hi)


@functools.lru_cache(maxsize=256)
def _epsilon(accountant: Accountant, z: float, rounds: int) -> float:
    """ε of a fresh compose of `rounds` events. Cached: a PLD evaluation costs seconds, and calibrate
    repeats some."""
    with _quiet():
        composed = accountant.make_accountant().compose(accountant.event(z), rounds)
        return float(composed.get_epsilon(accountant.delta))


@functools.lru_cache(maxsize=64)
def _round_rdp(accountant: Accountant, z: float) -> tuple[Any, Any]:
    """(orders, RDP of one round at each order) from a fresh dp-accounting RdpAccountant. Reads its private
    `_orders` and `_rdp` (dp-accounting has no public getter); test_accountant pins them."""
    with _quiet():
        rdp = accountant.make_accountant().compose(accountant.event(z), 1)
    orders, per_round = rdp._orders.copy(), rdp._rdp.copy()
    orders.flags.writeable = per_round.flags.writeable = False
    return orders, per_round


def _check_z(z: float) -> None:
    if not (z >= 0 and math.isfinite(z)):
        raise ValueError(f"noise multiplier z={z} must be a finite number >= 0")


def _check_rounds(rounds: int) -> None:
    if rounds < 0:
        raise ValueError(f"rounds={rounds} must be >= 0")
