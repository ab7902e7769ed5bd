"""Update postprocessors: client steps applied on the worker to each client's `model` update (clip, top-k,
stochastic quantization, local Gaussian noise) and server steps applied to the round's aggregate (central
Gaussian noise, DP-FedAvg). `postprocess=[...]` lists them; `check_order` refuses orders that break the
clip bound the noise is calibrated to, and `build_pipelines` turns the list into the two pipelines.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from raypfl.config.knobs import show
from raypfl.errors import ConfigError
from raypfl.postprocess.base import ClientStep, ServerStep, Wire
from raypfl.postprocess.central_dp import CentralGaussian
from raypfl.postprocess.clip import Clip
from raypfl.postprocess.local_dp import LocalGaussian
from raypfl.postprocess.pipeline import ClientPipeline, ServerPipeline
from raypfl.postprocess.quantize import StochasticQuantize
from raypfl.postprocess.state import join_state, split_state
from raypfl.postprocess.topk import TopK

CLIENT_STEPS: dict[str, type[ClientStep]] = {
    cls.name: cls for cls in (Clip, TopK, StochasticQuantize, LocalGaussian)
}
SERVER_STEPS: dict[str, type[ServerStep]] = {cls.name: cls for cls in (CentralGaussian,)}
#: Every step name, client steps first (the order error messages list them in).
STEPS: tuple[str, ...] = (*CLIENT_STEPS, *SERVER_STEPS)

__all__ = [
    "CLIENT_STEPS",
    "SERVER_STEPS",
    "STEPS",
    "CentralGaussian",
    "ClientPipeline",
    "ClientStep",
    "Clip",
    "LocalGaussian",
    "ServerPipeline",
    "ServerStep",
    "StochasticQuantize",
    "TopK",
    "Wire",
    "build_pipelines",
    "check_order",
    "join_state",
    "knob_names",
    "split_state",
]


def knob_names(cls: type) -> list[str]:
    """The user-facing keys of a step class: its dataclass fields minus `internal` ones (LocalGaussian's
    bound, which the builder copies from clip.bound)."""
    return [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def _client_step(name: str, steps: Mapping[str, ClientStep] | None) -> ClientStep:
    """The configured instance of client step `name`, or one with default knobs."""
    if steps is not None and name in steps:
        return steps[name]
    return CLIENT_STEPS[name]()


def check_order(names: Sequence[str], steps: Mapping[str, ClientStep] | None = None) -> None:
    """Raise a one-line ConfigError if `postprocess=names` cannot run as listed.

    Refused: unknown or repeated steps; a server step before a client step; central_dp without clip;
    local_dp without clip before it; and, when a DP step is present, a step that can raise an update's norm
    above clip.bound (quantize, local_dp, top-k with error feedback) between clip and the noise (for
    central_dp: anywhere after clip). `steps` maps client-step names to their configured instances (for
    clip.bound and top-k's error_feedback); missing ones are taken with default knobs.
    """
    names = [str(name) for name in names]
    shown = f"postprocess=[{', '.join(names)}]"
    for name in names:
        if name not in STEPS:
            raise ConfigError(f"{shown}: unknown step {name} (choose from: {', '.join(STEPS)})")
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"{shown}: {name} is listed twice (each step runs once)")
    server = [i for i, name in enumerate(names) if name in SERVER_STEPS]
    if server and any(name in CLIENT_STEPS for name in names[server[0] :]):
        late = next(name for name in names[server[0] :] if name in CLIENT_STEPS)
        raise ConfigError(
            f"{shown}: {names[server[0]]} is a server step (it acts on the round's aggregate): "
            f"put it after the client steps ({late})"
        )
    central, local = "central_dp" in names, "local_dp" in names
    if central and "clip" not in names:
        raise ConfigError(f"{shown} adds noise calibrated to clip.bound: put clip before it")
    if local and ("clip" not in names or names.index("clip") > names.index("local_dp")):
        raise ConfigError(f"{shown}: local_dp needs clip before it (its noise is scaled to clip.bound)")
    if not (central or local):
        return  # a plain compression pipeline: nothing is calibrated to clip.bound
    bound = show(float(getattr(_client_step("clip", steps), "bound", 1.0)))
    clients = [name for name in names if name in CLIENT_STEPS]
    end = len(clients) if central else clients.index("local_dp")
    for name in clients[clients.index("clip") + 1 : end]:
        if name == "local_dp":  # only reached with central_dp
            raise ConfigError(
                f"{shown}: local_dp after clip raises an update's norm above clip.bound={bound}, which "
                "central_dp's noise is calibrated to; use one of local_dp and central_dp"
            )
        if _client_step(name, steps).may_raise_norm:
            hint = " (or set topk.error_feedback=false)" if name == "topk" else ""
            raise ConfigError(
                f"{shown}: {name} after clip can raise an update's norm above clip.bound={bound}; "
                f"put it before clip{hint}"
            )


def build_pipelines(
    names: Sequence[str],
    client_steps: Mapping[str, ClientStep] | None = None,
    server_steps: Mapping[str, ServerStep] | None = None,
) -> tuple[ClientPipeline, ServerPipeline]:
    """The two pipelines for `postprocess=names` (checked with `check_order` first).

    `client_steps` holds the configured client steps (missing ones get default knobs); LocalGaussian's
    `bound` is set here from clip's. `server_steps` must hold every listed server step, built by the caller
    (CentralGaussian needs z, m and M from other groups); its bound must equal clip.bound.
    """
    names = [str(name) for name in names]
    check_order(names, client_steps)
    clip = _client_step("clip", client_steps) if "clip" in names else None
    client: list[ClientStep] = []
    server: list[ServerStep] = []
    for name in names:
        if name in CLIENT_STEPS:
            step = _client_step(name, client_steps)
            if isinstance(step, LocalGaussian) and isinstance(clip, Clip):
                step = dataclasses.replace(step, bound=clip.bound)
            client.append(step)
            continue
        if server_steps is None or name not in server_steps:
            raise ValueError(f"postprocess: server step {name} was listed but not built")
        step = server_steps[name]
        if isinstance(step, CentralGaussian) and isinstance(clip, Clip) and step.bound != clip.bound:
            raise ValueError(f"central_dp: bound={step.bound} differs from clip.bound={clip.bound}")
        server.append(step)
    return ClientPipeline(client), ServerPipeline(server)
