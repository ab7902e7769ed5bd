"""The sequential runtime: one in-process worker and an in-process parameter server; the reference."""

from __future__ import annotations

import numpy as np

from raypfl.runtime.base import Evaluation, RoundResult, combine_evaluations
from raypfl.runtime.parameter_server import ParameterServer
from raypfl.runtime.setup import FederationSetup
from raypfl.runtime.worker import ClientWorker


class SequentialRuntime:
    """Trains the cohort's clients one after another in this process."""

    is_driver = True

    def __init__(self, keep_versions: int = 2, rebuild_model: bool = False):
        self.keep_versions = keep_versions
        self.rebuild_model = rebuild_model
        self.worker: ClientWorker | None = None
        self.server: ParameterServer | None = None

    def start(self, setup: FederationSetup, initial_weights: np.ndarray) -> None:
        self.worker = ClientWorker(setup, rebuild_model=self.rebuild_model)
        self.server = ParameterServer(initial_weights, setup.algorithm.server_update, self.keep_versions)

    def run_round(self, round_idx: int, cohort: list[int]) -> RoundResult:
        version, weights = self.server.pull_latest()
        partial, metrics = self.worker.train_cohort(weights, round_idx, sorted(cohort))
        self.server.expect(version, 1)
        self.server.push(version, partial)
        return RoundResult.from_workers(self.server.latest, [metrics], self.server.round_summary())

    def evaluate(self) -> Evaluation:
        _, weights = self.server.pull_latest()
        return combine_evaluations([self.worker.evaluate(weights, 0, len(self.worker.test_y))])

    def global_weights(self) -> np.ndarray:
        return self.server.pull_latest()[1].copy()

    def close(self) -> None:
        self.worker = None
        self.server = None
