"""Datasets behind one interface: loaded once as normalised numpy arrays, shared by all clients.

`synthetic` is generated, not loaded: see `raypfl.data.synthetic` (its clients make their own data).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raypfl.errors import ConfigError, DataError

# name -> (torchvision class name, folder torchvision looks in, per-channel mean, per-channel std)
_TORCHVISION = {
    "mnist": ("MNIST", "MNIST", (0.1307,), (0.3081,)),
    "fashion_mnist": ("FashionMNIST", "FashionMNIST", (0.2860,), (0.3530,)),
    "cifar10": ("CIFAR10", "cifar-10-batches-py", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
GENERATED = ("synthetic",)  # built by raypfl.data.synthetic from the seed, not by load_dataset
DATASETS = (*_TORCHVISION, *GENERATED)
DOWNLOAD_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class Dataset:
    """Train and test arrays: x float32 (N, *in_shape), e.g. (N, C, H, W) normalised images; y int64 (N,).

    A generated dataset (synthetic) has empty train arrays, shaped (0, *in_shape): its clients generate
    their own training data (the partition's `client_data`).
    """

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])


def default_root() -> str:
    """`$RAYPFL_DATA` if set, else `./data`."""
    return os.environ.get("RAYPFL_DATA") or "./data"


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    download: bool = True,
    train_limit: int | None = None,
    test_limit: int | None = None,
) -> Dataset:
    """Load a torchvision dataset from `root` (downloading it if allowed), normalised, maybe truncated."""
    if name in GENERATED:
        raise ConfigError(f"dataset={name} is generated from the seed: use raypfl.data.synthetic")
    if name not in _TORCHVISION:
        raise ConfigError(f"unknown dataset={name} (choose from: {', '.join(DATASETS)})")
    root_path = Path(root or default_root()).expanduser().resolve()
    train_x, train_y = _load_split(name, root_path, train=True, download=download)
    test_x, test_y = _load_split(name, root_path, train=False, download=download)
    if train_limit:
        train_x, train_y = train_x[:train_limit], train_y[:train_limit]
    if test_limit:
        test_x, test_y = test_x[:test_limit], test_y[:test_limit]
    return Dataset(name, train_x, train_y, test_x, test_y, num_classes=int(train_y.max()) + 1)


def _load_split(name: str, root: Path, train: bool, download: bool) -> tuple[np.ndarray, np.ndarray]:
    import torchvision.datasets as tvd

    cls_name, folder, mean, std = _TORCHVISION[name]
    cls = getattr(tvd, cls_name)
    where = root / folder
    try:
        ds = cls(str(root), train=train, download=False)
    except RuntimeError:
        if not download:
            raise DataError(_missing(name, where, "dataset.download=false")) from None
        ds = _download(cls, name, root, where, train)
    x = np.asarray(ds.data)
    y = np.asarray(ds.targets, dtype=np.int64)
    x = x[:, None, :, :] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # -> (N, C, H, W)
    x = x.astype(np.float32) / 255.0
    x -= np.asarray(mean, np.float32)[None, :, None, None]
    x /= np.asarray(std, np.float32)[None, :, None, None]
    return np.ascontiguousarray(x), y


def _download(cls, name: str, root: Path, where: Path, train: bool):
    """Let torchvision download, with a socket timeout so that a closed network fails instead of hanging."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return cls(str(root), train=train, download=True)
    except Exception as exc:  # torchvision raises several kinds (URLError, RuntimeError, OSError)
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(_missing(name, where, f"download failed: {reason[:200]}")) from None
    finally:
        socket.setdefaulttimeout(previous)


def _missing(name: str, where: Path, why: str) -> str:
    return (
        f"{name} not found in {where} ({why}); put the raw files there, "
        f"or set dataset.root=PATH or RAYPFL_DATA=PATH to a folder that holds {where.name}/"
    )
