"""Who can be selected: clients join on a schedule (`clients.join_schedule`) and are evicted after
`faults.evict_after` consecutive failures (dropped, failed or lost with their actor)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from raypfl.config import ClientsSpec

log = logging.getLogger("raypfl")

#: Statuses that count as a failure to answer (late clients answered, just not in time).
FAILURES = ("dropped", "failed")


class EligibleClients(Sequence):
    """Clients 0..joined-1 except the evicted ones, in id order, without a list of them.

    Indexing costs O(log evicted), so selecting a cohort costs O(cohort), not O(clients.num).
    """

    def __init__(self, joined: int, evicted: np.ndarray):
        """`evicted`: the sorted evicted ids below `joined`."""
        self.joined = int(joined)
        self._evicted = np.asarray(evicted, np.int64)
        self._shift = self._evicted - np.arange(len(evicted))  # evicted id minus its rank: non-decreasing
        self._len = self.joined - len(evicted)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> int:  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._len))]
        i = int(i) + (self._len if i < 0 else 0)
        if not 0 <= i < self._len:
            raise IndexError(f"eligible client {i} out of range [0, {self._len})")
        return i + int(np.searchsorted(self._shift, i, side="right"))  # skip the evicted ids below it

    def tolist(self) -> list[int]:
        """All of them, as a list (O(joined))."""
        keep = np.ones(self.joined, dtype=bool)
        keep[self._evicted] = False
        return np.flatnonzero(keep).tolist()


class Membership:
    """The federation's present clients, round by round."""

    def __init__(self, clients: ClientsSpec, evict_after: int | None):
        self.clients = clients
        self.evict_after = evict_after
        self.failures: dict[int, int] = {}  # client -> consecutive failures
        self.evicted: set[int] = set()
        self._evicted_sorted: np.ndarray | None = None  # cache of sorted(evicted), rebuilt after a change

    @property
    def dynamic(self) -> bool:
        return bool(self.clients.join_schedule) or self.evict_after is not None

    def eligible(self, round_idx: int) -> list[int] | None:
        """Clients that may be selected in `round_idx`, as a list; None means all of them."""
        view = self.eligible_view(round_idx)
        return None if view is None else view.tolist()

    def eligible_view(self, round_idx: int) -> EligibleClients | None:
        """`eligible` without building the list: O(evicted) work, whatever clients.num is."""
        if not self.dynamic:
            return None
        joined = self.clients.joined_by(round_idx)
        if joined > self.clients.joined_by(round_idx - 1) and round_idx > 1:
            log.info("round %d: %d clients have joined (ids 0-%d)", round_idx, joined, joined - 1)
        if self._evicted_sorted is None:
            self._evicted_sorted = np.array(sorted(self.evicted), dtype=np.int64)
        below = self._evicted_sorted[: np.searchsorted(self._evicted_sorted, joined)]
        return EligibleClients(joined, below)

    def observe(self, round_idx: int, client_rows: list[dict[str, Any]]) -> None:
        """Count consecutive failures; evict clients that reach `faults.evict_after`."""
        for row in client_rows:
            client = int(row["client"])
            if row.get("status") in FAILURES:
                self.failures[client] = self.failures.get(client, 0) + 1
                if self.evict_after is not None and self.failures[client] >= self.evict_after:
                    if client not in self.evicted:
                        log.warning(
                            "round %d: client %d evicted after %d consecutive failures",
                            round_idx,
                            client,
                            self.failures[client],
                        )
                    self.evicted.add(client)
                    self._evicted_sorted = None
            else:
                self.failures.pop(client, None)

    def state_dict(self) -> dict[str, Any]:
        return {"failures": dict(self.failures), "evicted": sorted(self.evicted)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.failures = dict(state["failures"])
        self.evicted = set(state["evicted"])
        self._evicted_sorted = None
