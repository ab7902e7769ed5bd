"""Seeded attacks on a federation, to measure how an aggregator holds up (`attack.*`).

A fixed set of `attack.fraction` x N clients is malicious (seeded from the root seed alone, so every
runtime agrees on who they are); each time one of them is selected it attacks:

- `sign_flip`: sends -scale x its honest update (the sign-flipping attack of Li et al. 2019, "RSA:
  Byzantine-robust stochastic aggregation methods for distributed learning", with scale 4 as there);
- `scaled`: sends scale x its honest update (a boosted update, Bhagoji et al. 2019, "Analyzing federated
  learning through an adversarial lens");
- `gaussian`: sends N(0, scale^2) noise in place of its update (Blanchard et al. 2017's Gaussian
  Byzantine workers), seeded per (round, client);
- `label_flip`: trains honestly on poisoned data, label y -> C - 1 - y (data poisoning, e.g. Fang et al.
  2020, "Local model poisoning attacks to Byzantine-robust federated learning").

Update attacks act on the `model` statistic, on the raw update, before any postprocessor (`postprocess`):
malicious clients run honest client software around a poisoned training step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raypfl import seeding
from raypfl.algorithms.aggregate import MODEL, ClientUpdate

KINDS = ("none", "sign_flip", "gaussian", "scaled", "label_flip")
#: `attack.scale` when it is null: the scale each kind is usually run with.
DEFAULT_SCALE = {"sign_flip": 4.0, "scaled": 10.0, "gaussian": 1.0, "label_flip": 1.0}


def malicious_clients(seed: int, num_clients: int, fraction: float) -> frozenset[int]:
    """The fixed identities of the round(fraction x N) malicious clients (seeded from the root seed)."""
    count = int(round(fraction * num_clients))
    picks = seeding.rng(seed, seeding.ATTACK).choice(num_clients, count, replace=False)
    return frozenset(int(c) for c in picks)


@dataclass(frozen=True)
class Attack:
    """Who attacks and how; `None` in a setup means no attack."""

    kind: str
    scale: float
    malicious: frozenset[int]
    seed: int

    @classmethod
    def build(
        cls, kind: str, fraction: float, scale: float | None, num_clients: int, seed: int
    ) -> Attack | None:
        """The attack `attack.*` asks for (None when kind is none or nobody is malicious)."""
        if kind == "none" or fraction <= 0:
            return None
        chosen = malicious_clients(seed, num_clients, fraction)
        return (
            cls(kind, DEFAULT_SCALE[kind] if scale is None else float(scale), chosen, seed)
            if chosen
            else None
        )

    def attacks(self, client: int) -> bool:
        """True if `client` is malicious."""
        return client in self.malicious

    @property
    def poisons_data(self) -> bool:
        return self.kind == "label_flip"

    def poison_update(self, update: ClientUpdate, round_idx: int) -> ClientUpdate:
        """A malicious client's update in place of its honest one (`model` statistic only)."""
        if self.poisons_data or not self.attacks(update.client):
            return update
        honest = update.statistics[MODEL]
        if self.kind == "sign_flip":
            poisoned = -self.scale * honest
        elif self.kind == "scaled":
            poisoned = self.scale * honest
        else:  # gaussian
            rng = seeding.rng(self.seed, seeding.ATTACK, round_idx, update.client)
            poisoned = rng.normal(0.0, self.scale, honest.shape)
        statistics = {**update.statistics, MODEL: poisoned.astype(honest.dtype, copy=False)}
        return ClientUpdate(
            update.client, statistics, dict(update.weights), {**update.metrics, "malicious": 1.0}
        )

    @staticmethod
    def flip_labels(y: np.ndarray, num_classes: int) -> np.ndarray:
        """Label flipping: y -> C - 1 - y."""
        return (num_classes - 1 - y).astype(y.dtype, copy=False)
