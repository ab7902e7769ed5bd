"""Rounds on the virtual clock: who finishes when, and which answers a round keeps."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from raypfl.algorithms.aggregate import ClientUpdate


def client_samples(train: Any, work: dict[str, Any] | None, size: int) -> int:
    """Training samples a client processes in one round: local_steps x batch_size, else local_epochs x its
    data (`work`: the balancer's or a straggler's overrides of `train.*`)."""
    spec = replace(train, **work) if work else train
    if spec.local_steps:
        return int(spec.local_steps) * int(spec.batch_size)
    return int(spec.local_epochs) * int(size)


def upload_bytes(statistics: dict[str, int], pipeline: Any, seed: int) -> int:
    """The bytes one client's update costs on the wire: each statistic dense float32, or what the client
    steps (`pipeline`: top-k, quantization) make of it. It depends only on sizes: known before training."""
    update = ClientUpdate(
        -1,
        {name: np.zeros(size, np.float32) for name, size in statistics.items()},
        dict.fromkeys(statistics, 1.0),
    )
    if pipeline is None:
        return update.nbytes
    return int(pipeline.apply(update, None, seed, 0, 0)[2])


@dataclass
class ClosedRound:
    """A round decided on virtual time: who the server waited for, who was late, and how long it took."""

    kept: list[int]  # answered before the round closed (trained, aggregated)
    late: list[int]  # would have answered after the round closed (not trained)
    round_s: float  # virtual seconds from the broadcast to the round's close
    durations: dict[int, float] = field(default_factory=dict)


def close_round(
    durations: dict[int, float], need: int, deadline_s: float | None, silent: set[int] | None = None
) -> ClosedRound:
    """Close a synchronous round on virtual time.

    The round waits for `need` answers (the whole cohort, a quorum, or the first K of an over-selected
    cohort): it closes when the `need`-th answer arrives, at `deadline_s`, or when no answer can come any
    more. Clients in `silent` never answer (injected drops). Ties in finish time go to the lower client id.
    """
    silent = silent or set()
    finishing = sorted((d, c) for c, d in durations.items() if c not in silent)
    in_time = [(d, c) for d, c in finishing if deadline_s is None or d <= deadline_s]
    kept = in_time[:need]
    if need and len(kept) == need:
        round_s = kept[-1][0]
    elif deadline_s is not None and (silent or len(in_time) < len(finishing)):
        round_s = deadline_s  # the server cannot tell a silent client from a slow one before the deadline
    else:
        round_s = max((d for d, _ in finishing), default=0.0)
    kept_ids = {c for _, c in kept}
    late = sorted(c for _, c in finishing if c not in kept_ids)
    return ClosedRound(sorted(kept_ids), late, float(round_s), dict(durations))


class VirtualClock:
    """The federation's virtual time in seconds (checkpointed with the run)."""

    def __init__(self, now: float = 0.0):
        self.now = float(now)

    def advance(self, seconds: float) -> float:
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"cannot advance the virtual clock by {seconds}")
        self.now += seconds
        return self.now

    def state_dict(self) -> dict[str, float]:
        return {"now": self.now}
