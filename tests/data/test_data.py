"""Datasets load once, normalised; root from config or RAYPFL_DATA; missing, unreadable or corrupt data is a
one-line error naming the file."""

from __future__ import annotations

import builtins
import os

import numpy as np
import pytest

from raypfl.data import datasets
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


def _tiny_mnist(root, n_train: int = 30, n_test: int = 12):
    """A valid MNIST folder of a few images (fast); returns its raw/ folder."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    gen = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(raw / f"{split}-images-idx3-ubyte", gen.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _write_idx(raw / f"{split}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))
    return raw


def _one_line_error(root, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load_dataset("mnist", root, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_tiny_mnist_loads_with_ten_classes(tmp_path):
    _tiny_mnist(tmp_path, n_train=5)  # labels 0..4 only: the model still has MNIST's 10 outputs
    ds = load_dataset("mnist", tmp_path, download=False)
    assert ds.train_x.shape == (5, 1, 28, 28) and ds.num_classes == 10


def test_truncated_image_file_is_corrupt_not_missing(tmp_path):
    images = _tiny_mnist(tmp_path) / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[: images.stat().st_size // 2])
    message = _one_line_error(tmp_path, download=True)  # files present: nothing to download
    assert message.startswith(f"corrupt file {images}: truncated: ")
    assert "not found" not in message and "download failed" not in message


def test_random_label_bytes_are_corrupt_not_an_assertion(tmp_path):
    labels = _tiny_mnist(tmp_path) / "train-labels-idx1-ubyte"
    labels.write_bytes(np.random.default_rng(1).integers(0, 256, 38, dtype=np.uint8).tobytes())
    message = _one_line_error(tmp_path, download=False)
    assert message.startswith(f"corrupt file {labels}: not an IDX file of labels")


def test_label_outside_the_classes_is_corrupt(tmp_path):
    labels = _tiny_mnist(tmp_path) / "train-labels-idx1-ubyte"
    data = bytearray(labels.read_bytes())
    data[8 + 17] = 200  # header: 4-byte magic + 4-byte count
    labels.write_bytes(bytes(data))
    message = _one_line_error(tmp_path, download=False)
    assert message.startswith(f"corrupt file {labels}: label 200 (at train index 17; 1 such)")
    assert "10 classes" in message


def test_label_count_must_match_the_images(tmp_path):
    raw = _tiny_mnist(tmp_path)
    _write_idx(raw / "t10k-labels-idx1-ubyte", np.zeros(11, np.uint8))
    message = _one_line_error(tmp_path, download=False)
    assert message.startswith(f"corrupt file {raw / 't10k-labels-idx1-ubyte'}: it holds 11 labels")
    assert "t10k-images-idx3-ubyte holds 12 images" in message


def test_unreadable_folder_is_permission_denied(tmp_path, monkeypatch):
    """chmod 000 on raw/ as seen by a non-root user (root can read anything, so os.access is faked)."""
    raw = _tiny_mnist(tmp_path)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(raw) and real_access(path, mode))
    message = _one_line_error(tmp_path, download=True)
    assert message.startswith(f"permission denied on {raw}: ")
    assert "not found" not in message and "download" not in message


def test_file_that_cannot_be_opened_is_permission_denied(tmp_path, monkeypatch):
    """os.access may say yes (root, ACLs, network file systems) and open() still refuse."""
    labels = _tiny_mnist(tmp_path) / "train-labels-idx1-ubyte"
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):
        if str(file) == str(labels):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    assert _one_line_error(tmp_path, download=True).startswith(f"permission denied on {labels}: ")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_chmod_000_folder_is_permission_denied(tmp_path):
    raw = _tiny_mnist(tmp_path)
    raw.chmod(0)
    try:
        assert _one_line_error(tmp_path, download=True).startswith(f"permission denied on {raw}: ")
    finally:
        raw.chmod(0o755)


def test_folder_in_place_of_a_file(tmp_path):
    images = _tiny_mnist(tmp_path) / "t10k-images-idx3-ubyte"
    images.unlink()
    images.mkdir()
    assert _one_line_error(tmp_path, download=True).startswith(f"{images} is a folder, expected a data file")


def test_partly_missing_names_the_missing_file(tmp_path):
    raw = _tiny_mnist(tmp_path)
    (raw / "train-labels-idx1-ubyte").unlink()
    message = _one_line_error(tmp_path, download=False)
    assert message.startswith(f"mnist not found in {tmp_path}/MNIST (missing train-labels-idx1-ubyte; ")


def test_download_failure_is_cut_between_words(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    class Offline:
        def __init__(self, root, train=True, download=False):
            raise RuntimeError("Dataset not found" if not download else "mirror unreachable " * 30)

    monkeypatch.setattr(tvd, "MNIST", Offline)
    message = _one_line_error(tmp_path, download=True)
    assert f"mnist not found in {tmp_path}/MNIST (download failed: RuntimeError: mirror" in message
    reason = message.split("download failed: ")[1].split(")")[0]
    assert len(reason) <= datasets.REASON_CHARS and reason.endswith(" ...")
    assert reason[: -len(" ...")].split()[-1] in ("mirror", "unreachable")


def _fake_cifar(root, labels_of=lambda name, n: list(np.arange(n) % 10)):
    import pickle

    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    gen = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with (folder / name).open("wb") as f:
            data = gen.integers(0, 256, (10, 3072), dtype=np.uint8)
            pickle.dump({"data": data, "labels": labels_of(name, 10)}, f)
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    return folder


def test_cifar10_checksum_mismatch_names_the_file(tmp_path):
    folder = _fake_cifar(tmp_path)  # not the published files: the first batch fails its MD5
    with pytest.raises(DataError, match=f"^corrupt file {folder}/data_batch_1: its MD5 checksum"):
        load_dataset("cifar10", tmp_path, download=True)


def test_cifar10_label_outside_the_classes_names_the_batch(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    def labels_of(name, n):
        return [12 if name == "data_batch_3" and i == 4 else i % 10 for i in range(n)]

    folder = _fake_cifar(tmp_path, labels_of)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args: True)  # fake files, no published checksums
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", tmp_path, download=False)
    assert str(info.value).startswith(f"corrupt file {folder}/data_batch_3: label 12 (at train index 24; ")
