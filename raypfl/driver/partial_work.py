"""Systems heterogeneity as in FedProx (Li et al. 2020, Section 5.2): in every round a seeded fraction of
the cohort are stragglers that manage fewer than E local epochs (or steps).

Each straggler's amount is drawn uniformly from 1..E-1, as the FedProx code draws it (E being
`train.local_epochs`, or `train.local_steps` when set). `clients.partial_work_policy=drop` discards the
stragglers (FedAvg in the paper: the server does not wait for them), `keep` lets them send what they did.
The draw depends on (root seed, round) alone, so every runtime and every resume sees the same stragglers.
"""

from __future__ import annotations

from raypfl import seeding
from raypfl.config import ClientsSpec, TrainSpec


def stragglers(
    clients: ClientsSpec, train: TrainSpec, seed: int, round_idx: int, cohort: list[int]
) -> dict[int, dict[str, int]]:
    """{client: its reduced work, a `train.*` override} for this round's stragglers (none if the fraction
    is 0). With policy `drop` at least one client of the cohort is not a straggler."""
    count = round(clients.partial_work_fraction * len(cohort))
    if clients.partial_work_policy == "drop":
        count = min(count, len(cohort) - 1)
    if count <= 0:
        return {}
    rng = seeding.rng(seed, seeding.PARTIAL, round_idx)
    chosen = rng.choice(sorted(cohort), size=count, replace=False)
    key, full = ("local_epochs", train.local_epochs)
    if train.local_steps is not None:
        key, full = "local_steps", train.local_steps
    amounts = rng.integers(1, full, size=count)  # 1 .. E-1
    return {int(c): {key: int(k)} for c, k in sorted(zip(chosen, amounts))}
