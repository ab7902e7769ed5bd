"""Synchronous data-parallel SGD with a real collective: `paradigm=allreduce`.

Each worker is a Ray actor in one `torch.distributed` gloo process group (rank 0's actor names the
rendezvous: a file store on a local Ray, a TCP address on a cluster). Every step each replica computes the
gradient of its own batch, the flat gradients (plus the batch loss) are summed by one `all_reduce` and
divided by the world size, and every replica takes the same optimizer step. Replicas start from the same
weights, so they stay identical; after training `check_replicas` compares them (max abs difference <= 1e-6)
and the run fails loudly if they diverged.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta

import numpy as np
import ray
import torch
import torch.distributed as dist

from raypfl.errors import RaypflError
from raypfl.paradigms.base import ParadigmContext, Point, points_while
from raypfl.paradigms.worker import ShardTrainer

log = logging.getLogger("raypfl")

REPLICA_TOLERANCE = 1e-6


class ReplicaDivergence(RaypflError):
    """The all-reduce replicas ended with different weights."""


def check_replicas(replicas: list[np.ndarray], tolerance: float = REPLICA_TOLERANCE) -> float:
    """The largest abs difference of any replica from replica 0; ReplicaDivergence above `tolerance`."""
    gap = float(np.max([np.max(np.abs(r - replicas[0])) for r in replicas]))  # NaN propagates
    if not gap <= tolerance:  # (NaN fails too)
        raise ReplicaDivergence(f"all-reduce replicas diverged: max abs difference {gap:.3g} > {tolerance:g}")
    log.info(
        "replica check passed: %d replicas, max abs difference %.3g <= %g", len(replicas), gap, tolerance
    )
    return gap


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def rendezvous_address(node_ip: str) -> str:
    """A Ray bound to the loopback (a local run) is one machine: a file store in its temp folder, so the
    group opens no TCP port beyond the loopback (a TCP store listens on every interface); on a cluster, a
    TCP address on this node."""
    if ipaddress.ip_address(node_ip).is_loopback:
        return f"file://{tempfile.gettempdir()}/raypfl-gloo-{uuid.uuid4().hex}"
    return f"tcp://{node_ip}:{free_port()}"


@ray.remote(num_cpus=1, concurrency_groups={"control": 1})
class AllReduceWorker:
    """One replica: its shard, its model and optimizer, and its rank in the gloo group."""

    def __init__(self, ctx: ParadigmContext, dataset, rank: int):
        torch.set_num_threads(ctx.torch_threads)
        self.rank, self.world = rank, ctx.dist.workers
        self.trainer = ShardTrainer.for_shard(ctx, dataset, rank, ctx.delay(rank))
        self.points: list[Point] = []

    def rendezvous(self) -> str:
        """rank 0: where the group meets (`rendezvous_address` of this node)."""
        return rendezvous_address(ray.util.get_node_ip_address())

    def join(self, address: str) -> None:
        if address.startswith("file://"):  # one machine: gloo's own sockets on the loopback too
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group(
            "gloo", init_method=address, rank=self.rank, world_size=self.world, timeout=timedelta(seconds=120)
        )

    def run(self, steps: int, eval_every: int, samples_per_step: int) -> list[dict]:
        """`steps` all-reduce SGD steps; rank 0 keeps a point every `eval_every` steps and at the end."""
        times = []
        loss_sum, loss_steps = 0.0, 0
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            grad, loss, _ = self.trainer.gradient_tensor()
            buffer = torch.cat([grad, torch.tensor([loss])])
            t1 = time.perf_counter()
            dist.all_reduce(buffer)  # sum over the replicas
            buffer /= self.world
            t2 = time.perf_counter()
            self.trainer.set_gradient(buffer[:-1])
            self.trainer.optimizer.step()
            t3 = time.perf_counter()
            times.append({"iteration": step - 1, "compute_s": t1 - t0, "comm_s": t2 - t1, "apply_s": t3 - t2})
            loss_sum += float(buffer[-1])
            loss_steps += 1
            if self.rank == 0 and (step % eval_every == 0 or step == steps):
                point = Point(
                    step * samples_per_step, step, time.time(), self.trainer.weights(), loss_sum / loss_steps
                )
                self.points.append(point)
                loss_sum, loss_steps = 0.0, 0
        return times

    @ray.method(concurrency_group="control")
    def take_points(self) -> list[Point]:
        points, self.points = self.points, []
        return points

    def weights(self) -> np.ndarray:
        return self.trainer.weights()

    def perturb(self, scale: float) -> None:
        """Add noise to this replica (tests: the replica check must catch it)."""
        weights = self.trainer.weights()
        self.trainer.load(
            weights
            + np.float32(scale) * np.random.default_rng(self.rank).standard_normal(weights.size, np.float32)
        )


def start_group(ctx: ParadigmContext) -> list:
    """The replicas, joined in one gloo group."""
    shared = ctx.for_workers()
    workers = [AllReduceWorker.remote(shared, ctx.dataset_ref, r) for r in range(ctx.dist.workers)]
    address = ray.get(workers[0].rendezvous.remote())
    ray.get([w.join.remote(address) for w in workers])
    return workers


def train(ctx: ParadigmContext, perturb_rank: int | None = None) -> Iterator[Point]:
    """All-reduce SGD for the budget; then the replica check (logged, and in the run summary)."""
    per_step = ctx.dist.workers * ctx.dist.batch_size
    steps = math.ceil(ctx.total_samples / per_step)
    eval_every = max(1, round(ctx.dist.eval_samples / per_step))
    workers = start_group(ctx)
    try:
        running = [w.run.remote(steps, eval_every, per_step) for w in workers]
        yield from points_while(running, lambda: ray.get(workers[0].take_points.remote()))
        for rank, rows in enumerate(ray.get(running)):
            ctx.breakdown.extend({**r, "worker": rank} for r in rows)
        if perturb_rank is not None:
            ray.get(workers[perturb_rank].perturb.remote(1e-3))
        gap = check_replicas(ray.get([w.weights.remote() for w in workers]))
        ctx.summary.update({"replicas": len(workers), "replica_max_abs_diff": gap, "replica_check": "passed"})
    finally:
        for w in workers:  # frees their CPUs for whatever runs next; the gloo group ends with them
            ray.kill(w)
