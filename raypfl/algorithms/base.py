"""The algorithm contract: a client half and a server half, owned together by one class, runtime-agnostic.

Per round the server **broadcasts named arrays** (`model`, the global model, and whatever the algorithm
adds); each client maps (broadcast, its data, its state) to **named statistics, each with its own weight**
(a `ClientUpdate`) and its next state; workers sum their clients into one partial per round; the server
maps (broadcast, server state, aggregate) to (next broadcast, next server state). Runtimes keep the
server state beside the versioned broadcast, checkpoint it and hand it over; they never look inside.

An algorithm is a dataclass: its fields are its knobs (`algorithm.*` in the config, each checked against
its type and `knob(...)` range), and `bind(setting)` tells it the run's client optimizer, local work and
federation size before it is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from raypfl.algorithms.aggregate import MODEL, Aggregate, Arrays, ClientUpdate

if TYPE_CHECKING:  # the server half runs where torch need not be imported (the parameter server)
    import torch
    from torch import nn

    from raypfl.config import OptimSpec, TrainSpec


@dataclass(frozen=True)
class Setting:
    """What an algorithm is told about the run besides its own knobs."""

    optim: OptimSpec
    train: TrainSpec
    num_clients: int  # N, the federation's size (SCAFFOLD moves its control variate by |S|/N)
    per_round: int  # the cohort size


@dataclass
class ServerSnapshot:
    """The server's side of one version: the broadcast (what clients receive) and the server state."""

    version: int
    broadcast: Arrays
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> np.ndarray:
        return self.broadcast[MODEL]


@dataclass
class ClientContext:
    """One client's round: the worker's model (global model already loaded), data view and randomness."""

    client: int
    round_idx: int
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    indices: np.ndarray
    generator: torch.Generator
    state: Any = None  # what client_update returned as state last time this client trained (None at first)
    work: dict[str, Any] = field(default_factory=dict)  # train.* overrides for this client (load balancing)


@dataclass
class Algorithm:
    """Base class of federated algorithms. Subclasses add knobs as fields and implement both halves.

    Class attributes a subclass may set: `name` (its short name), `stateful_clients` (clients keep state
    across rounds: a runtime then keeps each client on one worker and the driver keeps a durable copy).
    A subclass with a lock-step client half overrides `client_updates` (`runtime.vectorize=true`).
    """

    name: ClassVar[str] = ""
    stateful_clients: ClassVar[bool] = False
    #: The statistics a client sends (central DP checks that clip bounds all of them: only `model`).
    statistics: ClassVar[tuple[str, ...]] = (MODEL,)
    #: True for asynchronous algorithms (FedBuff): rounds are server steps of a stream of client updates.
    asynchronous: ClassVar[bool] = False
    setting: Setting | None = field(default=None, init=False, repr=False, compare=False)

    def statistic_sizes(self, model_size: int) -> dict[str, int]:
        """Values in each statistic a client sends (the virtual clock's upload size): model-sized unless an
        algorithm says otherwise."""
        return dict.fromkeys(self.statistics, model_size)

    def bind(self, setting: Setting) -> Algorithm:
        """Tell the algorithm about the run; returns itself."""
        self.setting = setting
        self.check()
        return self

    def check(self) -> None:
        """Raise ConfigError if the knobs do not fit the run's setting (override to add rules)."""

    @property
    def optim(self) -> OptimSpec:
        return self._bound().optim

    @property
    def train(self) -> TrainSpec:
        return self._bound().train

    def _bound(self) -> Setting:
        if self.setting is None:
            raise RuntimeError(f"{type(self).__name__} is not bound to a run: call bind(setting) first")
        return self.setting

    def local_train(self, ctx: ClientContext) -> TrainSpec:
        """`train.*` for this client (with its load-balancing overrides)."""
        return replace(self.train, **ctx.work) if ctx.work else self.train

    # --- the server half -------------------------------------------------------------------------------

    def server_init(self, model: np.ndarray) -> tuple[Arrays, dict[str, Any]]:
        """(the first broadcast, the initial server state) from the initial global model."""
        return {MODEL: model}, {}

    def server_update(
        self, broadcast: Arrays, state: dict[str, Any], aggregate: Aggregate
    ) -> tuple[Arrays, dict[str, Any]]:
        """Turn the round's aggregate into (the next broadcast, the next server state)."""
        raise NotImplementedError

    # --- the client half -------------------------------------------------------------------------------

    def client_update(self, ctx: ClientContext, broadcast: Arrays) -> tuple[ClientUpdate, Any]:
        """Train one client from the broadcast; return its update and its state to keep (or None)."""
        raise NotImplementedError

    @property
    def lockstep(self) -> bool:
        """True if the algorithm has a lock-step client half (`client_updates`)."""
        return type(self).client_updates is not Algorithm.client_updates

    def client_updates(
        self, contexts: list[ClientContext], broadcast: Arrays
    ) -> list[tuple[ClientUpdate, Any]]:
        """`client_update` for many clients at once, in lock-step; see `raypfl.training.lockstep`."""
        raise NotImplementedError

    # --- personalization -------------------------------------------------------------------------------

    @property
    def personalized(self) -> bool:
        """True if clients have personal models (the class overrides `personal_model`)."""
        return type(self).personal_model is not Algorithm.personal_model

    def personal_model(self, state: Any, broadcast: Arrays) -> np.ndarray | None:
        """A client's personal model (flat float32 weights) from its state and the latest broadcast.

        `state` is what `client_update` last returned for the client (None if it never trained). None
        means the algorithm has no personal models: the client is served the global model. Per-client
        evaluation (`train.eval_clients_every`) tests both.
        """
        return None

    def check_model(self, model: nn.Module) -> None:
        """Raise ConfigError if the algorithm's knobs do not fit the run's model (e.g. a layer name that
        does not exist). Called once with a built model before any runtime starts; whatever it derives
        from the model (e.g. index masks) travels with the algorithm to every worker."""


def missing_halves(cls: type) -> list[str]:
    """The halves (`client_update`, `server_update`) a class does not implement."""
    missing = []
    for half in ("client_update", "server_update"):
        method = getattr(cls, half, None)
        if not callable(method) or method is getattr(Algorithm, half):
            missing.append(half)
    return missing
