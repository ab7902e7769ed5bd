"""Straggler load balancing: how much local work each client gets next round, from how it answered.

`aimd`: every client starts at `faults.start_epochs` local epochs; an on-time answer earns one more
(up to `faults.max_epochs`); a late or missing answer halves them (at least 1).
`steps`: each client's local steps are sized from its measured seconds per step so that it answers in
its share of `faults.target_round_s` (the round's clients run `parallelism` at a time).
"""

from __future__ import annotations

from typing import Any

from raypfl.config import FaultsSpec

ON_TIME = ("ok", "rejected")


class WorkloadBalancer:
    """Driver-side: per-client work overrides for the next round, and their history for checkpoints."""

    def __init__(self, faults: FaultsSpec | None, parallelism: int = 1):
        self.rule = "none" if faults is None else faults.balance
        self.faults = faults
        self.parallelism = max(1, parallelism)
        self.epochs: dict[int, int] = {}  # aimd
        self.step_seconds: dict[int, float] = {}  # steps: measured seconds per local step

    def work(self, cohort: list[int]) -> dict[int, dict[str, Any]]:
        """train.* overrides per client for this round ({} when not balancing)."""
        if self.rule == "aimd":
            start = self.faults.start_epochs
            return {c: {"local_epochs": self.epochs.get(c, start), "local_steps": None} for c in cohort}
        if self.rule == "steps":
            budget = self.faults.target_round_s * self.parallelism / max(1, len(cohort))
            return {
                c: {"local_steps": max(1, round(budget / self.step_seconds[c]))}
                for c in cohort
                if c in self.step_seconds
            }
        return {}

    def observe(self, client_rows: list[dict[str, Any]]) -> None:
        """Learn from this round's answers (status, steps, seconds)."""
        for row in client_rows:
            client = int(row["client"])
            on_time = row.get("status") in ON_TIME
            if self.rule == "aimd":
                current = self.epochs.get(client, self.faults.start_epochs)
                self.epochs[client] = (
                    min(self.faults.max_epochs, current + 1) if on_time else max(1, current // 2)
                )
            elif self.rule == "steps" and on_time and row.get("steps"):
                # on the virtual clock a client's time is its simulated duration
                per_step = float(row.get("virtual_s", row["seconds"])) / int(row["steps"])
                old = self.step_seconds.get(client)
                self.step_seconds[client] = per_step if old is None else 0.5 * old + 0.5 * per_step
            elif self.rule == "steps" and not on_time and client in self.step_seconds:
                self.step_seconds[client] *= 2  # late or missing: halve its next workload

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": dict(self.epochs), "step_seconds": dict(self.step_seconds)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epochs = dict(state["epochs"])
        self.step_seconds = dict(state["step_seconds"])
