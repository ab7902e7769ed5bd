"""The round-0 global model (from the root seed) and the saved final model (`model.pt`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from raypfl import seeding
from raypfl.data.datasets import Dataset
from raypfl.jobs import interrupts
from raypfl.models.weights import get_flat, set_flat
from raypfl.models.zoo import ModelSpec, build_model


def initial_weights(model: ModelSpec | str, dataset: Dataset, seed: int) -> np.ndarray:
    """The round-0 global model (a shipped name or a `ModelSpec`), initialised from the root seed."""
    torch.manual_seed(seeding.derive_seed(seed, seeding.INIT))
    return get_flat(build_model(model, dataset.in_shape, dataset.num_classes))


def save_model(path: Path, model: ModelSpec | str, dataset: Dataset, weights: np.ndarray) -> None:
    """Save the global model as a state_dict (load with `build_model(model)` + `load_state_dict`, `model`
    being the name, the `ModelSpec` or the run's `model` config node).

    Written to a temporary name and renamed, so an interrupted save never leaves a truncated model.pt.
    """
    built = build_model(model, dataset.in_shape, dataset.num_classes)
    set_flat(built, weights)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with interrupts.deferred():
        torch.save(built.state_dict(), tmp)
        os.replace(tmp, path)
