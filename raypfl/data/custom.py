"""Datasets of the user's own: `dataset._target_: package.function`, its keyword arguments the other keys of
`dataset.*`.

The function returns one of:

- `(train_x, train_y, test_x, test_y)`: arrays (numpy, torch tensors, or anything `np.asarray` takes);
- `(train, test)`: two torch-style datasets (`len` and `[i]`) of `(x, y)` pairs, read once into arrays; the
  training set's items may be `(x, y, client_id)` triples;
- a dict, or a `FederatedArrays`, with `train_x`, `train_y`, `test_x`, `test_y` and optionally `client_ids`
  (one per training sample: its writer, user, device; ints or strings) and `num_classes`.

It becomes raypfl's `Dataset`: x float32 shaped (N, *in_shape) (used as given: normalise in the function),
y int64 class indices, `num_classes` as returned or else the largest label + 1, and the client ids as
0..K-1 in sorted order of the distinct ids (for `partition=natural`). Everything is checked first, each
problem one ConfigError line naming `dataset._target_`: as many labels as samples, the same feature shape
in train and test, integer labels in [0, num_classes), finite features, one client id per training sample.

`dataset.name` is only a label here. `dataset.train_limit` / `test_limit` keep the first N samples of a
split (and their client ids). `dataset.root` and `dataset.download` (keys of the default group) are passed
to the function if its signature names them, and are ignored otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

import numpy as np

from raypfl.data.datasets import Dataset
from raypfl.data.registry import accepts, check_arguments, locate, node_dict, reason
from raypfl.errors import ConfigError, RaypflError

__all__ = ["FederatedArrays", "check_dataset_target", "load_custom_dataset", "to_dataset"]

#: Keys of `dataset.*` that raypfl reads itself (never passed to the function).
RAYPFL_KEYS = ("name", "_target_", "train_limit", "test_limit")
#: Keys of the shipped groups (conf/dataset/mnist.yaml): passed if the function names them, else ignored.
GROUP_KEYS = ("root", "download")
_ARRAYS = ("train_x", "train_y", "test_x", "test_y")


@dataclass
class FederatedArrays:
    """What a dataset function may return: the two splits as arrays, and optionally each training sample's
    natural client (`client_ids`) and the number of classes (default: the largest label + 1)."""

    train_x: Any
    train_y: Any
    test_x: Any
    test_y: Any
    client_ids: Any = None
    num_classes: int | None = None


def _call(node: Any) -> tuple[str, Callable[..., Any], dict[str, Any], tuple[Any, Any]]:
    """(`dataset._target_=...`, for messages; the function; its keyword arguments; the two limits)."""
    from raypfl.config import LoadedDatasetSpec, check_value

    data = node_dict(node)
    target = data.pop("_target_")
    fn = locate("dataset._target_", target)
    key = f"dataset._target_={target}"
    data.pop("name", None)
    limits = (data.pop("train_limit", None), data.pop("test_limit", None))
    for name, value in zip(("train_limit", "test_limit"), limits):
        check_value(LoadedDatasetSpec, name, value, f"dataset.{name}")
    for name in GROUP_KEYS:
        if name in data and not accepts(fn, name):
            del data[name]
    check_arguments(fn, data, "dataset", key)
    return key, fn, data, limits


def check_dataset_target(node: Any) -> None:
    """`dataset.*` with a `_target_`: it imports, is callable and takes the keys given (nothing is loaded)."""
    _call(node)


def load_custom_dataset(node: Any) -> Dataset:
    """Call `dataset._target_` with its keyword arguments and convert what it returns (checked)."""
    key, fn, kwargs, (train_limit, test_limit) = _call(node)
    try:
        result = fn(**kwargs)
    except RaypflError:  # already one line naming what to change (e.g. a DataError from load_dataset)
        raise
    except Exception as exc:
        raise ConfigError(f"{key}: it raised {reason(exc)}") from None
    return to_dataset(result, key, train_limit, test_limit, name=str(node_dict(node)["_target_"]))


def to_dataset(
    result: Any,
    key: str = "dataset._target_",
    train_limit: int | None = None,
    test_limit: int | None = None,
    name: str = "custom",
) -> Dataset:
    """raypfl's `Dataset` from what a dataset function returned; ConfigError (one line, starting with `key`)
    on anything that does not fit."""
    parts = _parts(result, key, train_limit, test_limit)
    train_x, test_x = (_features(parts[f"{s}_x"], s, key) for s in ("train", "test"))
    train_y, test_y = (_labels(parts[f"{s}_y"], s, key) for s in ("train", "test"))
    for split, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        if len(x) != len(y):
            raise ConfigError(f"{key}: {split}_x has {len(x)} samples but {split}_y has {len(y)} labels")
        if not len(x):
            raise ConfigError(f"{key}: the {split} set is empty")
    if train_x.shape[1:] != test_x.shape[1:]:
        raise ConfigError(
            f"{key}: train samples are shaped {train_x.shape[1:]} but test samples {test_x.shape[1:]}"
        )
    num_classes = _num_classes(parts.get("num_classes"), train_y, test_y, key)
    for split, x in (("train", train_x), ("test", test_x)):
        finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise ConfigError(
                f"{key}: {split}_x has NaN/Inf features (at {split} index {int(bad[0])}; {len(bad)} such)"
            )
    client_ids = _client_ids(parts.get("client_ids"), len(train_y), key)
    if train_limit:
        train_x, train_y = train_x[:train_limit], train_y[:train_limit]
        client_ids = None if client_ids is None else client_ids[:train_limit]
    if test_limit:
        test_x, test_y = test_x[:test_limit], test_y[:test_limit]
    if client_ids is not None:  # 0..K-1 in sorted order of the distinct ids that are left
        client_ids = np.unique(client_ids, return_inverse=True)[1].reshape(-1).astype(np.int64)
    return Dataset(
        name,
        np.ascontiguousarray(train_x),
        np.ascontiguousarray(train_y),
        np.ascontiguousarray(test_x),
        np.ascontiguousarray(test_y),
        num_classes=num_classes,
        client_ids=client_ids,
    )


def _parts(result: Any, key: str, train_limit: int | None, test_limit: int | None) -> dict[str, Any]:
    """What the function returned, as a dict: train_x, train_y, test_x, test_y[, client_ids, num_classes]."""
    expected = (
        "expected (train_x, train_y, test_x, test_y), (train, test) datasets of (x, y) pairs, or a dict or "
        "FederatedArrays with train_x, train_y, test_x, test_y[, client_ids, num_classes]"
    )
    if is_dataclass(result) and not isinstance(result, type):
        result = {f.name: getattr(result, f.name) for f in fields(result)}
    if isinstance(result, Mapping):
        allowed = (*_ARRAYS, "client_ids", "num_classes")
        unknown = [str(k) for k in result if k not in allowed]
        missing = [k for k in _ARRAYS if k not in result]
        if unknown or missing:
            what = f"no {missing[0]!r}" if missing else f"an unknown key {unknown[0]!r}"
            raise ConfigError(f"{key} returned a dict with {what}; {expected}")
        return dict(result)
    if isinstance(result, (tuple, list)) and len(result) == 4:
        return dict(zip(_ARRAYS, result))
    if isinstance(result, (tuple, list)) and len(result) == 2:
        train_x, train_y, client_ids = _materialise(result[0], "train", key, train_limit)
        test_x, test_y, _ = _materialise(result[1], "test", key, test_limit)
        return {
            "train_x": train_x,
            "train_y": train_y,
            "test_x": test_x,
            "test_y": test_y,
            "client_ids": client_ids,
        }
    what = f"a {type(result).__name__}"
    if isinstance(result, (tuple, list)):
        what += f" of {len(result)} items"
    raise ConfigError(f"{key} returned {what}; {expected}")


def _numpy(value: Any) -> np.ndarray:
    """A numpy array of a torch tensor (detached, on the CPU) or of anything `np.asarray` takes."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _materialise(
    data: Any, split: str, key: str, limit: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A torch-style dataset (len, [i]) of (x, y) pairs (training set: or (x, y, client_id)) read into arrays
    once; only the first `limit` items if given."""
    pair = "(x, y) pairs" + (" or (x, y, client_id) triples" if split == "train" else "")
    try:
        n = len(data)
    except TypeError:
        what = type(data).__name__
        raise ConfigError(f"{key}: its {split} set is a {what}, not a dataset of {pair}") from None
    n = min(n, limit) if limit else n
    xs, ys, ids = [], [], []
    width = None  # 2 or 3 fields, the same for every item
    for i in range(n):
        try:
            item = data[i]
        except Exception as exc:
            raise ConfigError(f"{key}: reading {split} item {i} failed ({reason(exc)})") from None
        sizes = (2, 3) if split == "train" else (2,)
        if not isinstance(item, (tuple, list)) or len(item) not in sizes:
            raise ConfigError(f"{key}: {split} item {i} is a {type(item).__name__}; expected {pair}")
        width = width or len(item)
        if len(item) != width:
            raise ConfigError(f"{key}: {split} item {i} has {len(item)} fields but item 0 has {width}")
        xs.append(_numpy(item[0]))
        ys.append(_scalar(item[1]))
        if width == 3:
            ids.append(_scalar(item[2]))
    if not xs:
        return np.zeros((0, 1), np.float32), np.zeros(0, np.int64), None
    for i, x in enumerate(xs):
        if x.shape != xs[0].shape:
            raise ConfigError(f"{key}: {split} item {i}'s x is shaped {x.shape} but item 0's {xs[0].shape}")
    return np.stack(xs), np.asarray(ys), (np.asarray(ids) if ids else None)


def _scalar(value: Any) -> Any:
    """A one-element value (a python int, a 0-d or 1-element tensor) as a numpy scalar; else an array."""
    arr = _numpy(value)
    return arr.reshape(-1)[0] if arr.size == 1 else arr


def _features(x: Any, split: str, key: str) -> np.ndarray:
    try:
        arr = _numpy(x)
    except Exception as exc:
        raise ConfigError(f"{key}: {split}_x is not an array ({reason(exc)})") from None
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ConfigError(f"{key}: {split}_x has dtype {arr.dtype}; expected numbers")
    if arr.ndim < 2:
        raise ConfigError(f"{key}: {split}_x is shaped {arr.shape}; expected (samples, *features)")
    return arr.astype(np.float32, copy=False)


def _labels(y: Any, split: str, key: str) -> np.ndarray:
    try:
        arr = _numpy(y)
    except Exception as exc:
        raise ConfigError(f"{key}: {split}_y is not an array ({reason(exc)})") from None
    if arr.ndim != 1:
        raise ConfigError(f"{key}: {split}_y is shaped {arr.shape}; expected (samples,) class indices")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError(f"{key}: {split}_y has dtype {arr.dtype}; expected integer class indices 0..C-1")
    return arr.astype(np.int64, copy=False)


def _num_classes(given: Any, train_y: np.ndarray, test_y: np.ndarray, key: str) -> int:
    """`num_classes` as returned (checked against the labels), else the largest label + 1."""
    for split, y in (("train", train_y), ("test", test_y)):
        negative = np.flatnonzero(y < 0)
        if len(negative):
            i = int(negative[0])
            raise ConfigError(
                f"{key}: label {int(y[i])} (at {split} index {i}; {len(negative)} such) is negative; labels "
                "are class indices 0..num_classes-1"
            )
    if given is None:
        return int(max(train_y.max(), test_y.max())) + 1
    if isinstance(given, bool) or not isinstance(given, (int, np.integer)) or given < 1:
        raise ConfigError(f"{key}: it returned num_classes={given!r}; expected an integer >= 1")
    for split, y in (("train", train_y), ("test", test_y)):
        outside = np.flatnonzero(y >= given)
        if len(outside):
            i = int(outside[0])
            raise ConfigError(
                f"{key}: label {int(y[i])} (at {split} index {i}; {len(outside)} such) is outside "
                f"0..{int(given) - 1} (num_classes={int(given)})"
            )
    return int(given)


def _client_ids(ids: Any, n: int, key: str) -> np.ndarray | None:
    """One natural client id per training sample (ints or strings), or None."""
    if ids is None:
        return None
    arr = _numpy(ids)
    if arr.ndim != 1 or len(arr) != n:
        raise ConfigError(
            f"{key}: client_ids is shaped {arr.shape} but the training set has {n} samples; expected one "
            "client id per training sample"
        )
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ConfigError(f"{key}: client_ids holds NaN/Inf")
    try:
        np.unique(arr)
    except TypeError as exc:
        why = reason(exc)
        raise ConfigError(f"{key}: client_ids cannot be sorted ({why}); use ints or strings") from None
    return arr
