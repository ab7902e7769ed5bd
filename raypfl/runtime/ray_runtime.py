"""The Ray runtime: a pool of long-lived client actors and a parameter-server actor.

Per round the global weights are put in the object store once (the parameter server's `pull`),
each actor trains its share of the cohort in place and pushes ONE partial sum straight to the
parameter server (an ObjectRef, never fetched by the driver); only per-client metrics come back.
Evaluation is split over the actors, so it uses every core too.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import ray

from raypfl.config import RuntimeSpec
from raypfl.runtime.base import Evaluation, RoundResult, combine_evaluations
from raypfl.runtime.parameter_server import ParameterServer
from raypfl.runtime.scheduling import assign_cohort, split_range
from raypfl.runtime.setup import FederationSetup
from raypfl.runtime.worker import ClientWorker

log = logging.getLogger(__name__)


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
        self.test_ranges: list[tuple[int, int]] = []
        self._weights: tuple[int, object] | None = None  # (version, ObjectRef) of the latest global weights

    def start(self, setup: FederationSetup, initial_weights: np.ndarray) -> None:
        self.started_ray = start_ray(self.spec)
        num_actors = pool_size(self.spec)
        setup_ref = ray.put(setup)  # dataset arrays go into the object store once; actors read them zero-copy
        actor_cls = ray.remote(ClientWorker).options(
            num_cpus=self.spec.cpus_per_actor, num_gpus=self.spec.gpus_per_actor
        )
        self.actors = [actor_cls.remote(setup_ref) for _ in range(num_actors)]
        server_cls = ray.remote(ParameterServer).options(num_cpus=0)
        self.server = server_cls.remote(initial_weights, setup.algorithm.server_update, self.keep_versions)
        self.sizes = [setup.partition.size(c) for c in range(setup.partition.num_clients)]
        self.sticky = setup.algorithm.stateful_clients
        self.test_ranges = split_range(len(setup.dataset.test_y), num_actors)
        self.version = 0
        ray.get([actor.ready.remote() for actor in self.actors])  # start-up is not billed to round 1
        log.info(
            "ray runtime: %d client actors (%.2g CPU each), parameter server actor; Ray %s (node %s)",
            num_actors,
            self.spec.cpus_per_actor,
            "started for this run" if self.started_ray else "already running",
            ray.get_runtime_context().get_node_id()[:12],
        )

    def _weights_ref(self):
        """The latest global weights in the object store: put once per version, shared by train and eval."""
        if self._weights is None or self._weights[0] != self.version:
            self._weights = (self.version, self.server.pull.remote(self.version))
        return self._weights[1]

    def run_round(self, round_idx: int, cohort: list[int]) -> RoundResult:
        version = self.version
        weights_ref = self._weights_ref()
        groups = assign_cohort(cohort, [self.sizes[c] for c in cohort], len(self.actors), self.sticky)
        busy = [(actor, group) for actor, group in zip(self.actors, groups) if group]
        self.server.expect.remote(version, len(busy))
        metric_refs, push_refs = [], []
        for actor, group in busy:
            partial_ref, metrics_ref = actor.train_cohort.options(num_returns=2).remote(
                weights_ref, round_idx, group
            )
            push_refs.append(self.server.push.remote(version, partial_ref))
            metric_refs.append(metrics_ref)
        per_actor = ray.get(metric_refs)
        ray.get(push_refs)
        self.version = version + 1
        return RoundResult.from_workers(self.version, per_actor, ray.get(self.server.round_summary.remote()))

    def evaluate(self) -> Evaluation:
        weights_ref = self._weights_ref()
        parts = [
            actor.evaluate.remote(weights_ref, a, b) for actor, (a, b) in zip(self.actors, self.test_ranges)
        ]
        return combine_evaluations(ray.get(parts))

    def global_weights(self) -> np.ndarray:
        return np.array(ray.get(self._weights_ref()))

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        if self.server is not None:
            ray.kill(self.server)
        self.actors, self.server, self._weights = [], None, None
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False
