"""Synchronous rounds on the virtual clock (`clock=virtual`): the driver decides, before a round starts,
which of its clients answer in time, from their device profiles; only those are trained.

A client's duration is download(broadcast) + compute(samples it processes) + upload(its update's wire
bytes), all known before training, so deadlines (`faults.round_timeout_s`, virtual seconds), quorum
(`faults.quorum`) and over-selection (`clients.over_select`: keep the first `per_round` to finish) are
decided here, the same on every runtime and machine; nothing sleeps. Late clients are not trained (their
updates would be discarded anyway) and get a `late` row. Actor deaths, retries and injected errors are
the simulator's business and cost no virtual time; injected drops are clients that never answer.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from raypfl.algorithms.aggregate import MODEL
from raypfl.algorithms.base import ServerSnapshot
from raypfl.clock import (
    DeviceProfiles,
    VirtualClock,
    build_profiles,
    client_samples,
    close_round,
    upload_bytes,
)
from raypfl.clock.timing import ClosedRound
from raypfl.config import RunSpec
from raypfl.runtime.base import RoundPlan, RoundResult, work_amount
from raypfl.runtime.setup import FederationSetup
from raypfl.runtime.worker import client_fate


class VirtualRounds:
    """Schedules each synchronous round on virtual time and keeps the federation's virtual clock."""

    def __init__(
        self,
        spec: RunSpec,
        setup: FederationSetup,
        profiles: DeviceProfiles,
        down_bytes: int,
        up_bytes: int,
        now: float = 0.0,
    ):
        self.spec, self.setup, self.profiles = spec, setup, profiles
        self.down_bytes, self.up_bytes = down_bytes, up_bytes
        self.clock = VirtualClock(now)
        self.closed: dict[int, ClosedRound] = {}  # round -> its decision, until the round is finished

    def duration(self, client: int, work: dict[str, Any] | None) -> float:
        """Virtual seconds from the broadcast to the server holding this client's update."""
        samples = client_samples(self.spec.train, work, self.setup.partition.size(client))
        return self.profiles.duration(client, samples, self.down_bytes, self.up_bytes)

    def target(self, cohort_size: int) -> int:
        """The answers a round is for: the first `per_round` of an over-selected cohort, else all of it."""
        clients = self.spec.clients
        return min(clients.per_round, cohort_size) if clients.over_select > 1 else cohort_size

    def schedule(self, plan: RoundPlan) -> RoundPlan:
        """The plan the runtime runs: the clients that answer in time (and silent ones, which never train)."""
        durations = {c: self.duration(c, plan.work.get(c)) for c in plan.cohort}
        silent = {c for c in plan.cohort if client_fate(self.setup, plan.round_idx, c).dropped}
        faults, target = self.spec.faults, self.target(len(plan.cohort))
        closed = close_round(durations, faults.quorum_size(target), faults.round_timeout_s, silent)
        self.closed[plan.round_idx] = closed
        cohort = sorted([*closed.kept, *silent])
        return replace(
            plan,
            cohort=cohort,
            states={c: s for c, s in plan.states.items() if c in cohort},
            need=faults.floor_size(target),  # the update applies if this many answered
            late=list(closed.late),
        )

    def finish(self, plan: RoundPlan, result: RoundResult) -> dict[str, float]:
        """Add the late clients' rows and each row's `virtual_s`; advance the clock. Returns the metrics
        row's columns: `virtual_s` (the clock at the round's close) and `round_virtual_s`."""
        closed = self.closed.pop(plan.round_idx)
        for row in result.client_metrics:
            row["virtual_s"] = round(closed.durations[row["client"]], 4)
        for client in closed.late:
            result.client_metrics.append(
                {
                    "round": plan.round_idx,
                    "client": client,
                    "status": "late",
                    "accepted": False,
                    "actor": "",
                    "attempts": 0,
                    "work": work_amount(plan.work.get(client)),
                    "seconds": 0.0,
                    "virtual_s": round(closed.durations[client], 4),
                }
            )
        result.client_metrics.sort(key=lambda row: row["client"])
        now = self.clock.advance(closed.round_s)
        return {"virtual_s": round(now, 4), "round_virtual_s": round(closed.round_s, 4)}

    def state_dict(self) -> dict[str, float]:
        return self.clock.state_dict()


def virtual_rounds(
    spec: RunSpec, setup: FederationSetup, initial: ServerSnapshot, broadcast_bytes: int, now: float = 0.0
) -> VirtualRounds:
    """The run's virtual rounds: device profiles from `clock.*`, and the bytes each client moves."""
    profiles = build_profiles(spec.clock, setup.partition.num_clients, spec.seed)
    sizes = setup.algorithm.statistic_sizes(int(initial.broadcast[MODEL].size))
    up = upload_bytes(sizes, setup.postprocess, spec.seed)
    return VirtualRounds(spec, setup, profiles, broadcast_bytes, up, now)
