"""Warm start: train the first rounds in the driver while the Ray actor pool boots.

Starting Ray and its actors takes seconds (Ray's processes, then each actor imports torch and maps the
dataset). Nothing about a round depends on where its clients train (every client's randomness is
seeded by (root seed, round, client)), so the driver trains rounds itself with an in-process worker
until the pool is ready, then hands the global model (weights and version) to the parameter-server
actor and every later round runs on the actors. Same seed, same model: only float summation order
differs (≤ 1e-6). `runtime.warm_start=false` waits for the pool instead.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from raypfl.runtime.base import Evaluation, RoundPlan, RoundResult
from raypfl.runtime.sequential import SequentialRuntime
from raypfl.runtime.setup import FederationSetup

log = logging.getLogger(__name__)


def _not_main_thread_notice(record: logging.LogRecord) -> bool:
    """Drop Ray's notice that it set no SIGTERM handler (it cannot, off the main thread; Ray's processes
    still notice a driver that dies and clean up)."""
    return "SIGTERM handler is not set" not in record.getMessage()


class WarmStart:
    """A Ray runtime whose first rounds run in the driver until its actors are ready."""

    is_driver = True

    def __init__(self, pool, keep_versions: int = 2):
        self.pool = pool  # a RayRuntime: start() in a thread, then take_over(weights, version)
        self.local: SequentialRuntime | None = SequentialRuntime(keep_versions)
        self._boot: threading.Thread | None = None
        self._error: BaseException | None = None
        self._started = 0.0
        self.local_rounds = 0  # rounds the driver trained before the pool took over

    @property
    def parallelism(self) -> int:
        return self.pool.expected_parallelism() if self.local is not None else self.pool.parallelism

    @property
    def version(self) -> int:
        return self.local.version if self.local is not None else self.pool.version

    def start(self, setup: FederationSetup, initial_weights: np.ndarray, version: int = 0) -> None:
        if setup.faults is not None and setup.faults.active:  # fault-tolerant rounds need the pool
            self.local = None
            self.pool.start(setup, initial_weights, version)
            return
        self.local.start(setup, initial_weights, version)
        self._started = time.perf_counter()
        args = (setup, initial_weights, version)
        self._boot = threading.Thread(target=self._run_boot, args=args, name="raypfl-boot", daemon=True)
        self._boot.start()

    def _run_boot(self, setup: FederationSetup, initial_weights: np.ndarray, version: int) -> None:
        logging.getLogger("ray._private.worker").addFilter(_not_main_thread_notice)
        try:
            self.pool.start(setup, initial_weights, version)
        except BaseException as exc:  # re-raised in the driver's thread at the next round
            self._error = exc

    def _ready(self) -> bool:
        """True once the pool has taken over (switching to it the first time it is found ready)."""
        if self.local is None:
            return True
        if self._boot.is_alive():
            return False
        if self._error is not None:
            raise RuntimeError(f"the Ray actor pool failed to start: {self._error}") from self._error
        self.pool.take_over(self.local.global_weights(), self.local.version)
        log.info(
            "actor pool ready after %.1f s; the driver trained the first %d round(s) meanwhile "
            "(runtime.warm_start)",
            time.perf_counter() - self._started,
            self.local_rounds,
        )
        self.local.close()
        self.local = None
        return True

    def run_round(self, plan: RoundPlan, on_submitted: Callable[[], None] | None = None) -> RoundResult:
        if self._ready():
            return self.pool.run_round(plan, on_submitted)
        self.local_rounds += 1
        return self.local.run_round(plan, on_submitted)

    def evaluate(self) -> Evaluation:
        return self.local.evaluate() if self.local is not None else self.pool.evaluate()

    def evaluate_async(self) -> Callable[[], Evaluation]:
        if self.local is not None:
            done = self.local.evaluate()
            return lambda: done
        return self.pool.evaluate_async()

    def global_weights(self) -> np.ndarray:
        return self.local.global_weights() if self.local is not None else self.pool.global_weights()

    def close(self) -> None:
        if self._boot is not None:
            self._boot.join()  # never leave Ray half-started behind us
        if self.local is not None:
            self.local.close()
        self.pool.close()
