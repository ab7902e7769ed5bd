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
