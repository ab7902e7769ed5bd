"""User code that tests/data/test_registries.py names by `_target_`: model factories, dataset functions and
partitioners, good and bad. A module of its own (no pytest, no fixtures), so that a `python -m raypfl`
subprocess imports it as `tests.data.registry_targets` quickly."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from raypfl.data.custom import FederatedArrays

# --- models ----------------------------------------------------------------------------------------------


def linear(in_shape: tuple[int, ...], num_classes: int, bias: bool = True) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), num_classes, bias=bias))


def raising_factory(in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    raise ValueError("no layer fits\nthis input")  # two lines: raypfl's message stays one


def not_a_module(num_classes: int) -> int:
    return num_classes


def five_outputs(in_shape: tuple[int, ...]) -> nn.Module:
    """Ignores num_classes: its logits do not match the dataset's classes."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), 5))


def no_parameters() -> nn.Module:
    return nn.Flatten()


def needs_depth(in_shape: tuple[int, ...], num_classes: int, depth: int) -> nn.Module:
    return linear(in_shape, num_classes)


# --- datasets --------------------------------------------------------------------------------------------


def blobs(
    n: int = 120, test: int = 40, classes: int = 3, features: int = 4, users: int = 4, seed: int = 0
) -> dict[str, np.ndarray]:
    """Gaussian blobs, one per class, and a user id per training sample ("u0".."u{users-1}", interleaved)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 3.0, (classes, features))
    y = rng.integers(0, classes, n + test)
    x = centres[y] + rng.normal(0.0, 1.0, (n + test, features))
    ids = np.array([f"u{i % users}" for i in range(n)])
    return {"train_x": x[:n], "train_y": y[:n], "test_x": x[n:], "test_y": y[n:], "client_ids": ids}


def blobs_as(form: str, **kwargs) -> object:
    """The same blobs in each shape a dataset function may return."""
    d = blobs(**kwargs)
    arrays = (d["train_x"], d["train_y"], d["test_x"], d["test_y"])
    if form == "tuple":
        return arrays
    if form == "dataclass":
        return FederatedArrays(*arrays, client_ids=d["client_ids"], num_classes=3)
    if form == "torch":  # torch Datasets of (x, y, client id) and (x, y) items
        from torch.utils.data import TensorDataset

        codes = np.unique(d["client_ids"], return_inverse=True)[1]
        train = TensorDataset(torch.tensor(d["train_x"]), torch.tensor(d["train_y"]), torch.tensor(codes))
        return train, TensorDataset(torch.tensor(d["test_x"]), torch.tensor(d["test_y"]))
    return d


def blobs_with(problem: str) -> object:
    """Blobs with one thing wrong (for the checks of raypfl.data.custom)."""
    d = blobs()
    if problem == "short_labels":
        d["train_y"] = d["train_y"][:-1]
    elif problem == "test_shape":
        d["test_x"] = np.zeros((40, 5))
    elif problem == "float_labels":
        d["train_y"] = d["train_y"].astype(np.float32)
    elif problem == "label_range":
        return {**d, "num_classes": 2}
    elif problem == "negative_label":
        d["test_y"][3] = -1
    elif problem == "nan_feature":
        d["train_x"][7, 1] = np.nan
    elif problem == "client_ids":
        d["client_ids"] = d["client_ids"][:100]
    elif problem == "three_items":
        return d["train_x"], d["train_y"], d["test_x"]
    elif problem == "missing_key":
        del d["test_y"]
    elif problem == "empty_test":
        d["test_x"], d["test_y"] = d["test_x"][:0], d["test_y"][:0]
    return d


def raising_dataset() -> dict:
    raise ConnectionError("the data server is down")


# --- partitions ------------------------------------------------------------------------------------------


def round_robin(labels: np.ndarray, num_clients: int, seed: int, skip: int = 0) -> list[np.ndarray]:
    """Sample i goes to client i % num_clients; the first `skip` samples to nobody."""
    return [np.arange(skip + c, len(labels), num_clients) for c in range(num_clients)]


def bad_partition(labels: np.ndarray, num_clients: int, seed: int, problem: str = "") -> object:
    parts = round_robin(labels, num_clients, seed)
    if problem == "overlap":
        parts[2] = np.append(parts[2], parts[1][0])
    elif problem == "outside":
        parts[1] = np.append(parts[1], len(labels))
    elif problem == "empty":
        parts[3] = np.array([], dtype=np.int64)
    elif problem == "count":
        parts = parts[:-1]
    elif problem == "floats":
        parts[0] = parts[0].astype(np.float64)
    elif problem == "raise":
        raise IndexError("ran out of samples")
    elif problem == "not_a_list":
        return 7
    return parts


def two_arguments(labels: np.ndarray, num_clients: int) -> list[np.ndarray]:
    return [np.arange(len(labels))]
