"""Streaming primitives on the Ray runtime (see raypfl.runtime.stream): each dispatch is one call on the
least-loaded client actor, its update goes from the actor to the parameter-server actor by reference
(never through the driver), and the actors' queues keep them busy without a round barrier. Nothing here
waits for a computation but `first_done`, `receive`, `results`, `summary` and `snapshot`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from raypfl.algorithms.aggregate import Arrays
from raypfl.algorithms.base import ServerSnapshot
from raypfl.runtime.base import round_trip


@dataclass
class _Call:
    """A dispatch in flight on a client actor."""

    client: int
    actor: int
    partial_ref: Any
    metrics_ref: Any
    states_ref: Any
    sent: float = field(default_factory=time.perf_counter)


class RayStream:
    """Streaming on a RayRuntime's actors and parameter server."""

    def __init__(self, runtime: Any):
        self.rt = runtime
        self.refs: dict[int, Any] = {runtime.version: runtime.current_ref()}
        self.load = [0] * len(runtime.actors)
        self.open_version: int | None = None
        self.expected = 0
        self.summary_ref = None

    @property
    def version(self) -> int:
        return self.rt.version

    def hold(self, version: int, broadcast: Arrays) -> None:
        self.refs[version] = ray.put(dict(broadcast))

    def broadcast(self, version: int) -> Arrays:
        return ray.get(self.refs[version])

    def snapshot(self, version: int) -> ServerSnapshot:
        broadcast = ray.get(self.refs[version])
        ref = self.rt.state_ref(version)
        state = ray.get(ref) if ref is not None else {}
        return ServerSnapshot(version, {k: np.array(v) for k, v in broadcast.items()}, dict(state))

    def dispatch(self, client: int, key: int, version: int, state: Any) -> _Call:
        actor = min(range(len(self.load)), key=lambda i: (self.load[i], i))
        self.load[actor] += 1
        states = {} if state is None else {client: state}
        partial_ref, metrics_ref, states_ref = (
            self.rt.actors[actor]
            .train_cohort.options(num_returns=3)
            .remote(self.refs[version], key, [client], None, states)
        )
        return _Call(client, actor, partial_ref, metrics_ref, states_ref)

    def first_done(self, handles: list[_Call]) -> _Call:
        by_ref = {call.metrics_ref: call for call in handles}
        ready, _ = ray.wait(list(by_ref), num_returns=1)
        return by_ref[ready[0]]

    def receive(self, handle: _Call) -> tuple[dict[str, Any], Any]:
        [row] = ray.get(handle.metrics_ref)
        self.load[handle.actor] -= 1
        row.update(actor=handle.actor, rtt_s=round_trip(row, time.perf_counter() - handle.sent))
        state = None
        if self.rt.sticky and row["status"] == "ok":
            state = ray.get(handle.states_ref).get(handle.client)
        return row, state

    def results(self, handles: list[_Call]) -> list[tuple[dict[str, Any], Any]]:
        """Rows fetched together; their `rtt_s` is the client's own seconds (a policy that ran ahead
        fetches them a step later)."""
        rows = ray.get([handle.metrics_ref for handle in handles])
        out = []
        for handle, [row] in zip(handles, rows):
            self.load[handle.actor] -= 1
            row.update(actor=handle.actor, rtt_s=round_trip(row, row["seconds"]))
            state = None
            if self.rt.sticky and row["status"] == "ok":
                state = ray.get(handle.states_ref).get(handle.client)
            out.append((row, state))
        return out

    def open(self, size: int) -> None:
        self.open_version, self.expected = self.version, size
        self.rt.server.expect.remote(self.open_version, size, size)

    def fold(self, handle: _Call, scale: float) -> bool:
        version = self.open_version
        self.rt.server.push.remote(version, handle.partial_ref, None, scale)
        self.expected -= 1
        if self.expected > 0:
            return False
        # the K-th push closes the buffer in the server, which runs calls in order: the next version's
        # pull and the summary queue behind it, and new dispatches take the pull's ref without waiting
        next_ref = self.rt.queue_next(version)
        self.rt.advance(version, self.refs[version], next_ref)
        self.rt.version = version + 1
        self.refs[version + 1] = next_ref
        self.summary_ref = self.rt.server.round_summary.remote()
        return True

    def step_summary(self) -> Any:
        return self.summary_ref

    def summary(self, handle: Any) -> dict[str, Any]:
        return ray.get(handle)

    def release(self, keep: set[int]) -> None:
        for version in [v for v in self.refs if v not in keep and v != self.version]:
            del self.refs[version]
