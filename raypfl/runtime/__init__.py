"""Runtimes execute rounds: `sequential` (in-process reference) and `ray` (client-pool actors)."""

from __future__ import annotations

from raypfl.config import RuntimeSpec
from raypfl.runtime.base import Evaluation, RoundResult, Runtime

__all__ = ["Evaluation", "RoundResult", "Runtime", "build_runtime"]


def build_runtime(spec: RuntimeSpec) -> Runtime:
    """The runtime named by `runtime.name` (Ray is imported only when used)."""
    if spec.name == "sequential":
        from raypfl.runtime.sequential import SequentialRuntime

        return SequentialRuntime()
    from raypfl.runtime.ray_runtime import RayRuntime

    return RayRuntime(spec)
