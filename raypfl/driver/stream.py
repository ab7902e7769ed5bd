"""Buffered asynchronous rounds (FedBuff): a policy over a runtime's streaming primitives.

Up to `concurrency` clients are in flight; whenever one finishes, its update (discounted by its
staleness) goes into the server's buffer, and another idle client (a seeded draw per dispatch) starts
from the global model current at that moment. A server step follows every `buffer_size` updates; one
step is one round of metrics.csv. On the virtual clock, flights finish in order of virtual time (ties:
dispatch order), so the run is the same on every runtime and machine; on the real clock, in the order
the workers answer. A checkpoint after a step holds the flights (and the versions they train from); a
resumed run dispatches them again and continues as the uninterrupted one would have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from raypfl import seeding
from raypfl.errors import RunStopped
from raypfl.runtime.base import ANSWERED, RoundPlan, RoundResult
from raypfl.runtime.stream import Stream

#: A server step gives up (RunStopped, exit 3) after this many updates that failed (a bug in the client half).
MAX_FAILED_PER_STEP = 100


@dataclass
class Flight:
    """One client in flight: who, its dispatch number (its seed), its base version and virtual times."""

    client: int
    key: int
    base: int
    start: float  # virtual seconds (0 on the real clock)
    finish: float  # virtual seconds (inf on the real clock: unknown)
    handle: Any = None

    def record(self) -> tuple[int, int, int, float, float]:
        return (self.client, self.key, self.base, self.start, self.finish)


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
    ):
        self.algorithm, self.stream = algorithm, stream
        self.num_clients, self.seed, self.states = num_clients, seed, states
        self.duration = duration
        self.flights: list[Flight] = []
        self.key = 0  # dispatches so far
        self.now = 0.0  # virtual seconds
        self.sent_in_step = 0  # clients sent the global model during the last step (its bytes_down)
        self._sent_before = 0  # dispatches counted in earlier steps

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
        flight = Flight(client, self.key, self.stream.version, self.now, finish)
        self._send(flight)

    def _send(self, flight: Flight) -> None:
        flight.handle = self.stream.dispatch(
            flight.client, flight.key, flight.base, self.states.get(flight.client)
        )
        self.flights.append(flight)

    def _next(self) -> Flight:
        """The flight that finishes next: the earliest in virtual time, else whichever answers first."""
        if self.virtual:
            return min(self.flights, key=lambda f: (f.finish, f.key))
        done = self.stream.first_done([f.handle for f in self.flights])
        return next(f for f in self.flights if f.handle is done)

    def step(self, round_idx: int) -> tuple[RoundPlan, RoundResult, dict[str, Any]]:
        """Receive updates until the server steps; returns the step as a round (plan, result, columns)."""
        size = self.algorithm.buffer_size
        self.stream.open(size)
        began = self.now
        rows: list[dict[str, Any]] = []
        staleness: list[int] = []
        while True:
            failed = len(rows) - len(staleness)
            if failed > MAX_FAILED_PER_STEP:
                raise RunStopped(
                    f"round {round_idx}: {failed} client updates failed since the last server step; "
                    "see the log for the clients' errors"
                )
            flight = self._next()
            self.flights.remove(flight)
            row, state = self.stream.receive(flight.handle)
            lag = self.stream.version - flight.base
            row.update(round=round_idx, base_version=flight.base, staleness=lag)
            if self.virtual:
                self.now = flight.finish
                row["virtual_s"] = round(flight.finish - flight.start, 4)
            stepped = False
            if row["status"] in ANSWERED:
                stepped = self.stream.fold(flight.handle, self.algorithm.staleness_weight(lag))
                staleness.append(lag)
                if state is not None and row["status"] == "ok":
                    self.states[flight.client] = state
            rows.append(row)
            self._dispatch()  # a new client starts as soon as one finishes
            if stepped:
                break
        self.stream.release({f.base for f in self.flights})
        per_actor: dict[Any, list[dict]] = {}
        for row in rows:
            per_actor.setdefault(row["actor"], []).append(row)
        result = RoundResult.from_workers(
            self.stream.version, list(per_actor.values()), self.stream.summary(), {}
        )
        plan = RoundPlan(round_idx, sorted(row["client"] for row in rows))
        columns = {
            "staleness_mean": round(float(np.mean(staleness)), 4) if staleness else "",
            "staleness_max": max(staleness, default=""),
        }
        if self.virtual:
            columns.update(virtual_s=round(self.now, 4), round_virtual_s=round(self.now - began, 4))
        self.sent_in_step, self._sent_before = self.key - self._sent_before, self.key
        return plan, result, columns

    # --- checkpoints ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The flights, the versions they train from (all but the latest, which the checkpoint holds), the
        dispatch count and the virtual time."""
        bases = {f.base for f in self.flights if f.base != self.stream.version}
        return {
            "flights": [f.record() for f in sorted(self.flights, key=lambda f: f.key)],
            "bases": {v: self.stream.broadcast(v) for v in sorted(bases)},
            "key": self.key,
            "now": self.now,
        }

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


__all__ = ["BufferedRounds", "Flight", "stream_timer"]
