"""Runtimes execute rounds: `sequential` (in-process reference), `ray` (client-pool actors), `mpi` (ranks).

This package imports nothing heavy itself: a Ray parameter-server actor imports
`raypfl.runtime.parameter_server` (numpy only) without pulling in torch through `raypfl.runtime.base`.
`Evaluation`, `RoundResult` and `Runtime` are loaded from `raypfl.runtime.base` on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from raypfl.config import RuntimeSpec
    from raypfl.runtime.base import Evaluation, RoundResult, Runtime

__all__ = ["Evaluation", "RoundResult", "Runtime", "build_runtime"]
_FROM_BASE = ("Evaluation", "RoundResult", "Runtime")


def __getattr__(name: str) -> Any:
    """`Evaluation`, `RoundResult`, `Runtime`: imported from raypfl.runtime.base when first asked for."""
    if name in _FROM_BASE:
        from raypfl.runtime import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_runtime(spec: RuntimeSpec) -> Runtime:
    """The runtime named by `runtime.name` (Ray is imported only when used)."""
    if spec.name == "sequential":
        from raypfl.runtime.sequential import SequentialRuntime

        return SequentialRuntime(rebuild_model=spec.rebuild_model)
    if spec.name == "mpi":
        from raypfl.runtime.mpi_runtime import MPIRuntime

        return MPIRuntime(spec)
    import ray

    from raypfl.runtime.ray_runtime import RayRuntime

    if spec.warm_start and not spec.address and not ray.is_initialized():  # (a running Ray boots fast)
        from raypfl.runtime.warm import WarmStart

        return WarmStart(RayRuntime(spec))
    return RayRuntime(spec)
