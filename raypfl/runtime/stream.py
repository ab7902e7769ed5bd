"""Streaming primitives for asynchronous rounds: hand one client's work to a worker, fold its update into
the server's open buffer (without waiting for it, where the runtime can), receive finished updates as they
come. A runtime offers them through `runtime.stream()`; the policy that decides who trains when
(raypfl.driver.stream) is the driver's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from raypfl.algorithms.aggregate import Aggregate, Arrays
from raypfl.algorithms.base import ServerSnapshot
from raypfl.runtime.base import round_trip


class Stream(Protocol):
    """What an asynchronous policy needs from a runtime."""

    #: The latest global model's version (as the policy has made it: steps may still be computing).
    version: int

    def hold(self, version: int, broadcast: Arrays) -> None:
        """Keep `broadcast` as `version` (an older version clients still train from, after a resume)."""

    def broadcast(self, version: int) -> Arrays:
        """A held version's broadcast (checkpoints keep the versions clients in flight train from)."""

    def snapshot(self, version: int) -> ServerSnapshot:
        """A held version's broadcast and server state."""

    def dispatch(self, client: int, key: int, version: int, state: Any) -> Any:
        """Start training `client` from `version` (seeded by `key`, unique per dispatch); returns a handle."""

    def first_done(self, handles: list[Any]) -> Any:
        """The first of `handles` to finish (blocks until one has)."""

    def receive(self, handle: Any) -> tuple[dict[str, Any], Any]:
        """Wait for one dispatch: its client's metrics row and (stateful clients) its new state."""

    def results(self, handles: list[Any]) -> list[tuple[dict[str, Any], Any]]:
        """`receive` for many dispatches."""

    def open(self, size: int) -> None:
        """Open a buffer of `size` updates on the latest version."""

    def fold(self, handle: Any, scale: float) -> bool:
        """Add a dispatch's update, its sums times `scale`, to the open buffer (it need not be computed
        yet); True if that made a server step (the latest version is then the next one)."""

    def step_summary(self) -> Any:
        """A handle on the last server step's summary."""

    def summary(self, handle: Any) -> dict[str, Any]:
        """A step's summary (who was aggregated, its seconds); waits for the step."""

    def release(self, keep: set[int]) -> None:
        """Forget held versions not in `keep` (the latest is always kept)."""


@dataclass
class _Job:
    """A dispatch on the sequential runtime: trained when it is first received or folded."""

    client: int
    key: int
    version: int
    state: Any
    partial: Aggregate | None = None
    row: dict[str, Any] | None = None
    new_state: Any = None


class SequentialStream:
    """Streaming on the in-process worker and parameter server: a dispatch trains when it is received or
    folded, so the result is that of training it at dispatch time (a client's update depends only on its
    base version, its state and its seed)."""

    def __init__(self, runtime: Any):
        self.rt = runtime
        # every version from when it is made (the server keeps only the last two), until `release`
        self.held: dict[int, Arrays] = {self.version: self.rt.server.pull(self.version)}

    @property
    def version(self) -> int:
        return self.rt.server.latest

    def hold(self, version: int, broadcast: Arrays) -> None:
        self.held[version] = dict(broadcast)

    def broadcast(self, version: int) -> Arrays:
        return self.held[version] if version in self.held else self.rt.server.pull(version)

    def snapshot(self, version: int) -> ServerSnapshot:
        state = self.rt.server.server_state(version)
        return ServerSnapshot(version, dict(self.broadcast(version)), dict(state))

    def dispatch(self, client: int, key: int, version: int, state: Any) -> _Job:
        if version not in self.held:
            self.held[version] = self.rt.server.pull(version)
        return _Job(client, key, version, state)

    def first_done(self, handles: list[_Job]) -> _Job:
        return min(handles, key=lambda job: job.key)  # one worker: dispatches finish in order

    def _train(self, job: _Job) -> None:
        if job.row is not None:
            return
        states = {} if job.state is None else {job.client: job.state}
        partial, metrics, new = self.rt.worker.train_cohort(
            self.held[job.version], job.key, [job.client], None, states
        )
        [job.row] = metrics
        job.row.update(actor=0, rtt_s=round_trip(job.row, job.row["seconds"]))
        job.partial, job.new_state = partial, new.get(job.client)

    def receive(self, handle: _Job) -> tuple[dict[str, Any], Any]:
        self._train(handle)
        return handle.row, handle.new_state

    def results(self, handles: list[_Job]) -> list[tuple[dict[str, Any], Any]]:
        return [self.receive(handle) for handle in handles]

    def open(self, size: int) -> None:
        self.rt.server.expect(self.version, size, size)

    def fold(self, handle: _Job, scale: float) -> bool:
        self._train(handle)
        stepped = self.rt.server.push(self.version, handle.partial, None, scale)
        if stepped:
            self.held[self.version] = self.rt.server.pull(self.version)
        return stepped

    def step_summary(self) -> dict[str, Any]:
        return self.rt.server.round_summary()

    def summary(self, handle: dict[str, Any]) -> dict[str, Any]:
        return handle

    def release(self, keep: set[int]) -> None:
        for version in [v for v in self.held if v not in keep and v != self.version]:
            del self.held[version]
