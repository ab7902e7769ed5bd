"""A model's weights as one flat float32 vector: what clients, servers and runtimes exchange."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    """Parameters and floating-point buffers, in state_dict order."""
    return [t for t in model.state_dict(keep_vars=True).values() if t.is_floating_point()]


def flat_names(model: nn.Module) -> list[str]:
    """The state_dict names of the tensors in a flat vector, in its order."""
    return [k for k, t in model.state_dict(keep_vars=True).items() if t.is_floating_point()]


def shared_tensor(array: np.ndarray) -> torch.Tensor:
    """Wrap a (possibly read-only, shared-memory) array without copying it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Ray's zero-copy arrays are read-only; we never write
        return torch.from_numpy(array)


def get_flat(model: nn.Module) -> np.ndarray:
    """Copy the model's weights into a new flat float32 numpy vector."""
    with torch.no_grad():
        return (
            torch.cat([t.detach().reshape(-1) for t in _tensors(model)])
            .cpu()
            .numpy()
            .astype(np.float32, copy=False)
        )


def set_flat(model: nn.Module, flat: np.ndarray | torch.Tensor) -> None:
    """Load a flat vector (as produced by `get_flat`) into the model in place."""
    vec = flat if isinstance(flat, torch.Tensor) else shared_tensor(np.asarray(flat, dtype=np.float32))
    offset = 0
    with torch.no_grad():
        for t in _tensors(model):
            n = t.numel()
            t.copy_(vec[offset : offset + n].view_as(t))
            offset += n
    if offset != vec.numel():
        raise ValueError(f"weight vector has {vec.numel()} values, model needs {offset}")


def parameter_views(model: nn.Module, flat: torch.Tensor) -> list[torch.Tensor]:
    """Views of `flat` (laid out as `get_flat` lays out `model`) shaped as `model.parameters()`, in order.

    Buffers (e.g. BatchNorm statistics) have a place in the flat vector but no gradient: they are skipped.
    """
    offsets: dict[str, tuple[int, torch.Size]] = {}
    offset = 0
    for name, t in model.state_dict(keep_vars=True).items():
        if t.is_floating_point():
            offsets[name] = (offset, t.shape)
            offset += t.numel()
    if offset != flat.numel():
        raise ValueError(f"vector has {flat.numel()} values, model needs {offset}")
    views = []
    for name, _ in model.named_parameters():
        start, shape = offsets[name]
        views.append(flat[start : start + shape.numel()].view(shape))
    return views
