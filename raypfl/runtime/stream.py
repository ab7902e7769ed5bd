"""Streaming primitives for asynchronous rounds: hand one client's work to a worker, receive finished
updates as they come, fold an update into the server's open buffer. A runtime offers them through
`runtime.stream()`; the policy that decides who trains when (raypfl.driver.stream) is the driver's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from raypfl.algorithms.aggregate import Aggregate, Arrays
from raypfl.runtime.base import round_trip


class Stream(Protocol):
    """What an asynchronous policy needs from a runtime."""

    #: The latest global model's version.
    version: int

    def hold(self, version: int, broadcast: Arrays) -> None:
        """Keep `broadcast` as `version` (an older version clients still train from, after a resume)."""

    def broadcast(self, version: int) -> Arrays:
        """A held version's broadcast (checkpoints keep the versions clients in flight train from)."""

    def dispatch(self, client: int, key: int, version: int, state: Any) -> Any:
        """Start training `client` from `version` (seeded by `key`, unique per dispatch); returns a handle."""

    def first_done(self, handles: list[Any]) -> Any:
        """The first of `handles` to finish (blocks until one has)."""

    def receive(self, handle: Any) -> tuple[dict[str, Any], Any]:
        """Wait for one dispatch: its client's metrics row and (stateful clients) its new state."""

    def open(self, size: int) -> None:
        """Open a buffer of `size` updates on the latest version."""

    def fold(self, handle: Any, scale: float) -> bool:
        """Add a received update, its sums times `scale`, to the open buffer; True if that made a server
        step (the latest version is then the next one)."""

    def summary(self) -> dict[str, Any]:
        """The last server step's summary (who was aggregated, its seconds)."""

    def release(self, keep: set[int]) -> None:
        """Forget held versions not in `keep` (the latest is always kept)."""


@dataclass
class _Job:
    """A dispatch on the sequential runtime: trained when it is received."""

    client: int
    key: int
    version: int
    state: Any
    sent: float = field(default_factory=time.perf_counter)
    partial: Aggregate | None = None


class SequentialStream:
    """Streaming on the in-process worker and parameter server: a dispatch trains when it is received, so
    the result is that of training it at dispatch time (a client's update depends only on its base
    version and its seed)."""

    def __init__(self, runtime: Any):
        self.rt = runtime
        self.held: dict[int, Arrays] = {}

    @property
    def version(self) -> int:
        return self.rt.server.latest

    def hold(self, version: int, broadcast: Arrays) -> None:
        self.held[version] = dict(broadcast)

    def broadcast(self, version: int) -> Arrays:
        return self.held[version] if version in self.held else self.rt.server.pull(version)

    def dispatch(self, client: int, key: int, version: int, state: Any) -> _Job:
        if version not in self.held:
            self.held[version] = self.rt.server.pull(version)
        return _Job(client, key, version, state)

    def first_done(self, handles: list[_Job]) -> _Job:
        return min(handles, key=lambda job: job.key)  # one worker: dispatches finish in order

    def receive(self, handle: _Job) -> tuple[dict[str, Any], Any]:
        states = {} if handle.state is None else {handle.client: handle.state}
        partial, metrics, new = self.rt.worker.train_cohort(
            self.held[handle.version], handle.key, [handle.client], None, states
        )
        handle.partial = partial
        [row] = metrics
        row.update(actor=0, rtt_s=round_trip(row, row["seconds"]))
        return row, new.get(handle.client)

    def open(self, size: int) -> None:
        self.rt.server.expect(self.version, size, size)

    def fold(self, handle: _Job, scale: float) -> bool:
        return self.rt.server.push(self.version, handle.partial, None, scale)

    def summary(self) -> dict[str, Any]:
        return self.rt.server.round_summary()

    def release(self, keep: set[int]) -> None:
        for version in [v for v in self.held if v not in keep and v != self.version]:
            del self.held[version]
