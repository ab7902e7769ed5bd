"""Buffered asynchronous rounds (FedBuff): a policy over a runtime's streaming primitives.

Up to `concurrency` clients are in flight; whenever one finishes, its update (discounted by its
staleness) goes into the server's buffer, and another idle client (a seeded draw per dispatch) starts
from the global model current at that moment. A server step follows every `buffer_size` updates; one
step is one round of metrics.csv.

On the virtual clock, flights finish in order of virtual time (ties: dispatch order). Who is dispatched
when, from which version, and into which step each update is folded follow from the device profiles
alone, not from the training results, so the policy runs ahead of the workers: it folds an update and
dispatches the next client without waiting for the update to be computed (on Ray the update goes from
the actor to the parameter server by reference), and collects the clients' rows one step later. A
client's training is handed to a worker when the policy folds it, so the workers' queues hold the
updates in the order the server consumes them, each from a version that is made or being made. The
workers never wait for the driver, and the run is the same on every runtime and machine. Clients that
keep state (error feedback, persistent optimizer state) are waited for, one update at a time, since
their next dispatch needs it. On the real clock, updates are taken in the order the workers answer.

A checkpoint after a step holds the flights then (and the versions they train from); a resumed run
dispatches them again and continues as the uninterrupted one would have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raypfl import seeding
from raypfl.algorithms.base import ServerSnapshot
from raypfl.errors import RunStopped
from raypfl.runtime.base import ANSWERED, RoundPlan, RoundResult
from raypfl.runtime.stream import Stream


@dataclass
class Flight:
    """One client in flight: who, its dispatch number (its seed), its base version and virtual times."""

    client: int
    key: int
    base: int
    start: float  # virtual seconds (0 on the real clock)
    finish: float  # virtual seconds (inf on the real clock: unknown)
    handle: Any = None
    row: dict[str, Any] | None = None  # its metrics row, once received

    def record(self) -> tuple[int, int, int, float, float]:
        return (self.client, self.key, self.base, self.start, self.finish)


@dataclass
class StepRecord:
    """A server step as the policy submitted it: its updates in fold order, the server's summary (a
    handle), and the stream as it stood after the step (what a checkpoint of this step holds)."""

    round_idx: int
    folded: list[tuple[Flight, int]]  # (flight, staleness)
    summary: Any
    version: int  # the version the step made
    began: float  # virtual seconds at the step's start and end
    now: float
    sent: int  # clients dispatched during the step
    flights: list[tuple[int, int, int, float, float]] = field(default_factory=list)
    key: int = 0

    @property
    def bases(self) -> set[int]:
        """The versions the flights after this step train from, other than the one it made."""
        return {record[2] for record in self.flights} - {self.version}


class BufferedRounds:
    """FedBuff's policy: keeps `concurrency` clients in flight and steps the server every `buffer_size`."""

    def __init__(
        self,
        algorithm: Any,
        stream: Stream,
        num_clients: int,
        seed: int,
        states: dict[int, Any],
        duration: Any = None,  # (client) -> virtual seconds; None: the real clock
        stateful: bool = False,  # clients keep state: wait for each update before dispatching on
    ):
        self.algorithm, self.stream = algorithm, stream
        self.num_clients, self.seed, self.states = num_clients, seed, states
        self.duration = duration
        self.ahead = duration is not None and not stateful
        self.flights: list[Flight] = []
        self.key = 0  # dispatches so far
        self.now = 0.0  # virtual seconds
        self._sent_before = 0  # dispatches counted in earlier steps
        self._pinned: dict[int, set[int]] = {}  # round -> versions its unsettled checkpoint needs

    @property
    def virtual(self) -> bool:
        return self.duration is not None

    def start(self) -> None:
        """Fill the flights (a new run)."""
        while len(self.flights) < min(self.algorithm.concurrency, self.num_clients):
            self._dispatch()

    def _dispatch(self) -> None:
        """Start an idle client (seeded draw) from the latest version, now."""
        self.key += 1
        busy = {f.client for f in self.flights}
        rng = seeding.rng(self.seed, seeding.STREAM, self.key)
        idle = np.setdiff1d(np.arange(self.num_clients), np.fromiter(busy, np.int64, len(busy)))
        client = int(idle[rng.integers(len(idle))])
        finish = self.now + self.duration(client) if self.virtual else math.inf
        self._send(Flight(client, self.key, self.stream.version, self.now, finish))

    def _send(self, flight: Flight) -> None:
        """Put the flight in the air. Running ahead, its work goes to a worker only when the policy folds
        it: the workers' queues then hold the updates in the order the server needs them, and every one
        trains from a version that exists (or is the next one being made)."""
        if not self.ahead:
            self._hand_over(flight)
        self.flights.append(flight)

    def _hand_over(self, flight: Flight) -> None:
        flight.handle = self.stream.dispatch(
            flight.client, flight.key, flight.base, self.states.get(flight.client)
        )

    def _next(self) -> Flight:
        """The flight that finishes next: the earliest in virtual time, else whichever answers first."""
        if self.virtual:
            return min(self.flights, key=lambda f: (f.finish, f.key))
        done = self.stream.first_done([f.handle for f in self.flights])
        return next(f for f in self.flights if f.handle is done)

    def step(self, round_idx: int) -> StepRecord:
        """Fold updates until the server steps (running ahead of the workers where it can; see the module
        docstring); `resolve` the record for the step's rows."""
        self.stream.open(self.algorithm.buffer_size)
        began = self.now
        folded: list[tuple[Flight, int]] = []
        while True:
            flight = self._next()
            self.flights.remove(flight)
            if not self.ahead:  # the real clock, or a client whose state the next dispatch needs
                flight.row, state = self.stream.receive(flight.handle)
                if state is not None and flight.row["status"] == "ok":
                    self.states[flight.client] = state
            if self.virtual:
                self.now = flight.finish
            if flight.handle is None:
                self._hand_over(flight)
            lag = self.stream.version - flight.base
            # every update takes its place in the buffer (a failed one, an exception in the client's code,
            # with nothing in it): the steps do not depend on results the policy has not waited for
            stepped = self.stream.fold(flight.handle, self.algorithm.staleness_weight(lag))
            folded.append((flight, lag))
            self._dispatch()  # a new client starts as soon as one finishes
            if stepped:
                break
        record = StepRecord(
            round_idx, folded, self.stream.step_summary(), self.stream.version, began, self.now, 0
        )
        record.sent, self._sent_before = self.key - self._sent_before, self.key
        record.flights = [f.record() for f in sorted(self.flights, key=lambda f: f.key)]
        record.key = self.key
        self._pinned[round_idx] = record.bases | {record.version}
        self.stream.release({f.base for f in self.flights}.union(*self._pinned.values()))
        return record

    def resolve(self, record: StepRecord) -> tuple[RoundPlan, RoundResult, dict[str, Any]]:
        """The step as a round (plan, result, metrics columns), once its clients' rows are in."""
        waiting = [flight for flight, _ in record.folded if flight.row is None]
        for flight, (row, _) in zip(waiting, self.stream.results([f.handle for f in waiting])):
            flight.row = row
        rows, staleness = [], []
        for flight, lag in record.folded:
            row = flight.row | {"round": record.round_idx, "base_version": flight.base, "staleness": lag}
            if self.virtual:
                row["virtual_s"] = round(flight.finish - flight.start, 4)
            if row["status"] in ANSWERED:
                staleness.append(lag)
            rows.append(row)
        if not staleness:
            raise RunStopped(
                f"round {record.round_idx}: every client update of this server step failed; see the log "
                "for the clients' errors"
            )
        per_actor: dict[Any, list[dict]] = {}
        for row in rows:
            per_actor.setdefault(row["actor"], []).append(row)
        summary = self.stream.summary(record.summary)
        result = RoundResult.from_workers(record.version, list(per_actor.values()), summary, {})
        plan = RoundPlan(record.round_idx, sorted(row["client"] for row in rows))
        columns: dict[str, Any] = {
            "staleness_mean": round(float(np.mean(staleness)), 4),
            "staleness_max": max(staleness),
        }
        if self.virtual:
            columns.update(
                virtual_s=round(record.now, 4), round_virtual_s=round(record.now - record.began, 4)
            )
        return plan, result, columns

    # --- checkpoints ------------------------------------------------------------------------------------

    def snapshot(self, record: StepRecord) -> ServerSnapshot:
        """The broadcast and server state the step made (the policy may be a step further)."""
        return self.stream.snapshot(record.version)

    def state_dict(self, record: StepRecord) -> dict[str, Any]:
        """The flights after the step, the versions they train from (but the step's own, which the
        checkpoint holds), the dispatch count and the virtual time."""
        return {
            "flights": list(record.flights),
            "bases": {v: self.stream.broadcast(v) for v in sorted(record.bases)},
            "key": record.key,
            "now": record.now,
        }

    def settled(self, record: StepRecord) -> None:
        """The step is logged (and checkpointed): its versions need not be held for it any more."""
        self._pinned.pop(record.round_idx, None)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a checkpointed stream: its flights are dispatched again (same base, same seed)."""
        for version, broadcast in state["bases"].items():
            self.stream.hold(int(version), broadcast)
        self.key, self.now = int(state["key"]), float(state["now"])
        self._sent_before = self.key  # the flights below were counted in the steps that sent them
        for record in state["flights"]:
            self._send(Flight(*record))


def stream_timer(virtual: Any) -> Any:
    """A client's virtual duration per dispatch (a whole local training of `train.*`)."""
    if virtual is None:
        return None
    return lambda client: virtual.duration(client, None)


__all__ = ["BufferedRounds", "Flight", "StepRecord", "stream_timer"]
