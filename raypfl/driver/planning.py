"""The driver's side of a federation between rounds: who trains next, how much, and from which state."""

from __future__ import annotations

from typing import Any

from raypfl.config import ClientsSpec, FaultsSpec, TrainSpec
from raypfl.driver.balancing import WorkloadBalancer
from raypfl.driver.membership import Membership
from raypfl.driver.partial_work import stragglers
from raypfl.driver.selection import CohortSampler
from raypfl.runtime.base import RoundPlan, RoundResult


class RoundPlanner:
    """Cohort selection over the present clients, their workload, and the durable copy of their state.

    Everything here is driver-side and checkpointed (`state_dict`), so a resumed run plans exactly the
    rounds the uninterrupted run would have. (The sampler itself keeps no state: it is seeded per round.)
    """

    def __init__(
        self,
        clients: ClientsSpec,
        faults: FaultsSpec,
        seed: int,
        parallelism: int,
        train: TrainSpec | None = None,
    ):
        self.clients, self.train, self.seed = clients, train or TrainSpec(), seed
        self.sampler = CohortSampler(clients, seed)
        self.membership = Membership(clients, faults.evict_after)
        self.balancer = WorkloadBalancer(faults if faults.active else None, parallelism)
        self.client_states: dict[int, Any] = {}

    def plan(self, round_idx: int) -> RoundPlan:
        cohort = self.sampler.cohort(round_idx, self.membership.eligible_view(round_idx))
        work = self.balancer.work(cohort)
        partial = stragglers(self.clients, self.train, self.seed, round_idx, cohort)
        dropped: dict[int, dict[str, int]] = {}
        if self.clients.partial_work_policy == "drop":
            dropped = partial  # they are not waited for: the round's cohort is the rest
            cohort = [c for c in cohort if c not in partial]
        else:
            work.update(partial)
        states = {c: self.client_states[c] for c in cohort if c in self.client_states}
        return RoundPlan(round_idx, cohort, work, states, dropped, len(partial))

    def observe(self, round_idx: int, result: RoundResult) -> None:
        """Learn from a finished round: new client states, answer times, failures."""
        self.client_states.update(result.client_states)
        self.balancer.observe(result.client_metrics)
        self.membership.observe(round_idx, result.client_metrics)

    def state_dict(self) -> dict[str, Any]:
        return {
            "client_states": self.client_states,
            "balancer": self.balancer.state_dict(),
            "membership": self.membership.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.client_states = dict(state["client_states"])
        self.balancer.load_state_dict(state["balancer"])
        self.membership.load_state_dict(state["membership"])
