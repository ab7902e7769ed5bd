"""FedPer (Arivazhagan, Aggarwal, Singh, Choudhary 2019, "Federated Learning with Personalization
Layers"): base layers are federated as in FedAvg, the personalization layers never leave the client."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from raypfl.algorithms.aggregate import MODEL, Aggregate, Arrays, ClientUpdate
from raypfl.algorithms.base import Algorithm, ClientContext
from raypfl.algorithms.fedavg import FedAvg, local_sgd, metrics
from raypfl.config import knob
from raypfl.errors import ConfigError

log = logging.getLogger(__name__)

KEY = "algorithm.personal_layers"


@dataclass
class FedPer(FedAvg):
    """FedAvg on the shared (base) layers; each client keeps its own personalization layers.

    `personal_layers` lists module-name prefixes of the model's state_dict names (`net.5` takes `net.5.weight`
    and `net.5.bias`); null: the model's last parameterized module (the classifier head). `check_model`
    resolves them once, before any runtime starts, into index arrays of the flat vector that travel with the
    algorithm.

    Client (state: the values of its personal coordinates, None at first): the worker has loaded the global
    model; the client's own personal layers replace the global ones (at first it keeps the global model's),
    all layers train as in FedAvg, and only `model` = (y - x)[shared] is sent (weighted as FedAvg). Its new
    state is y[personal]. Server: x[shared] += server_lr * mean(model); the global model's personal layers
    keep their initial values (no client ever sends them). `optim.persistent_state=true` is refused.
    """

    name = "fedper"
    stateful_clients: ClassVar[bool] = True  # type: ignore[assignment]  # FedAvg's is a property
    personal_layers: list[str] | None = knob(
        None, expect="a list of layer names, e.g. [fc2]", null="the model's last layer"
    )
    # set by check_model: coordinates of the flat vector (int64) that are federated / stay on the client
    shared_index: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    personal_index: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    # no lock-step half: FedAvg's would federate every layer
    client_updates = Algorithm.client_updates

    def check(self) -> None:
        super().check()
        if self.personal_layers is not None and not self.personal_layers:
            raise ConfigError(
                f"{KEY}=[] names no layer: FedPer needs at least one (null: the model's last layer; "
                "for no personal layers use algorithm=fedavg)"
            )
        if self.optim.persistent_state:
            raise ConfigError(
                "algorithm=fedper keeps each client's personal layers as its state: "
                "optim.persistent_state=true is not supported"
            )

    def check_model(self, model: Any) -> None:
        """Resolve `personal_layers` against the model: ConfigError for a name matching nothing or for
        every layer personal; store the shared and personal index arrays."""
        shared, personal, layers = resolve_layers(model, self.personal_layers)
        self.shared_index, self.personal_index = shared, personal
        log.info(
            "fedper: personal layers %s (%d of %d weights stay on the clients)",
            ", ".join(layers),
            personal.size,
            shared.size + personal.size,
        )

    def _indices(self) -> tuple[np.ndarray, np.ndarray]:
        if self.shared_index is None or self.personal_index is None:
            raise RuntimeError(
                "FedPer does not know its personal layers: call check_model(model) first (build_setup does)"
            )
        return self.shared_index, self.personal_index

    # --- client half -----------------------------------------------------------------------------------

    def client_update(self, ctx: ClientContext, broadcast: Arrays) -> tuple[ClientUpdate, Any]:
        from raypfl.models.weights import get_flat, set_flat

        shared, personal = self._indices()
        if ctx.state is not None:  # the client's own personal layers over the global model's
            start = get_flat(ctx.model)
            start[personal] = ctx.state
            set_flat(ctx.model, start)
        result, _ = local_sgd(ctx, self.optim, self.local_train(ctx))
        y = get_flat(ctx.model)
        delta = y[shared] - broadcast[MODEL][shared]  # the personal layers never leave the client
        update = ClientUpdate(
            ctx.client, {MODEL: delta}, {MODEL: self.client_weight(ctx)}, metrics(ctx, result)
        )
        return update, y[personal]

    # --- server half -----------------------------------------------------------------------------------

    def server_update(
        self, broadcast: Arrays, state: dict[str, Any], aggregate: Aggregate
    ) -> tuple[Arrays, dict[str, Any]]:
        shared, _ = self._indices()
        model = broadcast[MODEL].astype(np.float64)
        model[shared] += self.server_lr * aggregate.mean(MODEL)
        return {**broadcast, MODEL: model.astype(np.float32)}, state

    # --- personalization -------------------------------------------------------------------------------

    def personal_model(self, state: Any, broadcast: Arrays) -> np.ndarray | None:
        """The global model with the client's personal layers (the global model if it never trained)."""
        if state is None:
            return broadcast[MODEL]
        _, personal = self._indices()
        model = np.array(broadcast[MODEL], dtype=np.float32)
        model[personal] = state
        return model


def resolve_layers(model: Any, names: list[str] | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(shared index, personal index, the personal layer names) of the model's flat vector for layer-name
    prefixes `names` (None: the last parameterized module); ConfigError naming `algorithm.personal_layers`
    if a name matches nothing or every layer would be personal."""
    from raypfl.models.weights import flat_names

    state = model.state_dict(keep_vars=True)
    flat = flat_names(model)
    sizes = [state[n].numel() for n in flat]
    prefixes = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in flat))  # the model's layers, in order
    if names is None:
        last = [n for n, _ in model.named_parameters()][-1]
        layers = [last.rsplit(".", 1)[0]]
    else:
        layers = list(names)
        for p in layers:
            if not any(n == p or n.startswith(p + ".") for n in flat):
                raise ConfigError(
                    f"{KEY}={written(names)}: {p} names no layer of the model "
                    f"(its layers: {', '.join(prefixes)})"
                )
    mask = np.concatenate(
        [
            np.full(size, any(n == p or n.startswith(p + ".") for p in layers), dtype=bool)
            for n, size in zip(flat, sizes)
        ]
    )
    if mask.all():
        raise ConfigError(
            f"{KEY}={written(names)} makes every layer personal ({', '.join(prefixes)}): "
            "nothing would be federated"
        )
    return np.flatnonzero(~mask).astype(np.int64), np.flatnonzero(mask).astype(np.int64), layers


def written(names: list[str] | None) -> str:
    """`personal_layers` as it is written on the command line: [net.3, net.5], null."""
    return "null" if names is None else f"[{', '.join(names)}]"
