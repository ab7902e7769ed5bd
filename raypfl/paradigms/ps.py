"""Parameter-server SGD on Ray: `paradigm=ps_sync` and `paradigm=ps_async`.

Each worker is a Ray actor holding its data shard and running its own loop against the server actor:
sync: `pull(v)` (waits until v is published), gradient on one batch, `push(v, grad)`; async:
`pull_latest()`, gradient, `push(v, grad)` with no barrier. Gradients go straight from the worker to the
server (ObjectRefs, never through the driver); the driver only collects the points to evaluate.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Iterator

import numpy as np
import ray
import torch

from raypfl.paradigms.base import ParadigmContext, Point, points_while
from raypfl.paradigms.gradient_server import GradientServer
from raypfl.paradigms.worker import ShardTrainer

log = logging.getLogger("raypfl")


@ray.remote(num_cpus=0)
class ServerActor:
    """A GradientServer as an async actor: `pull(v)` awaits version v instead of returning None."""

    def __init__(self, *args, **kwargs):
        torch.set_num_threads(1)
        self.server = GradientServer(*args, **kwargs)
        self._published: asyncio.Event | None = None

    def _event(self) -> asyncio.Event:
        if self._published is None:
            self._published = asyncio.Event()
        return self._published

    async def push(
        self, version: int, gradient: np.ndarray, worker: int, iteration: int, loss: float, n: int
    ) -> bool:
        before = self.server.latest
        going_on = self.server.push(version, gradient, worker, iteration, loss, n)
        if self.server.latest != before or not going_on:
            self._event().set()
            self._published = None
        return going_on

    async def pull(self, version: int) -> np.ndarray | None:
        """Version `version`, waiting until it is published; None if the run ends first."""
        while version > self.server.latest and not self.server.done:
            await self._event().wait()
        return self.server.pull(version)

    async def pull_latest(self) -> tuple[int, np.ndarray, bool]:
        """(newest version, its weights, whether the budget is spent)."""
        version, weights = self.server.pull_latest()
        return version, weights, self.server.done

    async def take_points(self) -> list[Point]:
        return self.server.take_points()

    async def stats(self) -> dict:
        return self.server.stats()

    async def apply_log(self) -> list[tuple[int, int, float]]:
        return self.server.apply_log


@ray.remote(num_cpus=1)
class PSWorker:
    """One worker: its shard and model; runs the sync or async loop against the server actor."""

    def __init__(self, ctx: ParadigmContext, dataset, worker: int):
        torch.set_num_threads(ctx.torch_threads)
        self.worker = worker
        self.trainer = ShardTrainer.for_shard(ctx, dataset, worker, ctx.delay(worker))

    def ready(self) -> bool:
        return True

    def run_sync(self, server, steps: int) -> list[dict]:
        """`steps` iterations of pull(v) -> gradient -> push(v); per-iteration timings."""
        times = []
        pushed = None
        for v in range(steps):
            t0 = time.perf_counter()
            weights = _pull_after(server.pull.remote(v), pushed)
            t1 = time.perf_counter()
            grad, loss, n = self.trainer.gradient(weights)
            t2 = time.perf_counter()
            pushed = server.push.remote(v, grad, self.worker, v, loss, n)  # not awaited: pull(v+1) waits
            t3 = time.perf_counter()
            times.append({"iteration": v, "compute_s": t2 - t1, "wait_s": (t1 - t0) + (t3 - t2)})
        _pull_after(server.pull.remote(steps), pushed)  # the last step is applied before the worker reports
        return times

    def run_async(self, server) -> list[dict]:
        """pull_latest -> gradient -> push, with no barrier, until the server's budget is spent."""
        times = []
        iteration = 0
        pushed = None
        while True:
            t0 = time.perf_counter()
            version, weights, done = _pull_after(server.pull_latest.remote(), pushed)
            if done:
                return times
            t1 = time.perf_counter()
            grad, loss, n = self.trainer.gradient(weights)
            t2 = time.perf_counter()
            pushed = server.push.remote(version, grad, self.worker, iteration, loss, n)
            t3 = time.perf_counter()
            times.append({"iteration": iteration, "compute_s": t2 - t1, "wait_s": (t1 - t0) + (t3 - t2)})
            iteration += 1


def _pull_after(pull, pushed, check_s: float = 2.0):
    """The pull's result; but if the worker's previous push failed on the server, raise its error.

    Pushes are not awaited (the next pull needs no extra round trip), so a push that raised would otherwise
    go unseen, and a synchronous worker would wait forever for a version that push was to complete. The push
    is looked at only when the pull takes longer than `check_s` (looking every time costs ~5 ms a step).
    """
    while True:
        try:
            return ray.get(pull, timeout=check_s)
        except ray.exceptions.GetTimeoutError:
            if pushed is not None and ray.wait([pushed], timeout=0)[0]:
                ray.get(pushed)


def _start(ctx: ParadigmContext, mode: str, steps: int | None) -> tuple[object, list]:
    server = ServerActor.remote(
        ctx.weights,
        ctx.optim,
        ctx.ps,
        ctx.dist.workers,
        mode,
        ctx.total_samples,
        ctx.dist.eval_samples,
        steps,
    )
    shared = ctx.for_workers()
    workers = [PSWorker.remote(shared, ctx.dataset_ref, w) for w in range(ctx.dist.workers)]
    ray.get([w.ready.remote() for w in workers])
    return server, workers


def _stop(server, workers: list) -> None:
    """End the actors now, freeing their CPUs for whatever runs next."""
    for actor in [*workers, server]:
        ray.kill(actor)


def _breakdown(ctx: ParadigmContext, server, per_worker: list[list[dict]], sync: bool) -> None:
    """Rows per (iteration, worker): compute, communication + waiting, and the server's apply time."""
    apply = {(w, i): s for w, i, s in ray.get(server.apply_log.remote())}
    # sync: the step that publishes v+1 (made by the last push for v) is waited for in every worker's
    # pull(v+1), so it is charged to each worker's iteration v+1 and taken out of its waiting time
    step_s: dict[int, float] = {}
    for (_, i), s in apply.items():
        step_s[i] = max(step_s.get(i, 0.0), s)
    for w, rows in enumerate(per_worker):
        for r in rows:
            i = r["iteration"]
            apply_s = step_s.get(i - 1, 0.0) if sync else apply.get((w, i), 0.0)
            comm_s = max(0.0, r["wait_s"] - apply_s) if sync else r["wait_s"]
            ctx.breakdown.append(
                {
                    "iteration": i,
                    "worker": w,
                    "compute_s": r["compute_s"],
                    "comm_s": comm_s,
                    "apply_s": apply_s,
                }
            )


def train_sync(ctx: ParadigmContext) -> Iterator[Point]:
    """Synchronous parameter-server SGD: one optimizer step per version on all workers' gradients."""
    steps = math.ceil(ctx.total_samples / (ctx.dist.workers * ctx.dist.batch_size))
    server, workers = _start(ctx, "sync", steps)
    try:
        running = [w.run_sync.remote(server, steps) for w in workers]
        yield from points_while(running, lambda: ray.get(server.take_points.remote()))
        _breakdown(ctx, server, ray.get(running), sync=True)
        ctx.summary.update(ray.get(server.stats.remote()))
    finally:
        _stop(server, workers)


def train_async(ctx: ParadigmContext) -> Iterator[Point]:
    """Asynchronous parameter-server SGD: every gradient applied on arrival, staleness bounded."""
    server, workers = _start(ctx, "async", None)
    try:
        running = [w.run_async.remote(server) for w in workers]
        yield from points_while(running, lambda: ray.get(server.take_points.remote()))
        _breakdown(ctx, server, ray.get(running), sync=False)
        stats = ray.get(server.stats.remote())
        ctx.summary.update(stats)
        ctx.tables["staleness"] = [
            {"worker": w, "staleness": s, "gradients": n}
            for w, ws in stats["workers"].items()
            for s, n in ws["histogram"].items()
        ]
        log.info(
            "staleness: %d gradients, %d applied, %d dropped (ps.max_staleness=%s, ps.stale_policy=%s)",
            stats["received"],
            stats["applied"],
            stats["dropped"],
            ctx.ps.max_staleness,
            ctx.ps.stale_policy,
        )
        for w, ws in stats["workers"].items():
            log.info(
                "  worker %d: %d gradients, staleness mean %.2f max %d, %d dropped",
                w,
                ws["gradients"],
                ws["staleness_mean"],
                ws["staleness_max"],
                ws["dropped"],
            )
    finally:
        _stop(server, workers)
