"""Ray rounds that survive dead actors: client actors on plain rounds, the parameter server on all rounds.

Nothing here runs unless a call fails with an actor error (or an object lost with its node): the plain
round (`RayRuntime.run_round`) keeps its one call per busy actor and its queued pushes, next-version pull
and summary on the parameter server, and only catches the failure. Then:

- A client actor that died is replaced by a new one, built from the same setup in the object store
  (plain rounds run without Ray restarts, `max_restarts=0`, so an actor killed with or without
  `no_restart` is treated alike). The lost share of the cohort is trained again, on a living actor if
  there is one (a replacement boots meanwhile), from the same weights, the same work and the driver's
  copy of the clients' states, with the same (round, client) seeds: the same partial sum. The server
  merges partials in slot order (`ParameterServer.push(..., slot)`), so it lands where it would have.
- A parameter server that died is replaced by a new one holding the round's base version, from the
  driver's reference to it: the weights of every version the driver uses live in the object store (put
  by the driver, or returned by `pull` before the round's summary), not in the server's process. Every
  partial of the round is pushed again; the partials of actors that survived are still in the object
  store and are not recomputed.
- A part of an evaluation whose actor died is evaluated again on another actor; parts are combined in
  range order, so the accuracy and loss are those of an undisturbed evaluation.

A round that is still incomplete after `ATTEMPTS` tries, a pool slot whose actor died more than
`MAX_REPLACEMENTS` times, a replacement that does not start within `faults.actor_timeout_s`, or base
weights lost with the server (their node died) raise `ActorsLost`, a RunStopped (exit code 3; the
driver names the last checkpoint to resume from).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import ray
from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError

from raypfl.config import FaultsSpec
from raypfl.errors import RunStopped
from raypfl.runtime.base import Evaluation, RoundPlan, combine_evaluations
from raypfl.runtime.placement import node_labels

if TYPE_CHECKING:
    from raypfl.runtime.base import RoundPlan
    from raypfl.runtime.setup import FederationSetup


class ActorPool(Protocol):
    """What recovery and the fault-tolerant rounds use of the Ray runtime (`RayRuntime` is one)."""

    actors: list
    server: Any
    setup: FederationSetup
    version: int
    sticky: bool
    placement: list[dict]
    recovery: ActorRecovery

    def new_actor(self) -> Any: ...
    def new_server(self, broadcast_ref: Any, version: int) -> None: ...
    def locate_server(self, labels: dict) -> None: ...
    def current_ref(self) -> Any: ...
    def state_ref(self, version: int) -> Any: ...
    def queue_next(self, version: int) -> Any: ...
    def advance(self, version: int, base_ref: Any, next_ref: Any) -> None: ...
    def train_share(self, share: Share, weights_ref: Any, plan: RoundPlan) -> None: ...


log = logging.getLogger("raypfl")

#: What a lost actor looks like to `ray.get`: the actor died or cannot be reached, or an object was lost.
LOST = (RayActorError, ObjectLostError)
#: Tries at completing one round, or one evaluation, once something was lost.
ATTEMPTS = 4
#: How often one pool slot's actor (or the parameter server) may be replaced in a run.
MAX_REPLACEMENTS = 3


class ActorsLost(RunStopped):
    """Actors died and what they held could not be rebuilt; the run stops (exit code 3)."""


@dataclass
class Share:
    """One busy actor's share of a plain round and the refs of its call; `slot` is its place in the sum."""

    slot: int
    actor: int
    handle: Any
    clients: list[int]
    partial_ref: Any = None
    metrics_ref: Any = None
    states_ref: Any = None
    push_ref: Any = None
    retries: int = 0  # times this share was trained again after its actor was lost


def failure(ref: Any) -> BaseException | None:
    """The loss `ref` resolves to (waiting for it), or None if it holds a value."""
    try:
        ray.get(ref)
    except LOST as exc:
        return exc
    return None


def _name(exc: BaseException) -> str:
    return type(exc).__name__.replace("RayTaskError(", "").rstrip(")")


def collect_shares(shares: list[Share], sticky: bool) -> tuple[list, dict]:
    """Each share's per-client metrics, and (with client state kept by the driver) the clients' states."""
    per_share = ray.get([share.metrics_ref for share in shares])
    states: dict = {}
    if sticky:
        for part in ray.get([share.states_ref for share in shares]):
            states.update(part)
    return per_share, states


class ActorRecovery:
    """Replaces lost actors of an ActorPool (the Ray runtime); finishes the round or evaluation of theirs."""

    def __init__(self, runtime: ActorPool):
        self.rt = runtime
        faults = runtime.setup.faults or FaultsSpec()
        self.timeout_s = faults.actor_timeout_s
        self.replaced: dict[int, int] = {}  # pool slot -> replacements so far
        self.server_replaced = 0
        self.booting: dict[int, Any] = {}  # pool slot -> `ready` ref of its replacement

    # --- the pool ---------------------------------------------------------------------------------------

    def _responds(self, handle: Any) -> bool:
        """True if the actor answers (`location` runs beside training, so a busy actor answers too)."""
        try:
            ray.get(handle.location.remote(), timeout=self.timeout_s)
            return True
        except (RayActorError, GetTimeoutError):
            return False

    def _replace(self, index: int, handle: Any, why: str) -> None:
        """Put a new actor in pool slot `index` if `handle` (now dead) still holds it."""
        rt = self.rt
        if rt.actors[index] is not handle:  # replaced already (e.g. while the evaluation recovered)
            return
        self.replaced[index] = self.replaced.get(index, 0) + 1
        if self.replaced[index] > MAX_REPLACEMENTS:
            raise ActorsLost(
                f"{why}: client actor {index} died {self.replaced[index]} times; giving up (with any "
                "faults.* set, an actor that stays dead leaves the pool and its clients move to the others)"
            )
        ray.kill(handle, no_restart=True)  # dead already, or unreachable: make sure it never comes back
        rt.actors[index] = rt.new_actor()
        self.booting[index] = rt.actors[index].ready.remote()
        log.warning("%s: client actor %d died; a new actor takes its place", why, index)

    def _usable(self, suspects: list[Any], why: str) -> list[int]:
        """Probe the actors of failed calls, replace the dead ones; the pool slots to send work to now.

        Slots whose replacement is still booting are used only when no other actor is left (after waiting
        for them to start).
        """
        rt = self.rt
        for handle in dict.fromkeys(suspects):  # each once, in order
            index = next((i for i, a in enumerate(rt.actors) if a is handle), None)
            if index is not None and not self._responds(handle):
                self._replace(index, handle, why)
        usable = [i for i in range(len(rt.actors)) if i not in self.booting]
        if not usable:
            self.wait_booting(why)
            usable = list(range(len(rt.actors)))
        return usable

    def wait_booting(self, why: str) -> None:
        """Wait (up to `faults.actor_timeout_s`) for replacement actors to start; log where they run."""
        if not self.booting:
            return
        booting, self.booting = self.booting, {}
        labels = node_labels()
        for index, ready in booting.items():
            try:
                pid = ray.get(ready, timeout=self.timeout_s)
                row = ray.get(self.rt.actors[index].location.remote(), timeout=self.timeout_s)
            except (RayActorError, GetTimeoutError) as exc:
                raise ActorsLost(
                    f"{why}: the actor replacing client actor {index} did not start within "
                    f"{self.timeout_s:g} s ({_name(exc)})"
                ) from exc
            if index < len(self.rt.placement):
                self.rt.placement[index] = {"actor": index, **row, "label": labels.get(row["node_id"], "")}
            node = row["node_id"][:12]
            log.warning("%s: new client actor %d is up (pid %d, node %s)", why, index, pid, node)

    def respawn_server(self, base_ref: Any, version: int, why: str) -> None:
        """A new parameter-server actor holding `version` (the driver's `base_ref`), replacing a dead one."""
        lost = failure(base_ref)
        state_ref = self.rt.state_ref(version)
        if lost is None and state_ref is not None:
            lost = failure(state_ref)
        if lost is not None:
            raise ActorsLost(
                f"{why}: the parameter-server actor died and the global model (or server state) of version "
                f"{version} was lost with it ({_name(lost)})"
            )
        self.server_replaced += 1
        if self.server_replaced > MAX_REPLACEMENTS:
            raise ActorsLost(f"{why}: the parameter-server actor died {self.server_replaced} times; gave up")
        ray.kill(self.rt.server, no_restart=True)
        self.rt.new_server(base_ref, version)
        self.rt.locate_server(node_labels())  # waits for it to start; `server_location` names the new one
        log.warning(
            "%s: the parameter-server actor died; a new one starts from version %d (the driver's copy of "
            "its weights) and the round's updates are pushed to it again",
            why,
            version,
        )

    # --- a plain round ------------------------------------------------------------------------------------

    def finish_round(
        self, plan: RoundPlan, version: int, base_ref: Any, shares: list[Share], need: int, summary_ref: Any
    ) -> tuple[list[list[dict]], dict, dict]:
        """Complete a plain round in which some call failed: (per-share metrics, client states, summary)."""
        rt, why = self.rt, f"round {plan.round_idx}"
        for attempt in range(1, ATTEMPTS + 1):
            ray.wait([s.metrics_ref for s in shares], num_returns=len(shares))  # every call has ended
            server_lost = failure(summary_ref)  # queued behind the pushes: it fails only if the server died
            if server_lost is not None:
                self.respawn_server(base_ref, version, why)
                rt.server.expect.remote(version, len(shares), need)
                for share in shares:
                    share.push_ref = None
            retrain = []
            for share in shares:
                if share.push_ref is not None and failure(share.push_ref) is None:
                    continue  # the server has this partial
                share.push_ref = None
                # with the server alive, a failed push means its partial is gone; after a new server, only
                # the shares whose training failed are trained again (the others' partials are kept)
                if server_lost is None or failure(share.metrics_ref) is not None:
                    retrain.append(share)
            if retrain:
                self._train_again(plan, base_ref, retrain, why)
            for share in shares:
                if share.push_ref is None:
                    share.push_ref = rt.server.push.remote(version, share.partial_ref, share.slot)
            rt.advance(version, base_ref, rt.queue_next(version))
            summary_ref = rt.server.round_summary.remote()
            try:
                per_share, states = collect_shares(shares, rt.sticky)
                ray.get([s.push_ref for s in shares])
                summary = ray.get(summary_ref)
            except LOST as exc:
                log.warning("%s: lost again (%s), try %d of %d", why, _name(exc), attempt, ATTEMPTS)
                continue
            self.wait_booting(why)
            return per_share, states, summary
        raise ActorsLost(f"{why}: actors kept dying; the round could not be completed in {ATTEMPTS} tries")

    def _train_again(self, plan: RoundPlan, base_ref: Any, retrain: list[Share], why: str) -> None:
        lost = failure(base_ref)
        if lost is not None:
            raise ActorsLost(f"{why}: the global weights of this round were lost ({_name(lost)})")
        rt = self.rt
        usable = self._usable([s.handle for s in retrain], why)
        for k, share in enumerate(retrain):
            target = usable[k % len(usable)]
            log.warning(
                "%s: clients %s were lost with actor %d; training them again on actor %d (same seeds, "
                "weights and client states: the same update)",
                why,
                share.clients,
                share.actor,
                target,
            )
            share.actor, share.handle, share.retries = target, rt.actors[target], share.retries + 1
            rt.train_share(share, base_ref, plan)

    # --- an evaluation --------------------------------------------------------------------------------------

    def finish_evaluation(
        self, version: int, weights_ref: Any, ranges: list[tuple[int, int]], parts: list, handles: list
    ) -> Evaluation:
        """Complete an evaluation some of whose parts failed: those are evaluated again on other actors."""
        why = f"evaluation of version {version}"
        results: list = [None] * len(parts)
        for _ in range(ATTEMPTS):
            failed = []
            for k, ref in enumerate(parts):
                if results[k] is None:
                    try:
                        results[k] = ray.get(ref)
                    except LOST:
                        failed.append(k)
            if not failed:
                self.wait_booting(why)
                return combine_evaluations(results)
            lost = failure(weights_ref)
            if lost is not None:
                raise ActorsLost(f"{why}: the weights of version {version} were lost ({_name(lost)})")
            usable = self._usable([handles[k] for k in failed], why)
            for j, k in enumerate(failed):
                handles[k] = self.rt.actors[usable[j % len(usable)]]
                parts[k] = handles[k].evaluate.remote(weights_ref, *ranges[k])
        raise ActorsLost(f"{why}: actors kept dying; it could not be completed in {ATTEMPTS} tries")

    # --- the fault-tolerant path (raypfl.runtime.tolerant) -------------------------------------------------

    def reaggregate(
        self, version: int, base_ref: Any, partials: list, expected: int, need: int, why: str
    ) -> dict:
        """The round's summary from a new parameter server, the answered `partials` pushed in their order."""
        rt = self.rt
        for attempt in range(1, ATTEMPTS + 1):
            self.respawn_server(base_ref, version, why)
            rt.server.expect.remote(version, expected, need)
            pushes = [rt.server.push.remote(version, partial) for partial in partials]
            close_ref = rt.server.close.remote(version)
            try:
                ray.get(pushes)
                return ray.get(close_ref)
            except LOST as exc:
                log.warning("%s: lost again (%s), try %d of %d", why, _name(exc), attempt, ATTEMPTS)
        raise ActorsLost(f"{why}: the parameter server kept dying")
