"""A parameter server: a versioned broadcast and the server state; the algorithm's server half runs here.

Each version is the algorithm's broadcast (named arrays: `model`, the global model, and what the algorithm
adds) and its server state (e.g. FedAdam's moments), kept together for the last `keep_versions` versions.

`expect(v, n, quorum)` opens round v for n pushes; `push(v, update)` adds a partial aggregate; when the
n-th arrives (or the driver calls `close(v)` early, e.g. once a quorum answered), the server update is
applied and version v+1 is published. If fewer than `quorum` clients answered, the round has no quorum and
v+1 is the unchanged model. Pushes for a closed round are discarded and counted. Only the last
`keep_versions` versions are kept. Used in-process by the sequential runtime and as a Ray actor by the
Ray runtime.

A push may name its `slot` (0..n-1): slotted partials are merged in slot order whatever order they arrive
in, so a partial re-sent after its actor died (and trained again elsewhere) lands exactly where it would
have been summed, and the float64 sum, hence the next version, is the same to the bit. In order (the
no-fault case) a slotted push is merged at once, as an unslotted one is.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raypfl.algorithms.aggregate import Aggregate, Arrays, Stacked

#: What the server does to a round's aggregate before the server half (raypfl.runtime.finalize):
#: (aggregate, version) -> (aggregate, metrics).
Finalize = Callable[[Aggregate, int], tuple[Aggregate, dict[str, float]]]

log = logging.getLogger(__name__)

#: The algorithm's server half: (broadcast, server state, aggregate) -> (next broadcast, next server state).
ServerUpdate = Callable[[Arrays, dict[str, Any], Aggregate], tuple[Arrays, dict[str, Any]]]


class VersionEvicted(KeyError):
    """The requested version is older than the versions kept."""


class VersionedWeights:
    """Weights by version number with a bounded history: `pull(v)`, `pull_latest()`, publish, reset."""

    def __init__(self, weights: Any, keep_versions: int = 2, version: int = 0):
        if keep_versions < 1:
            raise ValueError("keep_versions must be >= 1")
        self.keep_versions = keep_versions
        self.versions: OrderedDict[int, Any] = OrderedDict({version: self._freeze(weights)})
        self.latest = version

    @staticmethod
    def _freeze(weights: Any) -> Any:
        """How a version is stored (a flat float32 vector here; a broadcast in ParameterServer)."""
        return np.asarray(weights, np.float32)

    def _publish(self, weights: Any) -> None:
        self.latest += 1
        self.versions[self.latest] = weights
        while len(self.versions) > self.keep_versions:
            self.versions.popitem(last=False)

    def reset(self, weights: Any, version: int) -> None:
        """Hold `weights` as `version`, forgetting every other version (a runtime taking over a model)."""
        self.versions = OrderedDict({version: self._freeze(weights)})
        self.latest = version

    def pull(self, version: int) -> Any:
        """The weights of `version`; None if it does not exist yet; VersionEvicted if no longer kept."""
        if version > self.latest:
            return None
        if version not in self.versions:
            raise VersionEvicted(
                f"version {version} was evicted (the server keeps the last {self.keep_versions})"
            )
        return self.versions[version]

    def pull_latest(self) -> tuple[int, Any]:
        """(version number, weights) of the newest version."""
        return self.latest, self.versions[self.latest]


@dataclass
class _OpenRound:
    """A round being aggregated: pushes still expected, the sum so far, the quorum, out-of-turn slots."""

    expected: int
    quorum: int
    aggregate: Aggregate = field(default_factory=Aggregate)
    next_slot: int = 0  # the slot merged next
    waiting: dict[int, Aggregate] = field(default_factory=dict)  # slotted pushes that arrived early

    def drain(self) -> None:
        """Merge the waiting slots that are next in line."""
        while self.next_slot in self.waiting:
            self.fold(self.waiting.pop(self.next_slot))
            self.next_slot += 1

    def fold(self, partial: Aggregate) -> None:
        """Merge one partial; stacked partials (a robust aggregator) make the round's aggregate a stack."""
        if isinstance(partial, Stacked) and not isinstance(self.aggregate, Stacked):
            self.aggregate = Stacked(clients=self.aggregate.clients, rejected=self.aggregate.rejected)
        self.aggregate.merge(partial)


class ParameterServer(VersionedWeights):
    """Versioned broadcasts (with their server state) with push/pull and a bounded history.

    `pull(v)` returns version v's broadcast (what clients train from), `server_state(v)` its server state.
    """

    def __init__(
        self,
        broadcast: Arrays,
        server_update: ServerUpdate,
        keep_versions: int = 2,
        version: int = 0,
        state: dict[str, Any] | None = None,
        finalize: Finalize | None = None,
    ):
        super().__init__(broadcast, keep_versions, version)
        self.finalize = finalize
        self.last_metrics: dict[str, float] = {}
        self.states: dict[int, dict[str, Any]] = {version: dict(state or {})}
        self.server_update = server_update
        self.rounds: dict[int, _OpenRound] = {}  # version -> the round building on it
        self.last_aggregate: Aggregate | None = None
        self.last_quorum_met = True
        self.stale_pushes = 0
        self.aggregate_s = 0.0  # seconds spent merging and updating in the last completed round
        self._round_aggregate_s = 0.0
        self.bytes_in = 0  # bytes of the partials pushed in the last completed round
        self.pushes_in = 0  # and how many pushes they came in
        self._round_bytes_in = 0
        self._round_pushes_in = 0

    def expect(self, version: int, num_pushes: int, quorum: int = 0) -> None:
        """Open the round that builds on `version`: it closes after `num_pushes` pushes (or `close`).

        `quorum`: clients (accepted or rejected) that must have answered for the update to be applied.
        """
        if version != self.latest:
            raise ValueError(f"cannot open a round on version {version}: latest is {self.latest}")
        self.rounds[version] = _OpenRound(num_pushes, quorum)
        if num_pushes <= 0:  # an empty cohort (clients.selection=poisson): nothing to wait for
            self._close(version, time.perf_counter())

    def reopen(self, version: int, num_pushes: int, quorum: int = 0) -> bool:
        """Start the open round on `version` over, expecting `num_pushes` (what arrived is dropped); False
        if that round is not open (closed already). Recovery of a round whose node sums failed."""
        if version not in self.rounds:
            return False
        self.rounds[version] = _OpenRound(num_pushes, quorum)
        self._round_aggregate_s, self._round_bytes_in, self._round_pushes_in = 0.0, 0, 0
        return True

    def push(self, version: int, update: Aggregate, slot: int | None = None, scale: float = 1.0) -> bool:
        """Add an update to the round building on `version`; returns True if it completed the round.

        `slot`: this partial's place in the merge order (see the module docstring); a slot pushed twice
        is ignored. `scale`: the partial's sums count this many times (an asynchronous update's staleness
        discount; its weight is unchanged).
        """
        if version not in self.rounds:
            self.stale_pushes += 1
            log.warning("discarded a push for version %d (latest is %d)", version, self.latest)
            return False
        start = time.perf_counter()
        self._round_bytes_in += update.nbytes
        self._round_pushes_in += 1
        if scale != 1.0:
            update = update.scaled(scale)
        open_round = self.rounds[version]
        if slot is None:
            open_round.fold(update)
        elif slot < open_round.next_slot or slot in open_round.waiting:
            log.warning("ignored a second push of slot %d for version %d", slot, version)
            return False
        else:
            open_round.waiting[slot] = update
            open_round.drain()
        open_round.expected -= 1
        if open_round.expected > 0:
            self._round_aggregate_s += time.perf_counter() - start
            return False
        self._close(version, start)
        return True

    def close(self, version: int) -> dict[str, object]:
        """Close the round on `version` with what has arrived; returns the round summary."""
        if version in self.rounds:
            self._close(version, time.perf_counter())
        return self.round_summary()

    def _close(self, version: int, start: float) -> None:
        open_round = self.rounds.pop(version)
        for slot in sorted(open_round.waiting):  # closed early: what arrived, still in slot order
            open_round.fold(open_round.waiting.pop(slot))
        aggregate, quorum = open_round.aggregate, open_round.quorum
        current, state = self.versions[version], self.states[version]
        answered = len(aggregate.clients) + len(aggregate.rejected)
        self.last_quorum_met = answered >= quorum
        self.last_metrics = {}
        if self.finalize is not None and self.last_quorum_met:
            aggregate, self.last_metrics = self.finalize(aggregate, version)
        if not self.last_quorum_met:
            log.warning(
                "round on version %d: %d answers < quorum %d; global model unchanged",
                version,
                answered,
                quorum,
            )
            self._publish(current, state)
        elif aggregate.has_weight:
            self._publish(*self.server_update(current, state, aggregate))
        else:  # every update was rejected (or nobody was selected): the global model stays as it was
            if answered:
                log.warning("round on version %d aggregated no update; global model unchanged", version)
            self._publish(current, state)
        self.last_aggregate = aggregate
        self.aggregate_s = self._round_aggregate_s + time.perf_counter() - start
        self.bytes_in, self.pushes_in = self._round_bytes_in, self._round_pushes_in
        self._round_aggregate_s, self._round_bytes_in, self._round_pushes_in = 0.0, 0, 0

    @staticmethod
    def _freeze(broadcast: Arrays) -> Arrays:
        if not isinstance(broadcast, dict) or not all(isinstance(v, np.ndarray) for v in broadcast.values()):
            raise TypeError("a parameter server holds broadcasts: dicts of named numpy arrays")
        return dict(broadcast)

    def _publish(self, broadcast: Arrays, state: dict[str, Any] | None = None) -> None:  # type: ignore[override]
        super()._publish(self._freeze(broadcast))
        self.states[self.latest] = state if state is not None else {}
        for old in [v for v in self.states if v not in self.versions]:
            del self.states[old]

    def server_state(self, version: int | None = None) -> dict[str, Any]:
        """The server state of `version` (default: the latest)."""
        return self.states[self.latest if version is None else version]

    def reset(self, broadcast: Arrays, version: int, state: dict[str, Any] | None = None) -> None:  # type: ignore[override]
        """Hold `broadcast` and `state` as `version`, forgetting every other version (a take-over)."""
        if self.rounds:
            raise RuntimeError(f"cannot reset while rounds on versions {sorted(self.rounds)} are open")
        super().reset(broadcast, version)
        self.states = {version: dict(state or {})}

    def round_summary(self) -> dict[str, object]:
        """Who was aggregated and who was rejected in the last completed round."""
        agg = self.last_aggregate
        if agg is None:
            return {"clients": [], "rejected": [], "weights": {}, "aggregate_s": 0.0, "quorum_met": True}
        return {
            "clients": list(agg.clients),
            "rejected": list(agg.rejected),
            "weights": dict(agg.weights),
            "aggregate_s": self.aggregate_s,
            "quorum_met": self.last_quorum_met,
            "stale_pushes": self.stale_pushes,
            "bytes_in": self.bytes_in,  # the round's pushed partials (per-node sums count once)
            "pushes_in": self.pushes_in,
            "server_metrics": dict(self.last_metrics),  # what the finalizer reported (e.g. dp_noise_std)
        }
