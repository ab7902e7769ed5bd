"""What a finished run hands back: the final model and server state, the rows, the clients' states."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from raypfl.algorithms.base import ServerSnapshot
from raypfl.errors import RunStopped


@dataclass
class RunResult:
    """The final global weights and the per-round metrics rows."""

    weights: np.ndarray
    rounds: list[dict]
    out_dir: Path
    train_samples: int = 0  # size of the training set (0 for generated data)
    server: ServerSnapshot | None = None  # the final broadcast and server state
    client_states: dict = field(default_factory=dict)  # the driver's copy of each client's state (not MPI)

    @property
    def final_accuracy(self) -> float:
        return float(next(r["test_acc"] for r in reversed(self.rounds) if r["test_acc"] != ""))

    def check_trained(self) -> None:
        """RunStopped (exit code 3) unless the run ended with a finite model into which at least one client
        update was averaged: a run that never updated its model is not a success."""
        if not np.isfinite(self.weights).all():
            raise RunStopped(
                f"the global model has NaN/Inf weights after {len(self.rounds)} rounds "
                f"(outputs in {self.out_dir})"
            )
        if self.rounds and "clients" in self.rounds[0] and not sum(int(r["clients"]) for r in self.rounds):
            raise RunStopped(
                f"no client update was averaged into the global model in {len(self.rounds)} rounds (every "
                f"update was dropped, late, failed or rejected as NaN/Inf; see clients.csv in {self.out_dir})"
            )
