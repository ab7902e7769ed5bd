"""The parameter server of parameter-server SGD: versioned weights, gradients in, optimizer steps out.

Synchronous (`mode="sync"`): version v is open until every worker has pushed its gradient for v; the server
then combines them (`ps.combine=sum|mean`, summed in worker order, so the result does not depend on who was
first), takes one step of its optimizer (`optim.*`, SGD with momentum by default) and publishes v+1.
Asynchronous (`mode="async"`): no barrier; each gradient is applied when it arrives. Its staleness is the
number of versions published since the version it was computed on; gradients staler than
`ps.max_staleness` are dropped, and with `ps.stale_policy=scale` the others are weighted 1 / (1 + staleness).
A gradient with NaN/Inf is rejected and logged (sync: the barrier still counts that worker, and the mean is
over the accepted gradients; if none is left, v+1 is v unchanged).

`pull(v)` returns version v, None if it does not exist yet (the Ray actor's `pull` waits for it instead),
and raises `VersionEvicted` if it is older than the last `ps.keep_versions`. `pull_latest()` returns the
newest version and its number. The server keeps the points to evaluate (every `eval_samples` samples).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter

import numpy as np

from raypfl.config import OptimSpec
from raypfl.paradigms.base import Point
from raypfl.paradigms.spec import PSSpec
from raypfl.paradigms.worker import FlatOptimizer
from raypfl.runtime.parameter_server import VersionedWeights, VersionEvicted

__all__ = ["GradientServer", "VersionEvicted"]

log = logging.getLogger("raypfl")


class GradientServer(VersionedWeights):
    """Versioned weights updated by worker gradients, synchronously (a barrier per version) or not."""

    def __init__(
        self,
        weights: np.ndarray,
        optim: OptimSpec,
        ps: PSSpec,
        workers: int,
        mode: str,
        total_samples: int,
        eval_samples: int,
        steps: int | None = None,
    ):
        """`steps` (sync): versions to publish; async runs until `total_samples` samples are in."""
        if mode not in ("sync", "async"):
            raise ValueError(f"mode={mode} must be sync or async")
        if mode == "sync" and steps is None:
            raise ValueError("a synchronous server needs its number of steps")
        super().__init__(weights, ps.keep_versions)
        self.ps, self.workers, self.mode, self.steps = ps, workers, mode, steps
        self.optimizer = FlatOptimizer(weights, optim)
        self.pending: dict[int, dict[int, np.ndarray]] = {}  # sync: version -> worker -> gradient
        self.total_samples, self.eval_samples = total_samples, eval_samples
        self.samples = 0  # samples behind every gradient received within the budget
        self.received = self.applied = self.dropped = self.after_budget = 0
        self.staleness: Counter = Counter()  # (worker, staleness) -> gradients
        self.dropped_by_worker: Counter = Counter()
        self.rejected_by_worker: Counter = Counter()  # non-finite (NaN/Inf) gradients
        self.apply_log: list[tuple[int, int, float]] = []  # (worker, iteration, seconds applying)
        self.points: list[Point] = []
        self._loss_sum = 0.0
        self._loss_n = 0
        self._next_eval = eval_samples

    @property
    def done(self) -> bool:
        if self.steps is not None:
            return self.latest >= self.steps
        return self.samples >= self.total_samples

    def push(
        self, version: int, gradient: np.ndarray, worker: int, iteration: int, loss: float, n: int
    ) -> bool:
        """A worker's gradient on `version` (its `iteration`-th, from `n` samples).

        Returns False once the budget is spent (the worker stops).
        """
        if self.done:
            self.after_budget += 1
            return False
        self.received += 1
        self.samples += n
        gradient = np.asarray(gradient, np.float32)
        finite = bool(np.isfinite(gradient).all())
        if not finite:  # rejected, counted and logged; a sync barrier still counts the worker as answered
            self.rejected_by_worker[worker] += 1
            log.warning(
                "rejected a non-finite gradient from worker %d (its iteration %d, on version %d)",
                worker,
                iteration,
                version,
            )
        elif math.isfinite(loss):
            self._loss_sum += loss * n
            self._loss_n += n
        start = time.perf_counter()
        if self.mode == "sync":
            stepped = self._push_sync(version, gradient if finite else None, worker)
        else:
            stepped = self._push_async(version, gradient, worker) if finite else True
        self.apply_log.append((worker, iteration, time.perf_counter() - start))
        if stepped and (self.samples >= self._next_eval or self.done):
            self._point()
            while self._next_eval <= self.samples:
                self._next_eval += self.eval_samples
        return not self.done

    def _push_sync(self, version: int, gradient: np.ndarray | None, worker: int) -> bool:
        if version != self.latest:
            raise ValueError(f"sync push on version {version}: the server is at version {self.latest}")
        grads = self.pending.setdefault(version, {})
        if worker in grads:
            raise ValueError(f"worker {worker} pushed twice for version {version}")
        grads[worker] = gradient  # None: rejected
        self.staleness[(worker, 0)] += 1
        if len(grads) < self.workers:
            return False
        del self.pending[version]
        accepted = [grads[w] for w in range(self.workers) if grads[w] is not None]  # in worker order
        if not accepted:
            log.warning("version %d: every gradient was rejected; the model is published unchanged", version)
            self._publish(self.versions[version])
            return True
        combined = accepted[0].copy()
        for grad in accepted[1:]:
            combined += grad
        if self.ps.combine == "mean":
            combined /= len(accepted)
        self._publish(self.optimizer.step(combined))
        self.applied += len(accepted)
        return True

    def _push_async(self, version: int, gradient: np.ndarray, worker: int) -> bool:
        staleness = self.latest - version
        self.staleness[(worker, staleness)] += 1
        if self.ps.max_staleness is not None and staleness > self.ps.max_staleness:
            self.dropped += 1
            self.dropped_by_worker[worker] += 1
            return True
        scale = 1.0 / (1 + staleness) if self.ps.stale_policy == "scale" else 1.0
        self._publish(self.optimizer.step(gradient, scale))
        self.applied += 1
        return True

    def _point(self) -> None:
        loss = self._loss_sum / self._loss_n if self._loss_n else float("nan")
        self._loss_sum, self._loss_n = 0.0, 0
        extra: dict = {"version": self.latest}
        if self.mode == "async":
            extra.update(staleness_mean=round(self.mean_staleness(), 4), dropped=self.dropped)
        self.points.append(
            Point(self.samples, self.latest, time.time(), self.versions[self.latest], loss, extra)
        )

    def take_points(self) -> list[Point]:
        points, self.points = self.points, []
        return points

    def mean_staleness(self) -> float:
        total = sum(self.staleness.values())
        return sum(s * n for (_, s), n in self.staleness.items()) / total if total else 0.0

    def stats(self) -> dict:
        """Gradients received, applied, dropped; staleness per worker (mean, max, histogram)."""
        per_worker = {}
        for w in range(self.workers):
            hist = {s: n for (worker, s), n in sorted(self.staleness.items()) if worker == w}
            count = sum(hist.values())
            per_worker[w] = {
                "gradients": count,
                "dropped": self.dropped_by_worker[w],
                "rejected": self.rejected_by_worker[w],
                "staleness_mean": sum(s * n for s, n in hist.items()) / count if count else 0.0,
                "staleness_max": max(hist, default=0),
                "histogram": hist,
            }
        return {
            "received": self.received,
            "applied": self.applied,
            "dropped": self.dropped,
            "rejected": sum(self.rejected_by_worker.values()),
            "after_budget": self.after_budget,
            "versions": self.latest,
            "staleness_mean": self.mean_staleness(),
            "workers": per_worker,
        }
