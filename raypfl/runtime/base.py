"""The runtime interface: how a round executes. A runtime never knows which algorithm it runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from raypfl.algorithms.base import ServerSnapshot
from raypfl.config import FaultsSpec
from raypfl.runtime.setup import FederationSetup


@dataclass
class RoundPlan:
    """What the driver asks of one round: who trains, how much, and from which client state."""

    round_idx: int
    cohort: list[int]
    work: dict[int, dict[str, Any]] = field(default_factory=dict)  # client -> train.* overrides
    states: dict[int, Any] = field(default_factory=dict)  # client -> its state (stateful algorithms)
    # stragglers left out of the cohort (clients.partial_work_policy=drop): client -> the work they managed
    dropped: dict[int, dict[str, Any]] = field(default_factory=dict)
    partial: int = 0  # how many of the selected clients do partial work (kept or dropped)
    # answers the round needs for its update to apply (None: faults.quorum of the cohort); the virtual
    # clock decides who answers in time before the round starts and sets it (raypfl.driver.virtual)
    need: int | None = None
    late: list[int] = field(default_factory=list)  # selected, but late on the virtual clock: not trained
    # the round's new global model is evaluated after it (a runtime may queue that behind the training)
    evaluate: bool = False


@dataclass
class RoundResult:
    """What one round produced, as the driver sees it."""

    version: int
    client_metrics: list[dict[str, Any]]
    aggregated: list[int] = field(default_factory=list)
    rejected: list[int] = field(default_factory=list)
    compute_s: float = 0.0  # the busiest worker's client-training seconds (the round's critical path)
    aggregate_s: float = 0.0  # seconds the server spent merging partials and applying the server update
    quorum_met: bool = True
    client_states: dict[int, Any] = field(default_factory=dict)  # new states of the clients that answered
    server_metrics: dict[str, float] = field(
        default_factory=dict
    )  # the server's finalizer (e.g. dp_noise_std)
    server_bytes_in: int = 0  # bytes of the partials pushed to the parameter server this round

    @classmethod
    def from_workers(
        cls,
        version: int,
        per_worker: list[list[dict]],
        summary: dict,
        states: dict[int, Any] | None = None,
    ) -> RoundResult:
        """Assemble a round from each worker's client metrics and the server's round summary."""
        metrics = sorted((m for part in per_worker for m in part), key=lambda m: m["client"])
        compute = max((sum(m["seconds"] for m in part) for part in per_worker), default=0.0)
        return cls(
            version,
            metrics,
            summary["clients"],
            summary["rejected"],
            compute,
            summary["aggregate_s"],
            summary.get("quorum_met", True),
            states or {},
            dict(summary.get("server_metrics") or {}),
            int(summary.get("bytes_in") or 0),
        )

    def count(self, status: str) -> int:
        """How many of the cohort ended with `status` (ok, rejected, late, dropped, failed, cancelled)."""
        return sum(1 for m in self.client_metrics if m.get("status") == status)


@dataclass
class Evaluation:
    loss: float
    accuracy: float
    samples: int
    finished: float | None = None  # time.perf_counter() when it was computed, if before it was collected


class Runtime(Protocol):
    #: False on processes that only follow a driver (MPI ranks > 0): they call `serve()` instead of the loop.
    is_driver: bool

    #: How many clients train at the same time (the workload balancer sizes work with it).
    parallelism: int
    #: The latest global model's version number.
    version: int

    def start(self, setup: FederationSetup, initial: ServerSnapshot) -> None:
        """Build the workers and the parameter server (holding the `initial` broadcast and server state)."""

    def run_round(self, plan: RoundPlan, on_submitted: Callable[[], None] | None = None) -> RoundResult:
        """Train the plan's cohort from the latest global weights and publish the next version.

        `on_submitted` (if given) is called once, as soon as the clients' work is handed to the workers
        (at the start, on runtimes that train in the driver): the driver settles the previous round then.
        """

    def evaluate(self) -> Evaluation:
        """The latest global model on the test set."""

    def evaluate_clients(self, clients: list[int], states: dict[int, Any]) -> list[dict[str, Any]]:
        """Each client's held-out data tested on the latest global model and (for personalized algorithms)
        on its personal model, from `states` (the driver's copies; MPI ranks use their own)."""

    def global_weights(self) -> np.ndarray:
        """The latest global model (a copy in the driver)."""

    def server_snapshot(self) -> ServerSnapshot:
        """The latest version's broadcast and server state (copies in the driver: checkpoints, hand-overs)."""

    def close(self) -> None:
        """Release workers (and Ray, if this runtime started it)."""


def notify(callback: Callable[[], None] | None) -> None:
    """Call `on_submitted` if there is one."""
    if callback is not None:
        callback()


def combine_evaluations(parts: list[tuple[float, int, int]]) -> Evaluation:
    """Sum (loss_sum, correct, count) pieces into mean loss and accuracy."""
    loss = sum(p[0] for p in parts)
    correct = sum(p[1] for p in parts)
    count = sum(p[2] for p in parts)
    return Evaluation(loss / max(count, 1), correct / max(count, 1), count)


ANSWERED = ("ok", "rejected")  # statuses of clients whose update reached the server


def work_amount(work: dict[str, Any] | None) -> int | str:
    """The assigned local epochs or steps in a work override, for clients.csv ("" when not balancing)."""
    return next((v for v in (work or {}).values() if v is not None), "")


def round_trip(row: dict[str, Any], seconds: float) -> float | str:
    """A client's round-trip time for clients.csv: only clients that answered have one."""
    return round(seconds, 4) if row.get("status") in ANSWERED else ""


def quorum_for(faults: FaultsSpec | None, plan: RoundPlan) -> int:
    """Answers the plan's round needs for its update to apply: its own `need`, else faults.deadline_quorum
    or faults.quorum of the cohort (all of it without a faults spec)."""
    if plan.need is not None:
        return plan.need
    return len(plan.cohort) if faults is None else faults.floor_size(len(plan.cohort))
