"""Client and server pipelines: the configured steps, in order, with their randomness and state.

Randomness is (root seed, purpose tag, keys), never a process's stream: client step i of client c in round
r draws from `rng(seed, POSTPROCESS, r, c, i)`, the server's noise from `rng(seed, CENTRAL_NOISE, version)`,
so retries, restarted actors and any placement of clients on workers reproduce the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from raypfl import seeding
from raypfl.algorithms.aggregate import MODEL, Aggregate, ClientUpdate
from raypfl.postprocess.base import ClientStep, ServerStep, Wire

#: Bytes per value of a statistic the steps do not touch (sent dense, float32).
DENSE_BYTES = 4


@dataclass
class ClientPipeline:
    """The client steps, applied in order to each client's `model` update on the worker."""

    steps: list[ClientStep] = field(default_factory=list)

    @property
    def stateful(self) -> bool:
        """True if some step keeps per-client state (top-k's error-feedback residual)."""
        return any(step.stateful for step in self.steps)

    def apply(
        self,
        update: ClientUpdate,
        state: dict[str, np.ndarray] | None,
        seed: int,
        round_idx: int,
        client: int,
    ) -> tuple[ClientUpdate, dict[str, np.ndarray] | None, int, dict[str, float]]:
        """(the postprocessed update, the steps' new state, wire bytes, metrics).

        Acts on `update.statistics[MODEL]` only; the other statistics pass through and count dense float32
        in the wire bytes. `state` maps a stateful step's name to its array (None: first participation, or
        no stateful step). A new ClientUpdate is returned; the input's arrays are not modified. A non-finite
        update passes through untouched with its state unchanged (`Aggregate.add` will reject it; the worker
        must not store the state of a rejected client).
        """
        if MODEL not in update.statistics:
            raise ValueError(
                f"client {client}: postprocess acts on statistic {MODEL!r}, which it did not send"
            )
        raw = update.statistics[MODEL]
        vector = np.array(raw, dtype=np.float32).reshape(-1)  # a copy: later mutation cannot reach `raw`
        wire = Wire(values=vector.size)
        old = state or {}
        new: dict[str, np.ndarray] = {}
        metrics: dict[str, float] = {}
        if np.isfinite(vector).all():
            for index, step in enumerate(self.steps):
                rng = seeding.rng(seed, seeding.POSTPROCESS, round_idx, client, index)
                previous = old.get(step.name) if step.stateful else None
                vector, wire, kept, step_metrics = step.apply(vector, wire, previous, rng)
                if step.stateful and kept is not None:
                    new[step.name] = kept
                metrics.update(step_metrics)
        else:
            new = dict(old)
        statistics = {**update.statistics, MODEL: vector.reshape(np.shape(raw))}
        others = sum(int(np.size(v)) for name, v in update.statistics.items() if name != MODEL)
        result = ClientUpdate(update.client, statistics, dict(update.weights), dict(update.metrics))
        return result, (new if self.stateful else None), wire.nbytes() + DENSE_BYTES * others, metrics


@dataclass
class ServerPipeline:
    """The server steps, applied in order to the round's merged aggregate in the parameter server."""

    steps: list[ServerStep] = field(default_factory=list)

    def apply(self, aggregate: Aggregate, seed: int, version: int) -> tuple[Aggregate, dict[str, float]]:
        """(the aggregate for `server_update`, metrics); the noise is keyed on `version` (the server version
        the round builds on), so every runtime and every replica draws the same bits."""
        metrics: dict[str, float] = {}
        if not self.steps:
            return aggregate, metrics
        rng = seeding.rng(seed, seeding.CENTRAL_NOISE, version)
        for step in self.steps:
            aggregate, step_metrics = step.apply(aggregate, rng)
            metrics.update(step_metrics)
        return aggregate, metrics
