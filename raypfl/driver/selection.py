"""Client selection: which clients form each round's cohort, seeded per round from the root seed."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from raypfl import seeding
from raypfl.config import ClientsSpec


class CohortSampler:
    """`random`: a fresh uniform sample of `per_round` clients each round (without replacement); `fixed`: one
    sample chosen once, reused every round; `poisson`: each client independently with probability
    q = per_round / num each round (Poisson sampling, as DP-FedAvg's accounting assumes: McMahan et al.
    2018), so the cohort's size varies and may be 0."""

    def __init__(self, spec: ClientsSpec, seed: int):
        self.spec = spec
        self.seed = seed

    def cohort(self, round_idx: int, eligible: Sequence[int] | None = None) -> list[int]:
        """The round's cohort: `per_round` clients, over-selected by `clients.over_select` (or all of
        `eligible`, if fewer are eligible).

        The sampler keeps no state: each round's draw is seeded from (root seed, round), so a resumed
        run draws exactly what the uninterrupted run would have. Only `per_round` positions of `eligible`
        are read (a lazy `EligibleClients` of 100k ids costs no more than a short list); the draw is the
        same as `rng.choice(list(eligible), ...)`.
        """
        key = 0 if self.spec.selection == "fixed" else round_idx
        rng = seeding.rng(self.seed, seeding.SELECTION, key)
        if self.spec.selection == "poisson":
            return self._poisson(rng, eligible)
        if eligible is None:
            chosen = rng.choice(self.spec.num, min(self.spec.selected, self.spec.num), replace=False)
        else:
            picks = rng.choice(len(eligible), min(self.spec.selected, len(eligible)), replace=False)
            chosen = [eligible[int(i)] for i in picks]
        return sorted(int(c) for c in chosen)

    def _poisson(self, rng, eligible: Sequence[int] | None) -> list[int]:
        """Each (eligible) client in with probability per_round / num, independently."""
        rate = min(1.0, self.spec.selected / self.spec.num)
        if eligible is None:
            return [int(c) for c in np.flatnonzero(rng.random(self.spec.num) < rate)]
        return sorted(int(eligible[int(i)]) for i in np.flatnonzero(rng.random(len(eligible)) < rate))
