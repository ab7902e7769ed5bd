"""Fault-tolerant rounds on Ray: quorum, deadline, retries of lost actors, actor recovery, kill injection.

One call per client (so the driver sees each answer arrive). Each answer's update goes from the actor
straight to the parameter-server actor (an ObjectRef; the driver never fetches it). The round closes
when `faults.quorum` of the cohort answered, or at `faults.round_timeout_s`, or when no answer can come
any more; clients still training are then cancelled (`cancel_round`) and recorded as `late`, and their
updates are never aggregated. A client whose actor died is re-sent (with backoff) to a living actor, up to
`faults.max_retries` times; the same (round, client) seed gives the same update wherever it trains.
Client state survives actor deaths because the driver keeps it (`RoundPlan.states`); the workload is
the balancer's, also in the driver. Actors that errored are probed at the start of the next round: a
restarted one rejoins, a dead one leaves the pool (its clients move to living actors, or, with
`faults.reassign=false`, are lost with it). A parameter server that dies is replaced by a new one holding
the round's base version (the driver's reference to its weights), and the round's answers are pushed to
it again in the order they came (`raypfl.runtime.recovery`): the same update as without the loss.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayError

from raypfl import seeding
from raypfl.errors import RunStopped
from raypfl.runtime.base import (
    ANSWERED,
    Evaluation,
    RoundPlan,
    RoundResult,
    combine_evaluations,
    quorum_for,
    round_trip,
    work_amount,
)
from raypfl.runtime.recovery import LOST, ActorPool, failure
from raypfl.runtime.scheduling import assign_cohort, split_range
from raypfl.runtime.setup import FederationSetup

log = logging.getLogger("raypfl")


class NoLivingActors(RunStopped):
    """Every client actor is dead; nothing can train."""


@dataclass
class _Call:
    """One client's training call in flight."""

    client: int
    actor: int
    attempt: int
    sent: float
    partial_ref: Any
    states_ref: Any


class TolerantRounds:
    """Runs rounds for a Ray runtime (an ActorPool) when `faults.*` is configured."""

    def __init__(self, runtime: ActorPool, setup: FederationSetup, incarnations: list[int]):
        self.rt = runtime
        self.setup = setup
        self.faults = setup.faults
        self.alive = [True] * len(runtime.actors)
        self.suspect: set[int] = set()
        self.incarnations = list(incarnations)

    # --- the actor pool ---------------------------------------------------------------------------------

    def living(self) -> list[int]:
        return [i for i, ok in enumerate(self.alive) if ok]

    def evaluate(self, weights_ref: Any) -> Evaluation:
        """The test set split over the healthy actors; a part whose actor fails is redone on another."""
        todo = split_range(len(self.setup.dataset.test_y), max(1, len(self.living())))
        parts: list[tuple[float, int, int]] = []
        for _ in range(len(self.alive) + 1):
            healthy = [i for i in self.living() if i not in self.suspect]
            if not healthy:
                self._recover()  # wait for restarts (or give up on dead actors)
                continue
            calls = {
                self.rt.actors[healthy[k % len(healthy)]].evaluate.remote(weights_ref, a, b): (a, b, k)
                for k, (a, b) in enumerate(todo)
            }
            failed = []
            for ref, (a, b, k) in calls.items():
                try:
                    parts.append(ray.get(ref))
                except RayActorError:
                    self.suspect.add(healthy[k % len(healthy)])
                    failed.append((a, b))
            if not failed:
                return combine_evaluations(parts)
            todo = failed
        raise NoLivingActors("evaluation failed on every client actor")

    def _recover(self) -> None:
        """Probe actors that failed last round: restarted ones rejoin, dead ones leave the pool."""
        for index in sorted(self.suspect):
            try:
                incarnation = self._probe(index)
            except (RayActorError, GetTimeoutError) as exc:
                self.alive[index] = False
                fate = (
                    f"its clients move to actors {self.living()}"
                    if self.faults.reassign
                    else f"its clients (ids = {index} mod {len(self.alive)}) are lost with it"
                )
                log.warning("client actor %d is gone (%s); %s", index, type(exc).__name__, fate)
            else:
                log.warning(
                    "client actor %d was restarted by Ray (pid %d -> %d): its clients' states come from the "
                    "driver's copy (last completed round), their workload from the balancer",
                    index,
                    self.incarnations[index],
                    incarnation,
                )
                self.incarnations[index] = incarnation
        self.suspect.clear()
        if not self.living():
            raise NoLivingActors("every client actor is dead; the run cannot go on")

    def _probe(self, index: int) -> int:
        """The actor's incarnation once it answers; waits out a restart (up to `faults.actor_timeout_s`)."""
        deadline = time.perf_counter() + self.faults.actor_timeout_s
        while True:
            left = deadline - time.perf_counter()
            try:
                return ray.get(self.rt.actors[index].ready.remote(), timeout=max(0.1, left))
            except ActorUnavailableError:  # restarting: ask again until the deadline
                if left <= 0:
                    raise
                time.sleep(0.2)

    def _targets(self, cohort: list[int]) -> dict[int, int | None]:
        """The actor each client trains on this round (None: lost with its dead actor)."""
        total = len(self.alive)
        if not self.faults.reassign:
            return {c: (c % total if self.alive[c % total] else None) for c in cohort}
        living = self.living()
        sizes = [self.setup.partition.size(c) for c in cohort]
        groups = assign_cohort(cohort, sizes, len(living), self.rt.sticky)
        return {c: living[g] for g, group in enumerate(groups) for c in group}

    def _retry_target(self, failed_actor: int, load: dict[int, int]) -> int | None:
        """Another living actor (least loaded) for a client whose actor was lost; None if there is none."""
        if not self.faults.reassign:
            return failed_actor if self.alive[failed_actor] else None
        healthy = [i for i in self.living() if i not in self.suspect] or self.living()
        return min(healthy, key=lambda i: (load.get(i, 0), i)) if healthy else None

    def _kill(self, round_idx: int) -> None:
        """Fault injection: ray.kill `faults.kill_count` living actors (seeded choice)."""
        living = self.living()
        count = min(self.faults.kill_count, len(living))
        chosen = seeding.rng(self.setup.seed, seeding.KILL, round_idx).choice(living, count, replace=False)
        chosen = sorted(int(i) for i in chosen)
        for index in chosen:
            ray.kill(self.rt.actors[index], no_restart=not self.faults.kill_restart)
            self.suspect.add(index)
        log.warning(
            "round %d: fault injection killed client actors %s (%s)",
            round_idx,
            chosen,
            "Ray restarts them" if self.faults.kill_restart else "for good",
        )

    # --- one round ----------------------------------------------------------------------------------------

    def run_round(self, plan: RoundPlan) -> RoundResult:
        self._recover()
        rt, faults, r = self.rt, self.faults, plan.round_idx
        version = rt.version
        weights_ref = rt.current_ref()
        close_at = faults.quorum_size(len(plan.cohort))  # answers that close the round early
        need = quorum_for(faults, plan)  # answers its update needs when it closes
        rt.server.expect.remote(version, len(plan.cohort), need)
        started = time.perf_counter()
        deadline = None if faults.round_timeout_s is None else started + faults.round_timeout_s
        pending: dict[Any, _Call] = {}
        load: dict[int, int] = {}
        rows: dict[int, dict] = {}

        def submit(client: int, actor: int, attempt: int) -> None:
            partial_ref, metrics_ref, states_ref = (
                rt.actors[actor]
                .train_cohort.options(num_returns=3)
                .remote(
                    weights_ref,
                    r,
                    [client],
                    {client: plan.work[client]} if client in plan.work else None,
                    {client: plan.states[client]} if client in plan.states else {},
                )
            )
            pending[metrics_ref] = _Call(client, actor, attempt, time.perf_counter(), partial_ref, states_ref)
            load[actor] = load.get(actor, 0) + 1

        def unanswered(client: int, status: str, actor: int | None, attempts: int) -> dict:
            return {
                "round": r,
                "client": client,
                "status": status,
                "accepted": False,
                "actor": "" if actor is None else actor,
                "attempts": attempts,
                "work": work_amount(plan.work.get(client)),
                "seconds": 0.0,
            }

        for client, actor in sorted(self._targets(plan.cohort).items(), key=lambda ca: (ca[1] or 0, ca[0])):
            if actor is None:
                rows[client] = unanswered(client, "failed", None, 0)
            else:
                submit(client, actor, 0)

        if r == faults.kill_at_round:  # while the work just sent is in flight
            self._kill(r)
        answered = 0
        states: dict[int, Any] = {}
        pushes, partials = [], []  # the answers' pushes and updates, in the order they came
        while pending and answered < close_at:
            wait_s = None if deadline is None else max(0.0, deadline - time.perf_counter())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=wait_s)
            if not ready:
                log.warning("round %d: deadline of %.1f s reached", r, faults.round_timeout_s)
                break
            call = pending.pop(ready[0])
            load[call.actor] -= 1
            try:
                [row] = ray.get(ready[0])
            except RayActorError as exc:
                self.suspect.add(call.actor)
                target = self._retry_target(call.actor, load) if call.attempt < faults.max_retries else None
                if target is None:
                    log.warning(
                        "round %d: client %d lost with actor %d; no retry left", r, call.client, call.actor
                    )
                    rows[call.client] = unanswered(call.client, "failed", call.actor, call.attempt + 1)
                    continue
                log.warning(
                    "round %d: client %d lost with actor %d (%s); retry %d on actor %d",
                    r,
                    call.client,
                    call.actor,
                    type(exc).__name__,
                    call.attempt + 1,
                    target,
                )
                time.sleep(faults.retry_backoff_s * 2**call.attempt)
                submit(call.client, target, call.attempt + 1)
                continue
            except RayError as exc:  # the worker catches client errors itself; this is unexpected
                log.error("round %d: client %d failed on actor %d: %s", r, call.client, call.actor, exc)
                rows[call.client] = unanswered(call.client, "failed", call.actor, call.attempt + 1)
                continue
            row.update(actor=call.actor, rtt_s=round_trip(row, time.perf_counter() - call.sent))
            row["attempts"] += call.attempt
            rows[call.client] = row
            if row["status"] in ANSWERED:
                answered += 1
                pushes.append(rt.server.push.remote(version, call.partial_ref))
                partials.append(call.partial_ref)
                if rt.sticky and row["status"] == "ok":
                    states.update(ray.get(call.states_ref))

        if answered < close_at and not pending and deadline is not None:
            # silent clients look like slow ones: the server cannot tell until the deadline
            time.sleep(max(0.0, deadline - time.perf_counter()))
        for call in pending.values():  # still training when the round closed: late, never aggregated
            rows[call.client] = unanswered(call.client, "late", call.actor, call.attempt + 1)
        for actor in sorted({call.actor for call in pending.values()}):
            rt.actors[actor].cancel_round.remote(r)
        close_ref = rt.server.close.remote(version)
        next_ref = rt.queue_next(version)  # owned by the driver, these weights outlive the server
        try:
            ray.get(pushes)
            summary = ray.get(close_ref)
            lost = failure(next_ref)
        except LOST:
            lost = failure(close_ref)
            if lost is None:  # the server lives: an update was lost (its node died)
                raise
        if lost is not None:  # the server died: a new one, the answers pushed to it again in their order
            why = f"round {r}"
            summary = rt.recovery.reaggregate(version, weights_ref, partials, len(plan.cohort), need, why)
            next_ref = rt.queue_next(version)
            ray.wait([next_ref], fetch_local=False)
        rt.advance(version, weights_ref, next_ref)
        rt.version = version + 1
        late = [c for c, row in rows.items() if row["status"] == "late"]
        if late:
            log.info("round %d closed with %d/%d answers; late (discarded): %s", r, answered, close_at, late)
        per_actor: dict[Any, list[dict]] = {}
        for row in rows.values():
            per_actor.setdefault(row["actor"], []).append(row)
        return RoundResult.from_workers(rt.version, list(per_actor.values()), summary, states)
