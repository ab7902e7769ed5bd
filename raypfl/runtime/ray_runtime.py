"""The Ray runtime: a pool of long-lived client actors and a parameter-server actor.

Per round the global weights are put in the object store once (the parameter server's `pull`).
Plain synchronous rounds take the fast path: each actor trains its share of the cohort in place and
pushes ONE partial sum straight to the parameter server (an ObjectRef, never fetched by the driver);
only per-client metrics come back. When `faults.*` asks for more (quorum, deadlines, injected faults,
load balancing), rounds take the tolerant path in `raypfl.runtime.tolerant`: one call per client, so
that the round can close on a quorum and lost actors can be retried. Evaluation is split over the
actors, so it uses every core too. Either path survives dead actors (`raypfl.runtime.recovery`): a plain
round replaces a dead client actor and trains its share again, and both replace a dead parameter server
from the driver's reference to the round's weights; nothing of this costs a call while nothing fails.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import ray
import torch

from raypfl.algorithms.aggregate import MODEL, Aggregate, Arrays
from raypfl.algorithms.base import ServerSnapshot
from raypfl.config import RuntimeSpec
from raypfl.errors import ConfigError
from raypfl.runtime.base import (
    Evaluation,
    RoundPlan,
    RoundResult,
    combine_evaluations,
    notify,
    quorum_for,
    round_trip,
)
from raypfl.runtime.node_aggregation import node_groups, sum_partials
from raypfl.runtime.parameter_server import ParameterServer
from raypfl.runtime.placement import actor_location, describe, node_labels, scheduling_options
from raypfl.runtime.ray_start import start_ray
from raypfl.runtime.recovery import LOST, ActorRecovery, Share, collect_shares, failure
from raypfl.runtime.scheduling import assign_cohort, split_range
from raypfl.runtime.setup import FederationSetup
from raypfl.runtime.worker import ClientWorker

log = logging.getLogger(__name__)

#: Restarts Ray grants a client actor that dies when faults are being injected.
ACTOR_RESTARTS = 3


def pool_size(spec: RuntimeSpec) -> int:
    """`runtime.num_actors`, or as many actors as the cluster's CPUs (and GPUs, if asked for) can hold."""
    if spec.num_actors:
        return spec.num_actors
    resources = ray.cluster_resources()  # summed over every node of a multi-node cluster
    fits = int(resources.get("CPU", 1) / spec.cpus_per_actor + 1e-9)
    if spec.gpus_per_actor:
        fits = min(fits, int(resources.get("GPU", 0) / spec.gpus_per_actor + 1e-9))
    return max(1, fits)


def check_gpus(spec: RuntimeSpec) -> None:
    """Fail fast if actors ask for GPUs a local Ray does not have (they would wait forever, unscheduled).

    A joined cluster (`runtime.address`) may still gain GPU nodes (autoscaling): there it is a warning.
    """
    if not spec.gpus_per_actor:
        return
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus >= spec.gpus_per_actor:
        return
    message = f"runtime.gpus_per_actor={spec.gpus_per_actor} but Ray has {gpus:g} GPUs"
    if not spec.address:
        raise ConfigError(f"{message}; set runtime.gpus_per_actor=0, or join a GPU cluster (runtime.address)")
    log.warning("%s: the client actors wait until a GPU node joins the cluster", message)


@ray.remote(concurrency_groups={"control": 1})
class ClientActor(ClientWorker):
    """A ClientWorker as a Ray actor; `cancel_round` runs beside training (its own concurrency group).

    An actor given a GPU share (`runtime.gpus_per_actor`) trains on that GPU; others on the CPU.
    """

    def __init__(self, setup: FederationSetup, rebuild_model: bool = False):
        gpus = ray.get_runtime_context().get_accelerator_ids().get("GPU") or []
        usable = bool(gpus) and torch.cuda.is_available()
        if gpus and not usable:  # e.g. logical GPUs of a test cluster, or a CPU-only torch build
            log.warning("actor was given GPU %s but torch sees no CUDA device: training on the CPU", gpus)
        super().__init__(setup, rebuild_model, device="cuda" if usable else "cpu")

    @ray.method(concurrency_group="control")
    def cancel_round(self, round_idx: int) -> None:
        ClientWorker.cancel_round(self, round_idx)

    def sum_partials(self, *partials: Aggregate) -> Aggregate:
        """The sum of partials of this node's actors, this one's first (`runtime.node_aggregation`)."""
        return sum_partials(*partials)

    @ray.method(concurrency_group="control")
    def location(self) -> dict:
        """Where this actor runs: node id, node IP, pid, assigned GPU ids, and where its model lives."""
        device = str(next(self.model.parameters()).device)
        return {**actor_location(), "device": device, "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES")}


class RayRuntime:
    """Client-pool actors plus a parameter-server actor."""

    is_driver = True

    def __init__(self, spec: RuntimeSpec, keep_versions: int = 2):
        self.spec = spec
        self.keep_versions = keep_versions
        self.started_ray = False
        self.actors: list = []
        self.server = None
        self.version = 0
        self.sticky = False
        self.setup: FederationSetup | None = None
        self.tolerant = None  # a TolerantRounds when faults are configured
        self._setup_ref = None
        self._weights: tuple[int, object] | None = None  # (version, ObjectRef) of the latest broadcast
        self._state_refs: dict[int, object] = {}  # version -> ObjectRef of its server state (if it has one)
        self._ready_refs: list = []
        self._previous: tuple[int, object] | None = None  # the current version while the next is pulled
        self._queued_evaluation: tuple[int, tuple] | None = None  # (version, its evaluation's calls)
        self._stale_evaluation: list = []  # queued evaluation calls of a round that lost an actor
        self.placement: list[dict] = []
        self.server_location: dict = {}
        self._actor_cls = None  # ClientActor with this run's options: new actors replace dead ones
        self.recovery: ActorRecovery | None = None
        self._driver_worker: ClientWorker | None = None  # per-client evaluation when actors cannot do it

    @property
    def parallelism(self) -> int:
        return len(self.actors)

    def expected_parallelism(self) -> int:
        """The pool's size before it is built: `runtime.num_actors`, or the CPUs Ray will be given."""
        if self.actors:
            return len(self.actors)
        cpus = self.spec.num_cpus or os.cpu_count() or 1
        return self.spec.num_actors or max(1, int(cpus / self.spec.cpus_per_actor + 1e-9))

    def start(self, setup: FederationSetup, initial: ServerSnapshot) -> None:
        """Start (or join) Ray, build the client actors and the parameter server; wait for them."""
        self.launch(setup, initial)
        self.wait_ready()

    def ready(self) -> bool:
        """True if every actor has answered `ready` (never blocks)."""
        done, _ = ray.wait(self._ready_refs, num_returns=len(self._ready_refs), timeout=0)
        return len(done) == len(self._ready_refs)

    def launch(self, setup: FederationSetup, initial: ServerSnapshot) -> None:
        """Start (or join) Ray and ask for the actors; returns without waiting for them (see `ready`)."""
        self.started_ray = start_ray(self.spec)
        self.setup = setup
        check_gpus(self.spec)
        num_actors = pool_size(self.spec)
        # dataset arrays go into the object store once; actors read them zero-copy. The runtime holds the
        # reference for its whole life: a restarted actor (faults) is rebuilt from it. (Ray still logs a
        # core_worker warning about object-store arguments of restartable actors; holding the ref is its fix.)
        self._setup_ref = ray.put(setup)
        faulty = setup.faults is not None and setup.faults.active
        actor_cls = ClientActor.options(
            num_cpus=self.spec.cpus_per_actor,
            num_gpus=self.spec.gpus_per_actor,
            max_restarts=ACTOR_RESTARTS if faulty else 0,
            **scheduling_options(self.spec.placement),
        )
        self._actor_cls = actor_cls
        self.actors = [self.new_actor() for _ in range(num_actors)]
        self.recovery = ActorRecovery(self)
        self.sticky = setup.stateful_clients
        self._open(initial)  # its process starts while the client actors start
        self._ready_refs = [actor.ready.remote() for actor in self.actors]

    def wait_ready(self) -> None:
        """Wait for every actor; then log where they run."""
        setup, num_actors = self.setup, len(self.actors)
        faulty = setup.faults is not None and setup.faults.active
        incarnations = ray.get(self._ready_refs)  # not billed to round 1
        if faulty:
            from raypfl.runtime.tolerant import TolerantRounds

            self.tolerant = TolerantRounds(self, setup, incarnations)
        log.info(
            "ray runtime: %d client actors (%.2g CPU, %.2g GPU each, placement %s), parameter server actor; "
            "Ray %s (driver on node %s, %d nodes)%s",
            num_actors,
            self.spec.cpus_per_actor,
            self.spec.gpus_per_actor,
            self.spec.placement,
            "started for this run" if self.started_ray else "already running",
            ray.get_runtime_context().get_node_id()[:12],
            len([n for n in ray.nodes() if n.get("Alive")]),
            "; fault-tolerant rounds" if faulty else "",
        )
        self._record_placement()

    def _record_placement(self) -> None:
        """Ask every actor where it landed (`self.placement`, one row per actor) and log one line per node."""
        labels = node_labels()
        rows = ray.get([actor.location.remote() for actor in self.actors])
        self.placement = [
            {"actor": index, **row, "label": labels.get(row["node_id"], "")} for index, row in enumerate(rows)
        ]
        for line in describe(self.placement):
            log.info("placement: %s", line)
        self.locate_server(labels)

    def new_actor(self):
        """A new client actor (not waited for), from the setup the runtime keeps in the object store."""
        return self._actor_cls.remote(self._setup_ref, self.spec.rebuild_model)

    def _open(self, initial: ServerSnapshot) -> None:
        """Start the parameter-server actor holding the `initial` broadcast and server state."""
        self.new_server(self._put_snapshot(initial), initial.version)

    def _put_snapshot(self, snapshot: ServerSnapshot):
        """Put a version's broadcast (and server state) in the object store as the current version (the
        driver owns them, not the server); returns the broadcast's ref."""
        ref = ray.put(dict(snapshot.broadcast))
        self.version = snapshot.version
        self._weights, self._previous = (snapshot.version, ref), None
        self._state_refs = {snapshot.version: ray.put(snapshot.state)}
        return ref

    def state_ref(self, version: int):
        """The driver's ref to `version`'s server state (None if it is not known here)."""
        return self._state_refs.get(version)

    def queue_next(self, version: int):
        """Queue, behind the round's pushes, the pull of version+1's broadcast (and of its server state)."""
        ref = self.server.pull.remote(version + 1)
        # always: an algorithm may start its state only in its first server update (one small call per round)
        self._state_refs[version + 1] = self.server.server_state.remote(version + 1)
        for old in [v for v in self._state_refs if v < version]:
            del self._state_refs[old]
        return ref

    def new_server(self, broadcast_ref, version: int) -> None:
        """A parameter-server actor holding the broadcast in `broadcast_ref` (and the driver's copy of the
        server state) as `version` (not waited for)."""
        server_cls = ray.remote(ParameterServer).options(num_cpus=0)
        update = self.setup.algorithm.server_update
        state = self.state_ref(version)
        self.server = server_cls.remote(
            broadcast_ref, update, self.keep_versions, version, state, self.setup.finalize
        )

    def locate_server(self, labels: dict) -> None:
        # the parameter server has no method for this; __ray_call__ runs the function inside any actor
        server = ray.get(self.server.__ray_call__.remote(actor_location))
        self.server_location = {**server, "label": labels.get(server["node_id"], "")}
        log.info("placement: parameter server on node %s (%s)", server["node_id"][:12], server["ip"])

    def take_over(self, snapshot: ServerSnapshot) -> None:
        """Continue from a global model and server state trained elsewhere (the driver, warm starting)."""
        ref = self._put_snapshot(snapshot)
        self.server.reset.remote(
            ref, snapshot.version, self.state_ref(snapshot.version)
        )  # before later calls

    def current_ref(self):
        """The latest global weights in the object store: put once per version, shared by train and eval.

        While a round is out, the next version's ref is already queued (`_weights`) and the current one is
        kept (`_previous`), so a checkpoint of the current version does not wait for the round. The driver
        owns these refs: the weights outlive a parameter server that dies (`raypfl.runtime.recovery`).
        """
        for cached in (self._weights, self._previous):
            if cached is not None and cached[0] == self.version:
                return cached[1]
        self._weights = (self.version, self.server.pull.remote(self.version))
        return self._weights[1]

    def advance(self, version: int, base_ref, next_ref) -> None:
        """Version `version` (its broadcast in `base_ref`) is done; `next_ref` will hold version+1's."""
        self._previous, self._weights = (version, base_ref), (version + 1, next_ref)

    def run_round(self, plan: RoundPlan, on_submitted: Callable[[], None] | None = None) -> RoundResult:
        if self.tolerant is not None:
            notify(on_submitted)
            return self.tolerant.run_round(plan)
        version = self.version
        weights_ref = self.current_ref()
        cohort = plan.cohort
        groups = assign_cohort(
            cohort, [self.setup.partition.size(c) for c in cohort], len(self.actors), self.sticky
        )
        busy = [(index, group) for index, group in enumerate(groups) if group]
        shares = [Share(slot, index, self.actors[index], group) for slot, (index, group) in enumerate(busy)]
        need = quorum_for(self.setup.faults, plan)
        groups = self.push_groups(shares)
        self.server.expect.remote(version, len(groups), need)
        for share in shares:
            self.train_share(share, weights_ref, plan)
        self.push(version, groups)
        # the server runs its calls in order: the next version and the summary follow the pushes, so
        # the driver queues them now and waits once, instead of a round trip each. The pull goes first:
        # once the summary is in, so are the next version's weights (they outlive the server)
        self._previous = (version, weights_ref)
        self._weights = (version + 1, self.queue_next(version))
        if plan.evaluate:  # behind each actor's training, on the new version: no round trip via the driver
            self._queued_evaluation = (version + 1, self._start_evaluation(self._weights[1]))
        summary_ref = self.server.round_summary.remote()
        notify(on_submitted)
        try:
            per_actor, states = collect_shares(shares, self.sticky)
            *_, summary = ray.get([*(share.push_ref for share in shares), summary_ref])
        except LOST:  # an actor died: replace it, train its share again (raypfl.runtime.recovery)
            # the queued evaluation read the lost round's pull; the recovered version is evaluated afresh
            if self._queued_evaluation is not None:
                self._stale_evaluation += self._queued_evaluation[1][2]
                self._queued_evaluation = None
            if len(groups) < len(shares):
                self.ungroup(version, shares, need)
            per_actor, states, summary = self.recovery.finish_round(
                plan, version, weights_ref, shares, need, summary_ref
            )
        for share, rows in zip(shares, per_actor):
            elapsed = 0.0
            for row in rows:  # an actor's clients answer one after another
                elapsed += row["seconds"]
                row.update(actor=share.actor, rtt_s=round_trip(row, elapsed))
                row["attempts"] += share.retries
        self.version = version + 1
        return RoundResult.from_workers(self.version, per_actor, summary, states)

    def node_of(self, actor: int) -> str | None:
        """The node client actor `actor` was placed on (None if not known)."""
        return self.placement[actor].get("node_id") if actor < len(self.placement) else None

    def push_groups(self, shares: list[Share]) -> list[list[Share]]:
        """The round's pushes: shares whose partials are summed on their node first go together
        (`runtime.node_aggregation`, never with stacked updates); ordered as the shares' slots."""
        mode = "never" if self.setup.stacks else self.spec.node_aggregation
        nodes = [self.node_of(share.actor) for share in shares]
        grouping = node_groups(nodes, self.server_location.get("node_id"), mode)
        return [[shares[i] for i in group] for group in grouping]

    def push(self, version: int, groups: list[list[Share]]) -> None:
        """One push per group, in group order (its slot): a lone share's partial, or a node's sum (by the
        group's first actor, after its own training call)."""
        for slot, group in enumerate(groups):
            partial = group[0].partial_ref
            if len(group) > 1:
                partial = group[0].handle.sum_partials.remote(*[share.partial_ref for share in group])
            push_ref = self.server.push.remote(version, partial, slot)
            for share in group:
                share.push_ref = push_ref

    def ungroup(self, version: int, shares: list[Share], need: int) -> None:
        """A round with node sums lost something: the server starts it over expecting each share's own
        partial (recovery works share by share); the partials of calls that ended well are pushed again.

        A dead server is left to recovery (it pushes every share to the new one); a round that closed
        anyway (every node sum arrived) is left as it is.
        """
        pending = dict.fromkeys([s.metrics_ref for s in shares] + [s.push_ref for s in shares])
        ray.wait(list(pending), num_returns=len(pending))  # every call and push has ended
        try:
            if not ray.get(self.server.reopen.remote(version, len(shares), need)):
                return
        except LOST:
            return
        log.warning("round on version %d lost a node sum: its partials are pushed one by one", version)
        for share in shares:
            share.push_ref = None  # trained again by recovery
            if failure(share.metrics_ref) is None:
                share.push_ref = self.server.push.remote(version, share.partial_ref, share.slot)

    def train_share(self, share: Share, weights_ref, plan: RoundPlan) -> None:
        """Send `share`'s clients to its actor; the call's three result refs go into the share."""
        share.partial_ref, share.metrics_ref, share.states_ref = share.handle.train_cohort.options(
            num_returns=3
        ).remote(
            weights_ref,
            plan.round_idx,
            share.clients,
            {c: plan.work[c] for c in share.clients if c in plan.work},
            {c: plan.states[c] for c in share.clients if c in plan.states},
        )

    def evaluate_async(self) -> Callable[[], Evaluation]:
        """Start evaluating the latest global model on the actors (split evenly); call the result to wait.

        Actors run calls in order, so evaluation queued now runs before the next round's training on
        each actor, but the driver does not wait for it before handing out that round.
        """
        if self.tolerant is not None:
            done = self.tolerant.evaluate(self.current_ref())
            return lambda: done
        version, weights_ref = self.version, self.current_ref()
        queued, self._queued_evaluation = self._queued_evaluation, None
        # queued by run_round (plan.evaluate) right behind the training, else started now
        ranges, handles, parts = (
            queued[1] if queued and queued[0] == version else self._start_evaluation(weights_ref)
        )

        def collect() -> Evaluation:
            try:
                return combine_evaluations(ray.get(parts))
            except LOST:  # an actor died: its part is evaluated again on another one
                return self.recovery.finish_evaluation(version, weights_ref, ranges, parts, handles)
            finally:
                self._drop_stale_evaluation()

        return collect

    def _drop_stale_evaluation(self) -> None:
        """Collect, and ignore, the failed evaluation calls of a round recovered from a lost actor (they ran
        before this evaluation on their actors, or their actor is gone): Ray would report them unhandled."""
        stale, self._stale_evaluation = self._stale_evaluation, []
        for ref in stale:
            with contextlib.suppress(Exception):
                ray.get(ref, timeout=5)

    def _start_evaluation(self, weights_ref) -> tuple[list[tuple[int, int]], list, list]:
        """The test set split evenly over the actors, each part called: (ranges, actors, refs)."""
        ranges = split_range(len(self.setup.dataset.test_y), len(self.actors))
        handles = self.actors[: len(ranges)]
        return (
            ranges,
            handles,
            [actor.evaluate.remote(weights_ref, a, b) for actor, (a, b) in zip(handles, ranges)],
        )

    def evaluate(self) -> Evaluation:
        return self.evaluate_async()()

    def evaluate_clients(self, clients: list[int], states: dict[int, Any]) -> list[dict[str, Any]]:
        """Each client on its held-out data, the clients split evenly over the actors (each actor gets the
        states of its share). With faults.* configured, or if an actor dies meanwhile, the driver does it
        itself instead (slower, never lost)."""
        weights_ref = self.current_ref()
        if self.tolerant is None:
            chunks = [clients[a:b] for a, b in split_range(len(clients), len(self.actors))]
            refs = [
                actor.evaluate_clients.remote(weights_ref, chunk, _subset(states, chunk))
                for actor, chunk in zip(self.actors, chunks)
            ]
            try:
                return [row for part in ray.get(refs) for row in part]
            except LOST as exc:
                log.warning("per-client evaluation: an actor was lost (%s); the driver evaluates", exc)
        if self._driver_worker is None:
            self._driver_worker = ClientWorker(self.setup)
        return self._driver_worker.evaluate_clients(ray.get(weights_ref), clients, states)

    def global_weights(self) -> np.ndarray:
        return np.array(ray.get(self.current_ref())[MODEL])

    def server_snapshot(self) -> ServerSnapshot:
        broadcast: Arrays = ray.get(self.current_ref())
        ref = self.state_ref(self.version)
        state = ray.get(ref) if ref is not None else {}
        return ServerSnapshot(self.version, {k: np.array(v) for k, v in broadcast.items()}, state)

    def stream(self):
        """Streaming primitives for asynchronous rounds (raypfl.runtime.ray_stream)."""
        from raypfl.runtime.ray_stream import RayStream

        return RayStream(self)

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        if self.server is not None:
            ray.kill(self.server)
        self.actors, self.server, self._weights, self.tolerant = [], None, None, None
        self._previous = self._setup_ref = self.recovery = self._driver_worker = None
        self._queued_evaluation = None
        self._state_refs = {}
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False


def _subset(states: dict[int, Any], clients: list[int]) -> dict[int, Any]:
    """The states of `clients` that have one."""
    return {c: states[c] for c in clients if c in states}
