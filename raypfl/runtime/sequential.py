"""The sequential runtime: one in-process worker and an in-process parameter server; the reference."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from raypfl.algorithms.aggregate import MODEL
from raypfl.algorithms.base import ServerSnapshot
from raypfl.runtime.base import (
    Evaluation,
    RoundPlan,
    RoundResult,
    combine_evaluations,
    notify,
    quorum_for,
    round_trip,
)
from raypfl.runtime.parameter_server import ParameterServer
from raypfl.runtime.setup import FederationSetup
from raypfl.runtime.worker import ClientWorker


class SequentialRuntime:
    """Trains the cohort's clients one after another in this process."""

    is_driver = True
    parallelism = 1

    def __init__(self, keep_versions: int = 2, rebuild_model: bool = False):
        self.keep_versions = keep_versions
        self.rebuild_model = rebuild_model
        self.worker: ClientWorker | None = None
        self.server: ParameterServer | None = None

    def start(self, setup: FederationSetup, initial: ServerSnapshot) -> None:
        self.setup = setup
        self.worker = ClientWorker(setup, rebuild_model=self.rebuild_model)
        self.server = ParameterServer(
            initial.broadcast,
            setup.algorithm.server_update,
            self.keep_versions,
            initial.version,
            initial.state,
            setup.finalize,
        )

    def run_round(self, plan: RoundPlan, on_submitted: Callable[[], None] | None = None) -> RoundResult:
        notify(on_submitted)
        version, broadcast = self.server.pull_latest()
        partial, metrics, states = self.worker.train_cohort(
            broadcast, plan.round_idx, sorted(plan.cohort), plan.work, plan.states
        )
        elapsed = 0.0
        for row in metrics:  # clients answer one after another: each waits for the ones before it
            elapsed += row["seconds"]
            row.update(actor=0, rtt_s=round_trip(row, elapsed))
        self.server.expect(version, 1, quorum_for(self.setup.faults, plan))
        self.server.push(version, partial)
        return RoundResult.from_workers(self.server.latest, [metrics], self.server.round_summary(), states)

    @property
    def version(self) -> int:
        """The latest global model's version number."""
        return self.server.latest

    def evaluate(self) -> Evaluation:
        _, broadcast = self.server.pull_latest()
        return combine_evaluations([self.worker.evaluate(broadcast, 0, len(self.worker.test_y))])

    def evaluate_clients(self, clients: list[int], states: dict[int, Any]) -> list[dict[str, Any]]:
        _, broadcast = self.server.pull_latest()
        return self.worker.evaluate_clients(broadcast, clients, states)

    def global_weights(self) -> np.ndarray:
        return self.server.pull_latest()[1][MODEL].copy()

    def server_snapshot(self) -> ServerSnapshot:
        version, broadcast = self.server.pull_latest()
        return ServerSnapshot(version, dict(broadcast), self.server.server_state())

    def stream(self):
        """Streaming primitives for asynchronous rounds (raypfl.runtime.stream)."""
        from raypfl.runtime.stream import SequentialStream

        return SequentialStream(self)

    def close(self) -> None:
        self.worker = None
        self.server = None
