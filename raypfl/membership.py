"""Who can be selected: clients join on a schedule (`clients.join_schedule`) and are evicted after
`faults.evict_after` consecutive failures (dropped, failed or lost with their actor)."""

from __future__ import annotations

import logging
from typing import Any

from raypfl.config import ClientsSpec

log = logging.getLogger("raypfl")

#: Statuses that count as a failure to answer (late clients answered, just not in time).
FAILURES = ("dropped", "failed")


class Membership:
    """The federation's present clients, round by round."""

    def __init__(self, clients: ClientsSpec, evict_after: int | None):
        self.clients = clients
        self.evict_after = evict_after
        self.failures: dict[int, int] = {}  # client -> consecutive failures
        self.evicted: set[int] = set()

    @property
    def dynamic(self) -> bool:
        return bool(self.clients.join_schedule) or self.evict_after is not None

    def eligible(self, round_idx: int) -> list[int] | None:
        """Clients that may be selected in `round_idx`; None means all of them (the common case)."""
        if not self.dynamic:
            return None
        joined = self.clients.joined_by(round_idx)
        if joined > self.clients.joined_by(round_idx - 1) and round_idx > 1:
            log.info("round %d: %d clients have joined (ids 0-%d)", round_idx, joined, joined - 1)
        return [c for c in range(joined) if c not in self.evicted]

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
            else:
                self.failures.pop(client, None)

    def state_dict(self) -> dict[str, Any]:
        return {"failures": dict(self.failures), "evicted": sorted(self.evicted)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.failures = dict(state["failures"])
        self.evicted = set(state["evicted"])
