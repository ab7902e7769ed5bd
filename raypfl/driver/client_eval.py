"""Per-client evaluation (`train.eval_clients_every`): every client tested on its own held-out data.

The round's metrics row gets the mean, the worst 10% (the mean accuracy of the lowest-scoring tenth of the
clients, at least one client, as q-FFL reports it) and the standard deviation of client accuracy, for the
global model (`client_acc_*`) and, for personalized algorithms, the clients' personal models
(`personal_acc_*`). Each client's figures go to clients.csv as a row with status `eval`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def due(round_idx: int, every: int, rounds: int) -> bool:
    """True if round `round_idx` ends with a per-client evaluation (every N rounds and after the last)."""
    return bool(every) and (round_idx % every == 0 or round_idx == rounds)


def summarize(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The metrics-row figures of one per-client evaluation."""
    summary: dict[str, float] = {}
    for model, key in (("client", "eval_acc"), ("personal", "personal_acc")):
        accs = np.sort([row[key] for row in rows if key in row])
        if accs.size == 0:
            continue
        worst = accs[: max(1, math.ceil(0.1 * accs.size))]
        summary[f"{model}_acc_mean"] = round(float(accs.mean()), 6)
        summary[f"{model}_acc_worst10"] = round(float(worst.mean()), 6)
        summary[f"{model}_acc_std"] = round(float(accs.std()), 6)
    return summary


def client_rows(round_idx: int, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """clients.csv rows (status `eval`) of one per-client evaluation."""
    return [
        {"round": round_idx, "status": "eval", "accepted": "", **{k: _rounded(v) for k, v in row.items()}}
        for row in rows
    ]


def _rounded(value: Any) -> Any:
    return round(value, 6) if isinstance(value, float) else value
