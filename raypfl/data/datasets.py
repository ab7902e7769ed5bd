"""Datasets behind one interface: loaded once as normalised numpy arrays, shared by all clients.

`synthetic` is generated, not loaded: see `raypfl.data.synthetic` (its clients make their own data).
A dataset of the user's own (`dataset._target_: package.function`) is converted by `raypfl.data.custom`.

Files are checked before and after torchvision reads them, so that each problem is one line naming
the file: missing (then, if allowed, downloaded), unreadable (permission denied), or corrupt (a
truncated IDX file, a bad header, a label outside the dataset's classes, images and labels that
do not match).
"""

from __future__ import annotations

import math
import os
import socket
import struct
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from raypfl.errors import ConfigError, DataError


class _Source(NamedTuple):
    cls_name: str  # torchvision class
    folder: str  # folder torchvision looks in, under the root
    mean: tuple[float, ...]  # per channel
    std: tuple[float, ...]
    num_classes: int
    sample_shape: tuple[int, ...]  # one image as torchvision holds it: (H, W) or (H, W, C)


_TORCHVISION = {
    "mnist": _Source("MNIST", "MNIST", (0.1307,), (0.3081,), 10, (28, 28)),
    "fashion_mnist": _Source("FashionMNIST", "FashionMNIST", (0.2860,), (0.3530,), 10, (28, 28)),
    "cifar10": _Source(
        "CIFAR10", "cifar-10-batches-py", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 10, (32, 32, 3)
    ),
}
GENERATED = ("synthetic",)  # built by raypfl.data.synthetic from the seed, not by load_dataset
DATASETS = (*_TORCHVISION, *GENERATED)
DOWNLOAD_TIMEOUT_S = 20.0
REASON_CHARS = 200  # a library's error text quoted in ours is shortened to this, at a word boundary
_CIFAR_FILES = {True: [f"data_batch_{i}" for i in range(1, 6)], False: ["test_batch"]}
_REPLACE = "delete it and set dataset.download=true, or copy a good one there"


@dataclass(frozen=True)
class Dataset:
    """Train and test arrays: x float32 (N, *in_shape), e.g. (N, C, H, W) normalised images; y int64 (N,).

    A generated dataset (synthetic) has empty train arrays, shaped (0, *in_shape): its clients generate
    their own training data (the partition's `client_data`).

    `client_ids` (a dataset of the user's own may have them): int64 (N,), the natural client of each
    training sample (its writer, user, device) as 0..K-1, k being the k-th distinct id in sorted order;
    `partition=natural` makes them the federation's clients. None: the data has no natural clients.
    """

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    client_ids: np.ndarray | None = None

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
    """Load a torchvision dataset from `root` (downloading it if allowed), normalised, maybe truncated.

    Raises DataError, one line naming the file, if the data is missing (and cannot be downloaded),
    unreadable or corrupt.
    """
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
    return Dataset(name, train_x, train_y, test_x, test_y, num_classes=_TORCHVISION[name].num_classes)


def _load_split(name: str, root: Path, train: bool, download: bool) -> tuple[np.ndarray, np.ndarray]:
    """One split as (N, C, H, W) normalised float32 images and int64 labels, read by torchvision."""
    import torchvision.datasets as tvd

    src = _TORCHVISION[name]
    cls = getattr(tvd, src.cls_name)
    where = root / src.folder
    files = _expected_files(name, where, train)
    _check_readable(root, files)
    missing = [f for f in files if not f.exists()]
    if missing:
        if not download:
            raise DataError(_missing(name, where, "dataset.download=false", missing, files))
        ds = _download(cls, name, root, where, train, missing, files)
    else:
        if name != "cifar10" and files[0].parent.name == "raw":
            _check_idx_pair(name, *files[:2])
        ds = _read(cls, name, root, where, train, files)
    x = np.asarray(ds.data)
    y = np.asarray(ds.targets, dtype=np.int64)
    _check_arrays(name, where, train, files, x, y)
    x = x[:, None, :, :] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # -> (N, C, H, W)
    x = x.astype(np.float32)
    x /= 255.0  # in place: one float32 copy of the split at a time
    x -= np.asarray(src.mean, np.float32)[None, :, None, None]
    x /= np.asarray(src.std, np.float32)[None, :, None, None]
    return np.ascontiguousarray(x), y


def _expected_files(name: str, where: Path, train: bool) -> list[Path]:
    """The files torchvision wants before it reads a split: this split's first (MNIST family: images, then
    labels), then the other split's, which it checks for too."""
    if name == "cifar10":  # torchvision checks all six batches and the meta file whichever split it loads
        return [where / f for f in (*_CIFAR_FILES[True], *_CIFAR_FILES[False], "batches.meta")]
    legacy = [where / "processed" / f for f in ("training.pt", "test.pt")]
    try:  # torchvision < 0.8 cached both splits here; torchvision still reads them first
        if all(p.is_file() for p in legacy):
            return legacy if train else legacy[::-1]
    except OSError:
        pass
    splits = ("train", "t10k") if train else ("t10k", "train")
    return [
        where / "raw" / f"{split}-{kind}"
        for split in splits
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")
    ]


def _check_readable(root: Path, files: list[Path]) -> None:
    """Every folder from `root` down, and every file that exists, can be read (folders: listed and entered).

    Only what exists is checked: a missing file is for the caller to report (or download).
    """
    checked: set[Path] = set()
    for file in files:
        chain = [p for p in reversed(file.parents) if p == root or root in p.parents] + [file]
        for path in chain:
            if path in checked:
                continue
            checked.add(path)
            try:
                is_dir = path.is_dir()
                exists = is_dir or path.exists()
            except PermissionError:
                raise DataError(_denied(path.parent)) from None
            if not exists:
                break
            if path == file and is_dir:
                raise DataError(f"{path} is a folder, expected a data file: {_REPLACE}")
            if not os.access(path, os.R_OK | os.X_OK if is_dir else os.R_OK):
                raise DataError(_denied(path))


def _denied(path: Path | str) -> str:
    return f"permission denied on {path}: raypfl cannot read it (fix with chmod u+rX, or its owner)"


def _corrupt(path: Path | str, what: str) -> DataError:
    return DataError(f"corrupt file {path}: {what}; {_REPLACE}")


def _check_idx_pair(name: str, images: Path, labels: Path) -> None:
    """IDX headers (the MNIST family's raw format) agree with the file sizes and with each other."""
    n_images = _check_idx(images, _TORCHVISION[name].sample_shape, "images")
    n_labels = _check_idx(labels, (), "labels")
    if n_images != n_labels:
        raise _corrupt(labels, f"it holds {n_labels} labels but {images.name} holds {n_images} images")


def _check_idx(path: Path, item_shape: tuple[int, ...], items: str) -> int:
    """The number of items an IDX file of unsigned bytes holds, after checking its header and size."""
    ndim = 1 + len(item_shape)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(4 + 4 * ndim)
    except PermissionError:
        raise DataError(_denied(path)) from None
    if len(head) < 4 + 4 * ndim:
        raise _corrupt(path, f"{size} bytes, too short for the header of an IDX file of {items}")
    if head[:3] != b"\x00\x00\x08" or head[3] != ndim:
        header = f"header starts {head[:4].hex()}, expected 000008{ndim:02x}"
        raise _corrupt(path, f"not an IDX file of {items} ({header})")
    dims = struct.unpack(f">{ndim}I", head[4:])
    if dims[1:] != item_shape:
        shape = "x".join(map(str, dims[1:]))
        raise _corrupt(path, f"its header says {items} of {shape}, expected {'x'.join(map(str, item_shape))}")
    expected = len(head) + math.prod(dims)
    if size != expected:
        cut = "truncated: " if size < expected else ""
        raise _corrupt(path, f"{cut}{size} bytes, but its header says {dims[0]} {items} ({expected} bytes)")
    return dims[0]


def _read(cls, name: str, root: Path, where: Path, train: bool, files: list[Path]):
    """torchvision reads files that are all there: whatever goes wrong is a permission or a corrupt file."""
    try:
        return cls(str(root), train=train, download=False)
    except MemoryError:
        raise
    except PermissionError as exc:
        raise DataError(_denied(exc.filename or where)) from None
    except Exception as exc:  # torchvision raises RuntimeError, AssertionError, ValueError, pickle errors...
        if name == "cifar10":
            _diagnose_cifar(files)
        raise DataError(f"cannot read {name} from {where}: {_reason(exc)}") from None


def _diagnose_cifar(files: list[Path]) -> None:
    """Name the CIFAR-10 file that torchvision refused: a checksum that differs, or content it cannot use."""
    import pickle

    import torchvision.datasets.cifar as tv_cifar

    checksums = dict(tv_cifar.CIFAR10.train_list + tv_cifar.CIFAR10.test_list)
    checksums["batches.meta"] = tv_cifar.CIFAR10.meta["md5"]
    for path in files:
        if not tv_cifar.check_integrity(str(path), checksums[path.name]):
            raise _corrupt(path, "its MD5 checksum is not the published one")
    for path in files:
        try:
            with path.open("rb") as f:
                entry = pickle.load(f, encoding="latin1")
            if path.name == "batches.meta":
                entry["label_names"]
                continue
            data, labels = np.asarray(entry["data"]), entry["labels"]
        except Exception as exc:
            raise _corrupt(path, f"not a CIFAR-10 pickle ({_reason(exc)})") from None
        if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
            found = f"data shaped {data.shape} with {len(labels)} labels"
            raise _corrupt(path, f"{found}, expected (N, 3072) with N labels")


def _check_arrays(
    name: str, where: Path, train: bool, files: list[Path], x: np.ndarray, y: np.ndarray
) -> None:
    """What torchvision returned: one label per image, images of the right shape, labels among the classes."""
    src = _TORCHVISION[name]
    split = "train" if train else "test"
    labels = _labels_file(name, where, files)
    if x.ndim != 1 + len(src.sample_shape) or x.shape[1:] != src.sample_shape:
        raise _corrupt(files[0], f"{split} images shaped {x.shape[1:]}, expected {src.sample_shape}")
    if len(x) != len(y) or len(y) == 0:
        raise _corrupt(labels, f"{len(y)} {split} labels for {len(x)} images")
    bad = np.flatnonzero((y < 0) | (y >= src.num_classes))
    if len(bad):
        i = int(bad[0])
        if name == "cifar10":
            labels = _cifar_file_of(where, train, i)
        raise _corrupt(
            labels,
            f"label {int(y[i])} (at {split} index {i}; {len(bad)} such) is not one of {name}'s "
            f"{src.num_classes} classes 0..{src.num_classes - 1}",
        )


def _labels_file(name: str, where: Path, files: list[Path]) -> Path:
    """Where the labels of the split come from: CIFAR-10 batches hold both, so its folder."""
    if name == "cifar10":
        return where
    return files[1] if files[0].parent.name == "raw" else files[0]  # raw: images, labels; legacy: one file


def _cifar_file_of(where: Path, train: bool, index: int) -> Path:
    """The CIFAR-10 batch file that holds item `index` of the split."""
    import pickle

    start = 0
    for file in _CIFAR_FILES[train]:
        with (where / file).open("rb") as f:
            start += len(pickle.load(f, encoding="latin1")["labels"])
        if index < start:
            return where / file
    return where


def _download(cls, name: str, root: Path, where: Path, train: bool, missing: list[Path], files: list[Path]):
    """Let torchvision download, with a socket timeout so that a closed network fails instead of hanging."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return cls(str(root), train=train, download=True)
    except MemoryError:
        raise
    except PermissionError as exc:
        where_denied = exc.filename or where
        raise DataError(
            _missing(name, where, f"cannot download it: permission denied on {where_denied}", missing, files)
        ) from None
    except Exception as exc:  # torchvision raises several kinds (URLError, RuntimeError, OSError)
        raise DataError(_missing(name, where, f"download failed: {_reason(exc)}", missing, files)) from None
    finally:
        socket.setdefaulttimeout(previous)


def _reason(exc: BaseException) -> str:
    """An exception as one line of at most REASON_CHARS characters, cut between words."""
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return textwrap.shorten(text, REASON_CHARS, placeholder=" ...")


def _missing(name: str, where: Path, why: str, missing: list[Path] = (), files: list[Path] = ()) -> str:
    if missing and len(missing) < len(files):
        why = f"missing {', '.join(p.name for p in missing)}; {why}"
    gz = [p.name for p in missing if p.with_name(p.name + ".gz").is_file()]
    if gz:
        why += f"; gunzip {', '.join(f'{g}.gz' for g in gz)}"
    return (
        f"{name} not found in {where} ({why}); put the raw files there, "
        f"or set dataset.root=PATH or RAYPFL_DATA=PATH to a folder that holds {where.name}/"
    )
