"""Checkpoints: everything needed to continue a run from its last complete round, written atomically.

The file is written to a temporary name beside the target, flushed and fsynced, then renamed over the
old checkpoint (`os.replace` is atomic on POSIX), so a crash mid-write leaves the last good one intact.

Format 2 (`checkpoint.pt`) is a `torch.save` zip file of `{"format": 2, "state": ...}` that holds only
tensors and plain containers and values (dict, OrderedDict, list, tuple, set, str, bytes, int, float,
complex, bool, None), read back with `torch.load(weights_only=True)`: loading one cannot run code,
whoever wrote it. Other values are encoded on save into a dict tagged `TAG` and restored on load: numpy
arrays and scalars (their raw bytes as a uint8 tensor, dtype and shape: bit-identical), numpy and torch
random generators (their state), frozensets and dicts whose keys are not plain. Anything else is refused
on save (TypeError). Format 1 (`checkpoint.pkl`, a pickle) is refused on load without being unpickled.
"""

from __future__ import annotations

import collections
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raypfl.errors import ConfigError

FILENAME = "checkpoint.pt"
OLD_FILENAME = "checkpoint.pkl"  # format 1: a pickle, refused on load
FORMAT = 2
TAG = "__raypfl_type__"  # the key of an encoded (non-plain) value
#: Scalars torch.load(weights_only=True) reads back as they were, so they are stored as they are.
PLAIN = (type(None), bool, int, float, complex, str, bytes)
#: numpy bit generators a checkpoint may recreate (by name, from the file: nothing else is looked up).
BIT_GENERATORS = {
    name: getattr(np.random, name) for name in ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")
}
_PICKLE_PROTO = b"\x80"  # a pickle of protocol 2 or later (what format 1 wrote) starts with PROTO


#: Config keys a resumed run must share with the checkpointed one (the rest, e.g. train.rounds, may change).
FINGERPRINT_KEYS = (
    "seed",
    "dataset.name",
    "dataset.alpha",  # synthetic: the generated federation
    "dataset.beta",
    "dataset.iid",
    "dataset.num_features",
    "dataset.num_classes",
    "dataset.size_log_mean",
    "dataset.size_log_sigma",
    "dataset.min_size",
    "dataset.max_size",
    "dataset.test_clients",
    "dataset.test_samples",
    "dataset.train_limit",
    "dataset.test_limit",
    "model.name",
    "model",  # a model of your own: its _target_ and arguments
    "dataset",  # a dataset of your own: its _target_ and arguments (root and download may change)
    "partition",
    "algorithm",
    "clients.num",
    "clients.per_round",
    "clients.selection",
    "clients.partial_work_fraction",  # (a checkpoint older than these keys does not hold them: not checked)
    "clients.partial_work_policy",
    "optim",
    "train.local_epochs",
    "train.local_steps",
    "train.batch_size",
    "postprocess",  # the update pipeline (issue 16); a checkpoint older than it does not hold these keys
    "clip",
    "topk",
    "quantize",
    "local_dp",
    "privacy",
    "aggregator",
    "attack",
    "clock",  # device profiles (issue 17); older checkpoints do not hold it
    "clients.over_select",
)


def encode(obj: Any, where: str = "state") -> Any:
    """`obj` as tensors and plain values that `torch.load(weights_only=True)` reads back; see `decode`."""
    if type(obj) in PLAIN or type(obj) in (torch.Tensor, torch.nn.Parameter):  # subclasses would not load
        return obj
    if type(obj) is dict:
        if TAG not in obj and all(_plain_key(k) for k in obj):
            return {k: encode(v, f"{where}[{k!r}]") for k, v in obj.items()}
        return {
            TAG: "dict",
            "items": [[encode(k, where), encode(v, f"{where}[{k!r}]")] for k, v in obj.items()],
        }
    if type(obj) is collections.OrderedDict:
        items = [[encode(k, where), encode(v, f"{where}[{k!r}]")] for k, v in obj.items()]
        return {TAG: "ordered_dict", "items": items}
    if type(obj) in (list, tuple):
        return type(obj)(encode(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if type(obj) in (set, frozenset):
        items = [encode(v, where) for v in obj]
        if type(obj) is set and all(_plain_key(v) for v in items):
            return set(items)
        return {TAG: type(obj).__name__, "items": items}
    if type(obj) is np.ndarray:  # not a subclass (matrix, masked array): it would come back as another type
        return {TAG: "ndarray", **_array_bytes(obj, where)}
    if isinstance(obj, np.generic):
        return {TAG: "numpy_scalar", **_array_bytes(np.asarray(obj), where)}
    if isinstance(obj, np.random.Generator):
        return {TAG: "numpy_generator", "state": encode(obj.bit_generator.state, where)}
    if isinstance(obj, np.random.BitGenerator):
        return {TAG: "numpy_bit_generator", "state": encode(obj.state, where)}
    if isinstance(obj, torch.Generator):
        return {TAG: "torch_generator", "device": str(obj.device), "state": obj.get_state()}
    raise TypeError(
        f"checkpoint: {where} is a {type(obj).__module__}.{type(obj).__qualname__}, which a "
        "checkpoint cannot hold (tensors, numpy, random generators and plain containers only)"
    )


def decode(obj: Any) -> Any:
    """The inverse of `encode`."""
    if type(obj) is dict:
        tag = obj.get(TAG)
        if tag is None:
            return {k: decode(v) for k, v in obj.items()}
        if tag == "dict":
            return {decode(k): decode(v) for k, v in obj["items"]}
        if tag == "ordered_dict":
            return collections.OrderedDict((decode(k), decode(v)) for k, v in obj["items"])
        if tag in ("set", "frozenset"):
            return (set if tag == "set" else frozenset)(decode(v) for v in obj["items"])
        if tag == "ndarray":
            return _array_from(obj)
        if tag == "numpy_scalar":
            return _array_from(obj)[()]
        if tag in ("numpy_generator", "numpy_bit_generator"):
            state = decode(obj["state"])
            if state.get("bit_generator") not in BIT_GENERATORS:
                raise ValueError(f"unknown numpy bit generator {state.get('bit_generator')!r}")
            bit_generator = BIT_GENERATORS[state["bit_generator"]]()
            bit_generator.state = state
            return np.random.Generator(bit_generator) if tag == "numpy_generator" else bit_generator
        if tag == "torch_generator":
            generator = torch.Generator(device=obj["device"])
            generator.set_state(obj["state"])
            return generator
        raise ValueError(f"unknown encoded type {tag!r}")
    if type(obj) in (list, tuple):
        return type(obj)(decode(v) for v in obj)
    if type(obj) is set:
        return {decode(v) for v in obj}
    return obj


def _plain_key(key: Any) -> bool:
    """A dict key (or set element) stored as itself: a plain scalar, or a tuple of them."""
    return type(key) in PLAIN or (type(key) is tuple and all(_plain_key(k) for k in key))


def _array_bytes(array: np.ndarray, where: str) -> dict[str, Any]:
    """An array's exact bytes (as a uint8 tensor), dtype and shape."""
    if array.dtype.hasobject or array.dtype.fields is not None:
        raise TypeError(
            f"checkpoint: {where} is a numpy array of dtype {array.dtype}, which a checkpoint cannot hold"
        )
    flat = np.ascontiguousarray(array).reshape(-1)
    if not flat.flags.writeable:  # torch.from_numpy warns on read-only memory
        flat = flat.copy()
    return {
        "dtype": array.dtype.str,
        "shape": list(array.shape),
        "data": torch.from_numpy(flat.view(np.uint8)),
    }


def _array_from(obj: dict[str, Any]) -> np.ndarray:
    data = obj["data"]
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 1:
        raise ValueError("an encoded numpy array must hold a 1-d uint8 tensor")
    dtype = np.dtype(obj["dtype"])
    if dtype.hasobject:  # never make Python objects out of a file's bytes
        raise ValueError(f"an encoded numpy array cannot have dtype {dtype}")
    return data.numpy().view(dtype).reshape(tuple(obj["shape"]))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write `state` to `path` atomically (format 2: see the module docstring)."""
    path = Path(path)
    payload = {"format": FORMAT, "state": encode(state)}
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def checkpoint_path(location: str | Path) -> Path:
    """A run folder or a checkpoint file -> the checkpoint file (a folder's old checkpoint.pkl if that is
    all it has, so that loading it says why it is refused)."""
    path = Path(location).expanduser()
    if not path.is_dir():
        return path
    if not (path / FILENAME).exists() and (path / OLD_FILENAME).exists():
        return path / OLD_FILENAME
    return path / FILENAME


def load_checkpoint(location: str | Path) -> dict[str, Any]:
    """Read a checkpoint without running any code from it; a one-line ConfigError if it is missing, an old
    pickle checkpoint (format 1, never unpickled), or not a checkpoint."""
    path = checkpoint_path(location)
    if not path.is_file():
        raise ConfigError(f"resume={location}: no checkpoint at {path} (a run folder holds {FILENAME})")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ConfigError(f"resume={location}: cannot read {path} ({exc.strerror or exc})") from None
    if magic.startswith(_PICKLE_PROTO):
        raise ConfigError(
            f"resume={location}: {path} was written by an older raypfl (pickle format); it is not loaded "
            "because unpickling can run code (start the run again without resume=)"
        )
    if not zipfile.is_zipfile(path):
        raise ConfigError(f"resume={location}: {path} is not a raypfl checkpoint (format {FORMAT})")
    try:
        raw = torch.load(path, weights_only=True)
    except Exception as exc:
        raise ConfigError(
            f"resume={location}: {path} is not a readable checkpoint ({_one_line(exc)})"
        ) from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or not isinstance(raw.get("state"), dict):
        raise ConfigError(f"resume={location}: {path} is not a raypfl checkpoint (format {FORMAT})")
    try:
        return {"format": FORMAT, **decode(raw["state"])}
    except Exception as exc:
        raise ConfigError(
            f"resume={location}: {path} is not a readable checkpoint ({_one_line(exc)})"
        ) from None


def _one_line(exc: Exception) -> str:
    """The gist of a load error: torch's weights_only refusal names the refused global."""
    text = str(exc)
    refused = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|\n|$)", text)
    if refused:
        return f"it holds what a safe load refuses: {refused.group(1).strip()}"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def fingerprint(config: dict[str, Any]) -> dict[str, Any]:
    """The settings that must not change between a run and its resumption."""
    out = {}
    for key in FINGERPRINT_KEYS:
        node: Any = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out[key] = _without_defaults(key, node)
    return out


#: Keys of a group that may differ between a run and its resumption (where the data is, whether to fetch it).
MOVABLE = {"dataset": ("root", "download")}
#: Keys added to a group later, at the value that means "as before": left out of the fingerprint at that
#: value, so that checkpoints written before the key existed still resume.
LATER_DEFAULTS = {"partition": {"client_test_fraction": None}}


def _without_defaults(key: str, node: Any) -> Any:
    """A group as fingerprinted: without `_target_: null` (a shipped choice, as checkpoints written before
    groups had `_target_` recorded it) and without its movable keys."""
    if not isinstance(node, dict):
        return node
    drop = MOVABLE.get(key, ())
    later = LATER_DEFAULTS.get(key, {})
    return {
        k: v
        for k, v in node.items()
        if k not in drop and not (k == "_target_" and v is None) and not (k in later and later[k] == v)
    }


def check_compatible(saved: dict[str, Any], current: dict[str, Any], location: str | Path) -> None:
    """Refuse to resume under settings that would make a different run."""
    for key, value in saved.items():
        if current.get(key) != value:
            raise ConfigError(
                f"resume={location}: the checkpoint was made with {key}={value}, this run has "
                f"{key}={current.get(key)}; use the same settings (train.rounds may change)"
            )
