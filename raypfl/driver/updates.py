"""A run's update pipeline, from the config: the attack, the client steps, the robust aggregator and the
server steps (central DP, with its accountant). Checked (`check_updates`) before anything starts;
built (`build_updates`) once, in the driver, before any runtime starts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from omegaconf import DictConfig

from raypfl.aggregators import build_aggregator
from raypfl.algorithms.base import Algorithm
from raypfl.attacks import Attack
from raypfl.config import RunSpec, build_spec, require, show
from raypfl.errors import ConfigError
from raypfl.postprocess import (
    CLIENT_STEPS,
    SERVER_STEPS,
    ClientPipeline,
    ServerPipeline,
    check_order,
    knob_names,
)
from raypfl.postprocess.central_dp import CentralGaussian
from raypfl.runtime.finalize import RoundFinalizer

log = logging.getLogger("raypfl")

CENTRAL_DP = "central_dp"


@dataclass(frozen=True)
class Updates:
    """What a run does to updates: handed to every worker and to the parameter server (via the setup)."""

    attack: Attack | None = None
    client: ClientPipeline | None = None
    finalize: RoundFinalizer | None = None
    accountant: Any = None  # raypfl.privacy.Accountant when the run adds central DP noise
    noise_multiplier: float | None = None


def step_names(cfg: DictConfig) -> list[str]:
    """The `postprocess` list, as names."""
    return [str(name) for name in (cfg.get("postprocess") or [])]


def client_steps(cfg: DictConfig, names: list[str]) -> dict[str, Any]:
    """The listed client steps, each built from its config group (knobs checked, e.g. clip.bound > 0)."""
    return {name: _client_step(cfg, name) for name in names if name in CLIENT_STEPS}


def _client_step(cfg: DictConfig, name: str) -> Any:
    """One client step from its config group (`clip.*`, ...); a field the builder sets is no user key."""
    cls, node = CLIENT_STEPS[name], cfg.get(name) or {}
    known = knob_names(cls)
    unknown = sorted(set(map(str, node)) - set(known))
    if unknown:
        raise ConfigError(f"unknown key {name}.{unknown[0]} (known: {', '.join(known)})")
    return build_spec(cls, node, name)


def check_updates(cfg: DictConfig, spec: RunSpec, algorithm: Algorithm | None) -> None:
    """Every rule of the update pipeline, one ConfigError line naming the key (nothing is built here that
    costs time: the noise is calibrated in `build_updates`)."""
    names = step_names(cfg)
    steps = client_steps(cfg, [n for n in names if n in CLIENT_STEPS])
    check_order(names, steps)
    for name in ("clip", "topk", "quantize", "local_dp"):  # a step's knobs are checked even if unlisted
        if name not in names and cfg.get(name) is not None:
            _client_step(cfg, name)
    clients, privacy, attack = spec.clients, spec.privacy, spec.attack
    aggregator = build_aggregator(cfg.get("aggregator") or {"name": "mean"})
    aggregator.check(clients.per_round)
    require(
        (attack.kind == "none") == (attack.fraction == 0),
        f"attack.kind={attack.kind} with attack.fraction={show(attack.fraction)}: set both "
        "(a kind and a fraction > 0) or neither",
    )
    if CENTRAL_DP not in names:
        dp_keys = [k for k in ("noise_multiplier", "epsilon") if getattr(privacy, k) is not None]
        require(
            not dp_keys,
            f"privacy.{dp_keys[0] if dp_keys else ''} is set but postprocess has no central_dp "
            "(use 'postprocess=[clip,central_dp]')",
        )
        return
    _check_central_dp(cfg, spec, algorithm, aggregator)


def _check_central_dp(cfg: DictConfig, spec: RunSpec, algorithm: Algorithm | None, aggregator: Any) -> None:
    clients, privacy = spec.clients, spec.privacy
    require(
        (privacy.epsilon is None) != (privacy.noise_multiplier is None),
        "privacy: set exactly one of privacy.epsilon (calibrate the noise) and privacy.noise_multiplier "
        "(report epsilon)",
    )
    name = cfg.algorithm.get("name")
    weighting = getattr(algorithm, "weighting", None)
    if weighting is None:
        raise ConfigError(
            f"central_dp: algorithm={name} has no algorithm.weighting; DP-FedAvg's sensitivity needs one "
            "clipped model update per client, weighted 1 (use fedavg, fedprox, fedavgm or fedopt)"
        )
    require(
        weighting == "uniform",
        f"central_dp: algorithm.weighting={weighting} lets one client move the mean by more than "
        "clip.bound/m; set algorithm.weighting=uniform (DP-FedAvg, McMahan et al. 2018)",
    )
    statistics = getattr(algorithm, "statistics", None)
    require(
        statistics is None or tuple(statistics) == ("model",),
        f"central_dp: algorithm={name} also sends {', '.join(s for s in statistics or () if s != 'model')}, "
        "which clip does not bound",
    )
    require(
        not getattr(aggregator, "needs_stack", False),
        f"central_dp: aggregator={aggregator.name} has no clip.bound/m sensitivity; use aggregator=mean",
    )
    require(
        clients.selection != "fixed",
        "central_dp: clients.selection=fixed samples the cohort once; the accountant assumes a fresh sample "
        "every round (use clients.selection=poisson or random)",
    )
    require(
        not clients.join_schedule,
        "central_dp: clients.join_schedule changes the population the accountant samples from; leave it null",
    )
    require(
        spec.faults.evict_after is None,
        "central_dp: faults.evict_after changes the population the accountant samples from; leave it null",
    )
    require(
        privacy.accountant == "rdp" or clients.selection == "poisson",
        f"privacy.accountant=pld has no event for fixed-size sampling without replacement "
        f"(clients.selection={clients.selection}); use clients.selection=poisson or privacy.accountant=rdp",
    )
    cohort = privacy.noise_cohort_size or clients.per_round
    population = privacy.population or clients.num
    require(
        cohort >= clients.per_round,
        f"privacy.noise_cohort_size={cohort} < clients.per_round={clients.per_round}: the noise is "
        "calibrated for a cohort at least as large as the simulated one",
    )
    require(
        population >= clients.num,
        f"privacy.population={population} < clients.num={clients.num}",
    )
    require(
        cohort <= population,
        f"privacy.noise_cohort_size={cohort} > privacy.population={population}",
    )


def accountant_of(spec: RunSpec):
    """The accountant for the run's sampling (`clients.selection`) and `privacy.*`."""
    from raypfl.privacy import Accountant

    clients, privacy = spec.clients, spec.privacy
    return Accountant(
        sampling="poisson" if clients.selection == "poisson" else "random",
        population=privacy.population or clients.num,
        cohort=privacy.noise_cohort_size or clients.per_round,
        delta=privacy.delta,
        kind=privacy.accountant,
    )


def build_updates(
    cfg: DictConfig,
    spec: RunSpec,
    algorithm: Algorithm,
    num_clients: int,
    noise_multiplier: float | None = None,
) -> Updates:
    """The run's update pipeline (`noise_multiplier`: a resumed run's z, reused rather than recalibrated)."""
    check_updates(cfg, spec, algorithm)
    names = step_names(cfg)
    steps = client_steps(cfg, names)
    bound = steps["clip"].bound if "clip" in steps else None
    for step in steps.values():
        if hasattr(step, "bound") and step.name != "clip":  # local_dp: its noise is scaled to clip.bound
            step.bound = bound
    client = ClientPipeline([steps[n] for n in names if n in steps]) if steps else None
    aggregator = build_aggregator(cfg.get("aggregator") or {"name": "mean"})
    server_steps, accountant = [], None
    if CENTRAL_DP in names:
        accountant = accountant_of(spec)
        privacy, rounds = spec.privacy, spec.train.rounds
        if noise_multiplier is None:
            noise_multiplier = privacy.noise_multiplier
        if noise_multiplier is None:
            noise_multiplier = accountant.calibrate(privacy.epsilon, rounds)
            log.info(
                "central_dp: noise multiplier z=%.4f gives epsilon=%.3f at delta=%g after %d rounds (%s)",
                noise_multiplier,
                accountant.epsilon(noise_multiplier, rounds),
                privacy.delta,
                rounds,
                privacy.accountant,
            )
        server_steps.append(
            CentralGaussian(noise_multiplier, bound, spec.clients.per_round, privacy.noise_cohort_size)
        )
    extra = [SERVER_STEPS[n] for n in names if n in SERVER_STEPS and n != CENTRAL_DP]
    if extra:  # only central_dp is shipped; a server step without knobs would be built here
        server_steps.extend(cls() for cls in extra)
    needs_stack = getattr(aggregator, "needs_stack", False)
    finalize = None
    if needs_stack or server_steps:
        finalize = RoundFinalizer(
            cfg.seed,
            aggregator if needs_stack else None,
            ServerPipeline(server_steps) if server_steps else None,
        )
    attack = Attack.build(spec.attack.kind, spec.attack.fraction, spec.attack.scale, num_clients, cfg.seed)
    return Updates(attack, client, finalize, accountant, noise_multiplier)


@dataclass
class EpsilonLedger:
    """The epsilon spent after each round (metrics.csv `epsilon`), from the run's accountant.

    Epsilon after r rounds is a function of (z, sampling, r, delta) alone, so nothing but z is checkpointed.
    RDP: every round (cheap, one RDP curve scaled by r); PLD: at evaluation rounds and the last (each is a
    fresh composition, ~0.2-1.4 s).
    """

    noise_multiplier: float | None = None
    epsilons: dict[int, float] | None = None

    @classmethod
    def of(cls, updates: Updates, train: Any) -> EpsilonLedger:
        accountant, z = updates.accountant, updates.noise_multiplier
        if accountant is None or z is None:
            return cls()
        if accountant.kind == "rdp":
            values = accountant.epsilons(z, train.rounds)
            return cls(z, {r: values[r - 1] for r in range(1, train.rounds + 1)})
        due = [r for r in range(1, train.rounds + 1) if r % train.eval_every == 0 or r == train.rounds]
        return cls(z, dict(zip(due, accountant.epsilons_at(z, due))))

    def row(self, round_idx: int) -> dict[str, float | str]:
        """The round's `epsilon` column ('' when not computed this round or no DP)."""
        if self.epsilons is None:
            return {}
        value = self.epsilons.get(round_idx)
        return {"epsilon": "" if value is None else round(float(value), 6)}

    def state_dict(self) -> dict[str, float | None]:
        return {"noise_multiplier": self.noise_multiplier}


def update_columns(accepted: list[dict], rows: list[dict], server: dict[str, float]) -> dict[str, Any]:
    """A round's update-pipeline columns of metrics.csv: how many clients were clipped and the median norm
    of their updates (clip), attackers in the cohort, the noise's std in the released mean (central_dp).
    Per-client statistics such as these are not private: a DP deployment would not log them."""
    columns: dict[str, Any] = {}
    norms = [m["update_norm"] for m in accepted if "update_norm" in m]
    if norms:
        columns["update_norm_median"] = round(float(np.median(norms)), 6)
        columns["clipped_frac"] = round(float(np.mean([m.get("clipped", 0.0) for m in accepted])), 6)
    attackers = sum(1 for m in rows if m.get("malicious"))
    if attackers:
        columns["attackers"] = attackers
    if "dp_noise_std" in server:
        columns["dp_noise_std"] = round(float(server["dp_noise_std"]), 9)
    return columns
