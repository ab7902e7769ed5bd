"""The runtime interface: how a round executes. A runtime never knows which algorithm it runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from raypfl.runtime.setup import FederationSetup


@dataclass
class RoundResult:
    """What one round produced, as the driver sees it."""

    version: int
    client_metrics: list[dict[str, float]]
    aggregated: list[int] = field(default_factory=list)
    rejected: list[int] = field(default_factory=list)
    compute_s: float = 0.0  # the busiest worker's client-training seconds (the round's critical path)
    aggregate_s: float = 0.0  # seconds the server spent merging partials and applying the server update

    @classmethod
    def from_workers(cls, version: int, per_worker: list[list[dict]], summary: dict) -> RoundResult:
        """Assemble a round from each worker's client metrics and the server's round summary."""
        metrics = sorted((m for part in per_worker for m in part), key=lambda m: m["client"])
        compute = max((sum(m["seconds"] for m in part) for part in per_worker), default=0.0)
        return cls(version, metrics, summary["clients"], summary["rejected"], compute, summary["aggregate_s"])


@dataclass
class Evaluation:
    loss: float
    accuracy: float
    samples: int


class Runtime(Protocol):
    #: False on processes that only follow a driver (MPI ranks > 0): they call `serve()` instead of the loop.
    is_driver: bool

    def start(self, setup: FederationSetup, initial_weights: np.ndarray) -> None:
        """Build the workers and the parameter server."""

    def run_round(self, round_idx: int, cohort: list[int]) -> RoundResult:
        """Train the cohort from the latest global weights and publish the next version."""

    def evaluate(self) -> Evaluation:
        """The latest global model on the test set."""

    def global_weights(self) -> np.ndarray:
        """The latest global weights (a copy in the driver)."""

    def close(self) -> None:
        """Release workers (and Ray, if this runtime started it)."""


def combine_evaluations(parts: list[tuple[float, int, int]]) -> Evaluation:
    """Sum (loss_sum, correct, count) pieces into mean loss and accuracy."""
    loss = sum(p[0] for p in parts)
    correct = sum(p[1] for p in parts)
    count = sum(p[2] for p in parts)
    return Evaluation(loss / max(count, 1), correct / max(count, 1), count)
