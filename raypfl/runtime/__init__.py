"""Runtimes execute rounds: `sequential` (in-process reference), `ray` (client-pool actors), `mpi` (ranks)."""

from __future__ import annotations

from raypfl.config import RuntimeSpec
from raypfl.runtime.base import Evaluation, RoundResult, Runtime

__all__ = ["Evaluation", "RoundResult", "Runtime", "build_runtime"]


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
