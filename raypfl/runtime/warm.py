"""Warm start: train the first rounds in the driver while Ray and the actor pool boot.

Starting Ray and its actors takes seconds (Ray's processes, then each actor imports torch and maps the
dataset). Nothing about a round depends on where its clients train (every client's randomness is seeded
by (root seed, round, client)), so the driver trains rounds itself with an in-process worker until the
pool is ready, then hands the global model (broadcast, server state and version) to the parameter-server
actor and every later round runs on the actors. Same seed, same model (only float summation order may differ).

Ray must be started from the main thread (a Ray started elsewhere kills the process on its first
object-store call from the main thread), so round 1 trains in a helper thread while the main thread
starts Ray and asks for the actors; later rounds check, without waiting, whether the actors are ready.
`runtime.warm_start=false` waits for the pool instead.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from raypfl.algorithms.base import ServerSnapshot
from raypfl.runtime.base import Evaluation, RoundPlan, RoundResult
from raypfl.runtime.sequential import SequentialRuntime
from raypfl.runtime.setup import FederationSetup

log = logging.getLogger(__name__)


class WarmStart:
    """A Ray runtime whose first rounds run in the driver until its actors are ready."""

    is_driver = True

    def __init__(self, pool, keep_versions: int = 2):
        self.pool = pool  # a RayRuntime: launch(), ready(), wait_ready(), take_over(snapshot)
        self.local: SequentialRuntime | None = SequentialRuntime(keep_versions)
        self._boot: tuple[FederationSetup, ServerSnapshot] | None = None  # what the pool starts from
        self._started = 0.0
        self.local_rounds = 0  # rounds the driver trained before the pool took over
        self._early: tuple[int, Evaluation] | None = None  # (version, evaluation) made during the launch

    @property
    def parallelism(self) -> int:
        return self.pool.expected_parallelism() if self.local is not None else self.pool.parallelism

    @property
    def version(self) -> int:
        return self.local.version if self.local is not None else self.pool.version

    def start(self, setup: FederationSetup, initial: ServerSnapshot) -> None:
        if setup.faults is not None and setup.faults.active:  # fault-tolerant rounds need the pool
            self.local = None
            self.pool.start(setup, initial)
            return
        self.local.start(setup, initial)
        self._boot = (setup, initial)
        self._started = time.perf_counter()

    def _launch_during(self, plan: RoundPlan, on_submitted: Callable[[], None] | None) -> RoundResult:
        """Train `plan` in a helper thread while this (main) thread starts Ray and asks for the actors."""
        outcome: dict = {}

        def train() -> None:
            try:
                outcome["result"] = self.local.run_round(plan, on_submitted)
                # evaluate here too: the main thread is still starting Ray; the round ends when this is done
                evaluation = self.local.evaluate()
                evaluation.finished = time.perf_counter()
                self._early = (self.local.version, evaluation)
            except BaseException as exc:  # re-raised below, in the driver's thread
                outcome["error"] = exc

        worker = threading.Thread(target=train, name="raypfl-warm-round", daemon=True)
        worker.start()
        try:
            self.pool.launch(*self._boot)
        finally:
            self._boot = None
            worker.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]

    def _pool_ready(self) -> bool:
        """True once the pool has taken over (handing it the model the first time it is found ready)."""
        if self.local is None:
            return True
        if not self.pool.ready():
            return False
        self.pool.wait_ready()  # all answered: this only logs where they run
        self.pool.take_over(self.local.server_snapshot())  # the model and the server state
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
        if self._boot is not None:
            self.local_rounds += 1
            return self._launch_during(plan, on_submitted)
        if self._pool_ready():
            return self.pool.run_round(plan, on_submitted)
        self.local_rounds += 1
        return self.local.run_round(plan, on_submitted)

    def evaluate(self) -> Evaluation:
        return self.local.evaluate() if self.local is not None else self.pool.evaluate()

    def evaluate_async(self) -> Callable[[], Evaluation]:
        early, self._early = self._early, None
        if early is not None and early[0] == self.version:  # round 1, evaluated while Ray started
            return lambda: early[1]
        if self.local is not None:
            done = self.local.evaluate()
            return lambda: done
        return self.pool.evaluate_async()

    def evaluate_clients(self, clients: list[int], states: dict[int, Any]) -> list[dict[str, Any]]:
        if self.local is not None:
            return self.local.evaluate_clients(clients, states)
        return self.pool.evaluate_clients(clients, states)

    def global_weights(self) -> np.ndarray:
        return self.local.global_weights() if self.local is not None else self.pool.global_weights()

    def server_snapshot(self) -> ServerSnapshot:
        return self.local.server_snapshot() if self.local is not None else self.pool.server_snapshot()

    def close(self) -> None:
        if self.local is not None:
            self.local.close()
        self.pool.close()  # kills actors that may still be starting, and the Ray we started
