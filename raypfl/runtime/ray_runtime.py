"""The Ray runtime: a pool of long-lived client actors and a parameter-server actor.

Per round the global weights are put in the object store once (the parameter server's `pull`).
Plain synchronous rounds take the fast path: each actor trains its share of the cohort in place and
pushes ONE partial sum straight to the parameter server (an ObjectRef, never fetched by the driver);
only per-client metrics come back. When `faults.*` asks for more (quorum, deadlines, injected faults,
load balancing), rounds take the tolerant path in `raypfl.runtime.tolerant`: one call per client, so
that the round can close on a quorum and lost actors can be retried. Evaluation is split over the
actors, so it uses every core too.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import ray

from raypfl.config import RuntimeSpec
from raypfl.runtime.base import (
    Evaluation,
    RoundPlan,
    RoundResult,
    combine_evaluations,
    quorum_for,
    round_trip,
)
from raypfl.runtime.parameter_server import ParameterServer
from raypfl.runtime.scheduling import assign_cohort, split_range
from raypfl.runtime.setup import FederationSetup
from raypfl.runtime.worker import ClientWorker

log = logging.getLogger(__name__)

#: Restarts Ray grants a client actor that dies when faults are being injected.
ACTOR_RESTARTS = 3


def start_ray(spec: RuntimeSpec) -> bool:
    """Start a local Ray (or join `runtime.address`) unless one is already up; True if we started it."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    kwargs: dict = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": True}
    if spec.address:
        ray.init(address=spec.address, **kwargs)
    else:
        store = spec.object_store_mb * 1024 * 1024 if spec.object_store_mb else None
        ray.init(
            address="local", num_cpus=spec.num_cpus or os.cpu_count(), object_store_memory=store, **kwargs
        )
    return True


def pool_size(spec: RuntimeSpec) -> int:
    """`runtime.num_actors`, or as many 1-CPU actors as Ray has CPUs."""
    if spec.num_actors:
        return spec.num_actors
    cpus = ray.cluster_resources().get("CPU", 1)
    return max(1, int(cpus // spec.cpus_per_actor))


@ray.remote(concurrency_groups={"control": 1})
class ClientActor(ClientWorker):
    """A ClientWorker as a Ray actor; `cancel_round` runs beside training (its own concurrency group)."""

    @ray.method(concurrency_group="control")
    def cancel_round(self, round_idx: int) -> None:
        ClientWorker.cancel_round(self, round_idx)


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
        self.sizes: list[int] = []
        self.sticky = False
        self.setup: FederationSetup | None = None
        self.tolerant = None  # a TolerantRounds when faults are configured
        self._setup_ref = None
        self._weights: tuple[int, object] | None = None  # (version, ObjectRef) of the latest global weights

    @property
    def parallelism(self) -> int:
        return len(self.actors)

    def start(self, setup: FederationSetup, initial_weights: np.ndarray, version: int = 0) -> None:
        self.started_ray = start_ray(self.spec)
        self.setup = setup
        num_actors = pool_size(self.spec)
        # dataset arrays go into the object store once; actors read them zero-copy. The runtime holds the
        # reference for its whole life: a restarted actor (faults) is rebuilt from it. (Ray still logs a
        # core_worker warning about object-store arguments of restartable actors; holding the ref is its fix.)
        self._setup_ref = setup_ref = ray.put(setup)
        faulty = setup.faults is not None and setup.faults.active
        actor_cls = ClientActor.options(
            num_cpus=self.spec.cpus_per_actor,
            num_gpus=self.spec.gpus_per_actor,
            max_restarts=ACTOR_RESTARTS if faulty else 0,
        )
        self.actors = [actor_cls.remote(setup_ref, self.spec.rebuild_model) for _ in range(num_actors)]
        server_cls = ray.remote(ParameterServer).options(num_cpus=0)
        self.server = server_cls.remote(
            initial_weights, setup.algorithm.server_update, self.keep_versions, version
        )
        self.sizes = [setup.partition.size(c) for c in range(setup.partition.num_clients)]
        self.sticky = setup.algorithm.stateful_clients
        self.version = version
        incarnations = ray.get([actor.ready.remote() for actor in self.actors])  # not billed to round 1
        if faulty:
            from raypfl.runtime.tolerant import TolerantRounds

            self.tolerant = TolerantRounds(self, setup, incarnations)
        log.info(
            "ray runtime: %d client actors (%.2g CPU each), parameter server actor; Ray %s (node %s)%s",
            num_actors,
            self.spec.cpus_per_actor,
            "started for this run" if self.started_ray else "already running",
            ray.get_runtime_context().get_node_id()[:12],
            "; fault-tolerant rounds" if faulty else "",
        )

    def _weights_ref(self):
        """The latest global weights in the object store: put once per version, shared by train and eval."""
        if self._weights is None or self._weights[0] != self.version:
            self._weights = (self.version, self.server.pull.remote(self.version))
        return self._weights[1]

    def run_round(self, plan: RoundPlan) -> RoundResult:
        if self.tolerant is not None:
            return self.tolerant.run_round(plan)
        version = self.version
        weights_ref = self._weights_ref()
        cohort = plan.cohort
        groups = assign_cohort(cohort, [self.sizes[c] for c in cohort], len(self.actors), self.sticky)
        busy = [(index, group) for index, group in enumerate(groups) if group]
        self.server.expect.remote(version, len(busy), quorum_for(self.setup.faults, len(cohort)))
        metric_refs, state_refs, push_refs = [], [], []
        for index, group in busy:
            partial_ref, metrics_ref, states_ref = (
                self.actors[index]
                .train_cohort.options(num_returns=3)
                .remote(
                    weights_ref,
                    plan.round_idx,
                    group,
                    {c: plan.work[c] for c in group if c in plan.work},
                    {c: plan.states[c] for c in group if c in plan.states},
                )
            )
            push_refs.append(self.server.push.remote(version, partial_ref))
            metric_refs.append(metrics_ref)
            state_refs.append(states_ref)
        per_actor = ray.get(metric_refs)
        for (index, _), rows in zip(busy, per_actor):
            elapsed = 0.0
            for row in rows:  # an actor's clients answer one after another
                elapsed += row["seconds"]
                row.update(actor=index, rtt_s=round_trip(row, elapsed))
        states: dict = {}
        if self.sticky:
            for part in ray.get(state_refs):
                states.update(part)
        ray.get(push_refs)
        self.version = version + 1
        summary = ray.get(self.server.round_summary.remote())
        return RoundResult.from_workers(self.version, per_actor, summary, states)

    def evaluate(self) -> Evaluation:
        if self.tolerant is not None:
            return self.tolerant.evaluate(self._weights_ref())
        weights_ref = self._weights_ref()
        ranges = split_range(len(self.setup.dataset.test_y), len(self.actors))
        parts = [actor.evaluate.remote(weights_ref, a, b) for actor, (a, b) in zip(self.actors, ranges)]
        return combine_evaluations(ray.get(parts))

    def global_weights(self) -> np.ndarray:
        return np.array(ray.get(self._weights_ref()))

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        if self.server is not None:
            ray.kill(self.server)
        self.actors, self.server, self._weights, self.tolerant = [], None, None, None
        self._setup_ref = None
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False
