"""Client selection: which clients form each round's cohort, seeded per round from the root seed."""

from __future__ import annotations

from raypfl import seeding
from raypfl.config import ClientsSpec


class CohortSampler:
    """`random`: a fresh uniform sample each round; `fixed`: one sample chosen once, reused every round."""

    def __init__(self, spec: ClientsSpec, seed: int):
        self.spec = spec
        self.seed = seed

    def cohort(self, round_idx: int) -> list[int]:
        key = 0 if self.spec.selection == "fixed" else round_idx
        chosen = seeding.rng(self.seed, seeding.SELECTION, key).choice(
            self.spec.num, self.spec.per_round, replace=False
        )
        return sorted(int(c) for c in chosen)
