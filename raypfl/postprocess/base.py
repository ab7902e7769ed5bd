"""The two kinds of update postprocessor and the wire-size model they share.

A `ClientStep` runs on the worker, once per client, on the client's `model` update (after the algorithm's
`client_update`, before `Aggregate.add`); a `ServerStep` runs in the parameter server, once per round, on the
merged `Aggregate` (before `server_update`). Compression is simulated: a client step returns the DENSE
decoded float32 vector that the server would reconstruct, so the linear sum is unchanged, and a `Wire`
records what would have been sent (pfl-research's postprocessors keep the same split between what is
computed and what is counted).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from raypfl.algorithms.aggregate import Aggregate


@dataclass
class Wire:
    """What one statistic would cost on the wire.

    `values` entries of `bits` bits each, plus `index_bytes` (which entries: top-k's indices or bitmap) and
    `header_bytes` (side information: quantize's per-bucket minimum and step). `support` is not counted: it
    is the sorted indices of the entries a sparsifier kept (None: all of them), so that a later step (e.g.
    quantize after top-k) encodes only those.
    """

    values: int
    bits: int = 32
    index_bytes: int = 0
    header_bytes: int = 0
    support: np.ndarray | None = field(default=None, repr=False, compare=False)

    def nbytes(self) -> int:
        """index_bytes + header_bytes + ceil(values * bits / 8)."""
        return int(self.index_bytes + self.header_bytes + -(-int(self.values) * int(self.bits) // 8))


@dataclass
class ClientStep:
    """A step applied to each client's update on the worker; subclasses are dataclasses whose fields are
    their knobs (`knob(...)`), read from the config group named `name`.

    `stateful`: the step keeps a per-client array between the rounds a client takes part in (top-k's
    error-feedback residual); it travels as client state. `may_raise_norm`: applying the step after clip can
    raise an update's l2 norm above clip.bound, which breaks the sensitivity DP noise is calibrated to.
    Either may be a property when it depends on a knob.
    """

    name: ClassVar[str]
    stateful: ClassVar[bool] = False
    may_raise_norm: ClassVar[bool] = False

    def apply(
        self, vector: np.ndarray, wire: Wire, state: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, Wire, np.ndarray | None, dict[str, float]]:
        """(decoded float32 vector, its wire description, the step's new state, metrics) for `vector`, the
        client's float32 (d,) update after the previous steps. Must not modify `vector` or `state`."""
        raise NotImplementedError


@dataclass
class ServerStep:
    """A step applied once per round to the merged aggregate, in the parameter server."""

    name: ClassVar[str]

    def apply(self, aggregate: Aggregate, rng: np.random.Generator) -> tuple[Aggregate, dict[str, float]]:
        """(the aggregate to hand to `server_update`, metrics); must not modify `aggregate`."""
        raise NotImplementedError
