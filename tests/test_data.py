"""Datasets load once, normalised; root from config or RAYPFL_DATA; missing data is a clear error."""

from __future__ import annotations

import numpy as np
import pytest

from raypfl.data.datasets import default_root, load_dataset
from raypfl.errors import DataError
from tests.conftest import make_config


def test_mnist_loads_normalised_with_limits(data_root):
    ds = load_dataset("mnist", data_root, download=False, train_limit=1000, test_limit=200)
    assert ds.train_x.shape == (1000, 1, 28, 28) and ds.train_x.dtype == np.float32
    assert ds.test_x.shape == (200, 1, 28, 28) and ds.train_y.dtype == np.int64
    assert ds.in_shape == (1, 28, 28) and ds.num_classes == 10
    assert abs(float(ds.train_x.mean())) < 0.2 and 0.8 < float(ds.train_x.std()) < 1.2
    assert set(np.unique(ds.train_y)) == set(range(10))


def test_full_mnist_sizes(data_root):
    ds = load_dataset("mnist", data_root, download=False)
    assert len(ds.train_y) == 60000 and len(ds.test_y) == 10000


def test_missing_root_without_download_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=f"mnist not found in {tmp_path}/MNIST .*RAYPFL_DATA"):
        load_dataset("mnist", tmp_path, download=False)


def test_root_defaults_to_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RAYPFL_DATA", str(tmp_path))
    assert default_root() == str(tmp_path)
    assert make_config().dataset.root == str(tmp_path)
    monkeypatch.delenv("RAYPFL_DATA")
    assert default_root() == "./data"
    assert make_config().dataset.root == "./data"
    assert make_config("dataset.root=/elsewhere").dataset.root == "/elsewhere"


def _write_idx(path, array: np.ndarray) -> None:
    """Write an IDX file (the MNIST family's raw format)."""
    dtype_code = {np.uint8: 0x08}[array.dtype.type]
    header = bytes([0, 0, dtype_code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.tobytes())


def test_fashion_mnist_loads_through_the_same_interface(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    gen = np.random.default_rng(0)
    for split, n in (("train", 30), ("t10k", 12)):
        _write_idx(raw / f"{split}-images-idx3-ubyte", gen.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _write_idx(raw / f"{split}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))
    ds = load_dataset("fashion_mnist", tmp_path, download=False)
    assert ds.train_x.shape == (30, 1, 28, 28) and ds.test_x.shape == (12, 1, 28, 28)
    assert ds.num_classes == 10 and ds.train_y[:3].tolist() == [0, 1, 2]


def test_cifar10_loads_channels_first(tmp_path, monkeypatch):
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    gen = np.random.default_rng(0)

    def batch(n: int) -> dict:
        return {"data": gen.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(np.arange(n) % 10)}

    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with (folder / name).open("wb") as f:
            pickle.dump(batch(10), f)
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args: True)  # fake files, no published checksums
    ds = load_dataset("cifar10", tmp_path, download=False)
    assert ds.train_x.shape == (50, 3, 32, 32) and ds.test_x.shape == (10, 3, 32, 32)
    assert ds.in_shape == (3, 32, 32)
