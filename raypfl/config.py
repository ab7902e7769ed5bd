"""Typed views of the Hydra config, and validation: bad input fails here, before Ray starts.

Every key is declared once, in a frozen spec below (or in raypfl.paradigms.spec), with its type and, via
`knob(...)`, its range or choices; `_spec` checks each value against that declaration when it builds the
spec, so `validate` checks every key's type and range up front, then the rules that tie keys together.
Every error names the key to change, e.g. `clients.per_round=120 > clients.num=100`.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from functools import cache
from numbers import Integral, Real
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from raypfl.errors import ConfigError

OPTIMIZERS = ("sgd", "adam")
SELECTIONS = ("random", "fixed")
WEIGHTINGS = ("samples", "uniform")
LOGGERS = ("none", "wandb")
WANDB_MODES = ("online", "offline", "disabled")
RUNTIMES = ("ray", "sequential", "mpi")
MPI_MODES = ("server", "allgather")
SPEEDS = ("uniform", "lognormal")
BALANCE_RULES = ("none", "aimd", "steps")
NO_QUORUM_ACTIONS = ("fail", "skip")
#: Ray refuses a smaller object store (ray._private.ray_constants.OBJECT_STORE_MINIMUM_MEMORY_BYTES, 75 MiB).
RAY_MIN_OBJECT_STORE_MB = 75


# --- declared keys: type (annotation) + range or choices (knob) ----------------------------------------


@dataclass(frozen=True)
class Range:
    """An interval of numbers; `None` ends are open-ended."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: `low` itself is outside
    high_open: bool = False

    def __contains__(self, value: Any) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{self.low:g}, {self.high:g}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return ""


def knob(
    default: Any,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    choices: tuple[str, ...] | None = None,
    null: str | None = None,
    expect: str | None = None,
    note: str | None = None,
) -> Any:
    """A spec field with its allowed values: a range (`gt`/`ge`, `lt`/`le`) or `choices`.

    For the error message: `expect` replaces the generic "an integer"/"a finite number"/..., `note` follows
    the range in parentheses, and `null` says what null means for an optional key.
    """
    low = gt if gt is not None else ge
    high = lt if lt is not None else le
    rng = Range(low, high, gt is not None, lt is not None) if low is not None or high is not None else None
    meta = {"range": rng, "choices": choices, "null": null, "expect": expect, "note": note}
    return field(default=default, metadata=meta)


def show(value: Any) -> str:
    """A config value as it is written on the command line: true, null, inf, [1, 2], abc."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    return str(value)


def _base_type(hint: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed) of an annotation like `int | None`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return (args[0] if len(args) == 1 else Any), len(args) < len(typing.get_args(hint))
    return hint, False


def _kind(base: Any) -> tuple[str, typing.Callable[[Any], bool]]:
    """(how the expected type reads in an error, a test of a value's type) for a base type."""
    origin = typing.get_origin(base) or base
    if base is bool:
        return "true or false", lambda v: isinstance(v, bool)
    if base is int:
        return "an integer", lambda v: isinstance(v, Integral) and not isinstance(v, bool)
    if base is float:
        return (
            "a finite number",
            lambda v: (
                isinstance(v, Real)
                and not isinstance(v, bool)
                and (isinstance(v, Integral) or math.isfinite(v))
            ),
        )
    if base is str:
        return "a string", lambda v: isinstance(v, str)
    if origin is dict:
        return "a mapping {key: value}", lambda v: isinstance(v, Mapping)
    if origin is list:
        item = (typing.get_args(base) or (Any,))[0]
        ok = _kind(item)[1] if item is not Any else (lambda v: True)
        return "a list", lambda v: isinstance(v, (list, tuple)) and all(ok(x) for x in v)
    return "a value", lambda v: True


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_value(cls: type, name: str, value: Any, key: str) -> None:
    """Raise ConfigError unless `value` fits the type and the knob of field `name` of spec `cls`."""
    spec_field = cls.__dataclass_fields__[name]
    base, optional = _base_type(_hints(cls)[name])
    meta = spec_field.metadata
    if value is None and optional:
        return
    what, fits = _kind(base)
    what = meta.get("expect") or what
    rng, choices, null, note = (meta.get(k) for k in ("range", "choices", "null", "note"))
    tail = f" ({note})" if note else ""
    tail += f" (or null: {null})" if optional and null else (" (or null)" if optional else "")
    if choices is not None:
        _require(
            isinstance(value, str) and value in choices,
            f"{key}={show(value)} must be one of {', '.join(choices)}{tail}",
        )
        return
    bound = f" {rng}" if rng is not None else ""
    if not fits(value):
        raise ConfigError(f"{key}={show(value)} must be {what}{bound}{tail}")
    if rng is not None and value not in rng:
        # integers keep their kind in the message (`an integer >= 1`), numbers just the range (`> 0`)
        kind = f"{what} " if base is int else ""
        raise ConfigError(f"{key}={show(value)} must be {kind}{rng}{tail}")


def _spec(cls: type, node: Any, prefix: str, context: str = "") -> Any:
    """Build a frozen spec from a config node; unknown keys, wrong types and values out of range are
    ConfigErrors naming the key (`context`, e.g. ` for dataset=mnist`, follows an unknown key's name)."""
    if isinstance(node, DictConfig):
        data = OmegaConf.to_container(node, resolve=True)
    elif node is None or isinstance(node, Mapping):
        data = dict(node or {})
    else:
        raise ConfigError(f"{prefix}={show(node)} must be a group of keys {prefix}.* (see conf/config.yaml)")
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(map(str, data)) - set(known))
    if unknown:
        raise ConfigError(f"unknown key {prefix}.{unknown[0]}{context} (known: {', '.join(sorted(known))})")
    for name in known:  # in declaration order: the first bad key of the group is reported
        if name in data:
            check_value(cls, name, data[name], f"{prefix}.{name}" if prefix else name)
    return cls(**data)


# --- the groups of conf/config.yaml ------------------------------------------------------------------


@dataclass(frozen=True)
class RootSpec:
    """The top-level keys that are not groups: `seed`, `resume`, `overwrite`, `paradigm`."""

    seed: int = knob(0, ge=0)
    resume: str | None = knob(None, null="start a new run")
    overwrite: bool = False  # may a run replace the results in its folder (raypfl.run_folder)
    paradigm: str = "federated"  # checked against raypfl.paradigms.spec.PARADIGMS (which imports this module)


#: Top-level groups of conf/config.yaml (each checked by its own spec).
GROUPS = (
    "dataset", "model", "partition", "algorithm", "runtime", "logger", "clients", "train", "faults",
    "optim", "distributed", "ps", "gossip", "report",
)  # fmt: skip


@dataclass(frozen=True)
class LoadedDatasetSpec:
    """`dataset.*` of a torchvision dataset (conf/dataset/mnist.yaml); synthetic has its own spec."""

    name: str = "mnist"
    root: str = "./data"
    download: bool = True
    train_limit: int | None = knob(None, ge=1, null="all training images")
    test_limit: int | None = knob(None, ge=1, null="all test images")


@dataclass(frozen=True)
class PartitionSpec:
    """`partition.*`: the partitioner's name and the knobs of all partitioners (each takes some of them;
    a knob left out takes its partitioner's default, see raypfl.data.partitions)."""

    name: str = "iid"
    alpha: float = knob(0.5, gt=0)  # dirichlet
    min_size: int = knob(0, ge=0)  # dirichlet, quantity_skew (>= 1)
    max_size: int = knob(2000, ge=1)  # quantity_skew
    k: int = knob(2, ge=1)  # shards
    slice_size: int = knob(50, ge=1)  # fresh_slices


@dataclass(frozen=True)
class LoggerSpec:
    """`logger.*` (conf/logger/*.yaml)."""

    name: str = knob("none", choices=LOGGERS)
    project: str = "raypfl"
    entity: str | None = None
    mode: str | None = knob(None, choices=WANDB_MODES)
    tags: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ReportSpec:
    """`report.*`: sweep summaries."""

    target_acc: float = knob(0.97, gt=0, le=1)


@dataclass(frozen=True)
class OptimSpec:
    """Client optimizer: `optim.*`."""

    name: str = knob("sgd", choices=OPTIMIZERS)
    lr: float = knob(0.05, gt=0)
    momentum: float = knob(0.0, ge=0, lt=1)
    weight_decay: float = knob(0.0, ge=0)
    persistent_state: bool = False


@dataclass(frozen=True)
class TrainSpec:
    """Rounds and local work: `train.*`. `local_steps` (if set) replaces `local_epochs`."""

    rounds: int = knob(20, ge=1)
    local_epochs: int = knob(1, ge=1)
    local_steps: int | None = knob(None, ge=1, null="train.local_epochs")
    batch_size: int = knob(10, ge=1)
    eval_every: int = knob(1, ge=1)
    # test each client's local model on the first N test images (0: off)
    eval_clients: int = knob(0, ge=0, expect="a number of test images", note="0: off")
    checkpoint_every: int = knob(1, ge=0)  # write checkpoint.pkl every N rounds (0: never)


@dataclass(frozen=True)
class ClientsSpec:
    """Federation size and cohort selection: `clients.*`."""

    num: int = knob(100, ge=1)
    per_round: int = knob(10, ge=1)
    selection: str = knob("random", choices=SELECTIONS)
    # uniform | lognormal: per-client slowdown factors (real sleeps), seeded
    speed: str = knob("uniform", choices=SPEEDS)
    speed_sigma: float = knob(0.5, ge=0)
    # round -> clients joining then (in id order); None: all at 1
    join_schedule: dict[int, int] | None = knob(
        None, expect="a mapping {round: clients joining then}, e.g. {1: 4, 2: 2}", null="all at round 1"
    )

    def joined_by(self, round_idx: int) -> int:
        """How many clients (ids 0..n-1) have joined the federation by `round_idx`."""
        if not self.join_schedule:
            return self.num
        return min(self.num, sum(n for r, n in self.join_schedule.items() if int(r) <= round_idx))


@dataclass(frozen=True)
class RuntimeSpec:
    """How rounds execute: `runtime.*`."""

    name: str = knob("ray", choices=RUNTIMES)
    num_cpus: int | None = knob(None, ge=1, null="all cores")
    num_actors: int | None = knob(None, ge=1, null="one per runtime.cpus_per_actor CPUs")
    cpus_per_actor: float = knob(1.0, gt=0)
    gpus_per_actor: float = knob(0.0, ge=0)
    address: str | None = knob(None, null="start a local Ray")
    connect_timeout_s: float = knob(15.0, gt=0)  # ray: joining runtime.address gives up (exit 2) after this
    object_store_mb: int | None = knob(
        None, ge=RAY_MIN_OBJECT_STORE_MB, expect="an integer (MB)", note="Ray's minimum", null="Ray's default"
    )
    torch_threads: int = knob(1, ge=1)
    mpi_mode: str = knob("server", choices=MPI_MODES)
    rebuild_model: bool = False
    warm_start: bool = True  # ray: the driver trains the first rounds while the actor pool boots
    vectorize: bool = False  # train a worker's clients together in lock-step (torch.func.vmap)
    placement: str = "pack"  # ray: pack (fill a node first) | spread (actors over the cluster's nodes)
    # ray: Ray's runtime_env for this run's workers, e.g. {working_dir: .} ships your code to a cluster
    runtime_env: dict[str, Any] | None = knob(None, expect="a mapping (Ray's runtime_env)", null="none")


@dataclass(frozen=True)
class FaultsSpec:
    """Quorum rounds, deadlines, retries, load balancing and fault injection: `faults.*`."""

    quorum: float = knob(1.0, gt=0, le=1)  # fraction of the cohort whose answers close the round
    # the round closes at this deadline even without quorum
    round_timeout_s: float | None = knob(None, gt=0, null="wait for the quorum")
    # fail: checkpoint and stop (exit 3) | skip: keep the model, go on
    on_no_quorum: str = knob("fail", choices=NO_QUORUM_ACTIONS)
    max_retries: int = knob(2, ge=0)  # retries of a client whose training raised or whose actor was lost
    retry_backoff_s: float = knob(0.1, ge=0)  # first retry waits this long, then twice as long each time
    # none | aimd (epochs: +1 on time, halve when late) | steps (target round time)
    balance: str = knob("none", choices=BALANCE_RULES)
    start_epochs: int = knob(4, ge=1)  # aimd: every client starts here
    max_epochs: int = knob(10, ge=1)  # aimd: never more than this
    # steps: size each client's local steps to answer in this many seconds
    target_round_s: float = knob(2.0, gt=0)
    drop_prob: float = knob(0.0, ge=0, lt=1)  # a selected client never answers
    error_prob: float = knob(0.0, ge=0, lt=1)  # a client's training raises (a transient error; retried)
    corrupt_prob: float = knob(0.0, ge=0, lt=1)  # a client sends NaN/Inf (rejected by the server)
    # ray.kill client actors in the middle of this round
    kill_at_round: int | None = knob(None, ge=1, null="no kill")
    kill_count: int = knob(0, ge=0)
    kill_restart: bool = True  # Ray restarts killed actors (False: they stay dead)
    reassign: bool = True  # clients of a dead actor move to the living ones (False: they die with it)
    # consecutive failures after which a client is no longer sampled
    evict_after: int | None = knob(None, ge=1, null="never")
    actor_timeout_s: float = knob(60.0, gt=0)  # how long a restarting actor may take before it is given up
    # SIGKILL this process after the round's checkpoint (resume tests)
    crash_after_round: int | None = knob(None, ge=1, null="never")

    @property
    def active(self) -> bool:
        """True if anything beyond plain synchronous rounds is asked for."""
        return self != FaultsSpec(crash_after_round=self.crash_after_round)

    def quorum_size(self, cohort_size: int) -> int:
        """Answers needed to close a round of `cohort_size` clients (at least 1)."""
        return max(1, math.ceil(self.quorum * cohort_size - 1e-9))


def optim_spec(cfg: DictConfig) -> OptimSpec:
    return _spec(OptimSpec, cfg.optim, "optim")


def train_spec(cfg: DictConfig) -> TrainSpec:
    return _spec(TrainSpec, cfg.train, "train")


def clients_spec(cfg: DictConfig) -> ClientsSpec:
    return _spec(ClientsSpec, cfg.clients, "clients")


def runtime_spec(cfg: DictConfig) -> RuntimeSpec:
    return _spec(RuntimeSpec, cfg.runtime, "runtime")


def faults_spec(cfg: DictConfig) -> FaultsSpec:
    return _spec(FaultsSpec, cfg.get("faults") or {}, "faults")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def root_spec(cfg: DictConfig) -> RootSpec:
    """`seed`, `resume` and `paradigm`, checked; a top-level key that is none of these nor a group is an
    error."""
    known = {f.name for f in fields(RootSpec)}
    unknown = sorted(set(map(str, cfg)) - known - set(GROUPS) - {"hydra"})
    if unknown:
        names = ", ".join(sorted(known | set(GROUPS)))
        raise ConfigError(f"unknown key {unknown[0]} (top-level keys: {names})")
    return _spec(RootSpec, {k: cfg[k] for k in known if k in cfg}, "")


def validate(cfg: DictConfig) -> None:
    """Check the whole config; raise ConfigError naming the first bad key.

    First every key's type and range (each group's spec), then the rules that tie keys together.
    """
    from raypfl.algorithms import build_algorithm
    from raypfl.data.datasets import DATASETS
    from raypfl.data.partitions import PARTITIONERS
    from raypfl.models import model_factory, model_spec
    from raypfl.paradigms.spec import (
        FEDERATED,
        distributed_spec,
        gossip_spec,
        paradigm_of,
        ps_spec,
        validate_paradigm,
    )

    root_spec(cfg)
    _spec(LoggerSpec, cfg.get("logger") or {"name": "none"}, "logger")
    _validate_dataset(cfg.dataset, DATASETS)
    model = model_spec(cfg.model)  # a shipped name or a factory of the user's (`model._target_`)
    model_factory(model)  # it exists, imports, and takes the keys of model.*
    _validate_partition(cfg.partition, PARTITIONERS)
    _validate_natural(cfg, model.target)
    clients = clients_spec(cfg)
    optim_spec(cfg)
    train = train_spec(cfg)
    if paradigm_of(cfg) == FEDERATED:  # its own knobs, checked against the algorithm class's fields
        build_algorithm(cfg)
    _spec(ReportSpec, cfg.get("report") or {}, "report")
    runtime = runtime_spec(cfg)
    faults = faults_spec(cfg)
    distributed_spec(cfg)
    ps_spec(cfg)
    gossip_spec(cfg)

    # --- rules across keys (every value has its type and range by now) ---
    _require(
        clients.per_round <= clients.num,
        f"clients.per_round={clients.per_round} > clients.num={clients.num}",
    )
    if clients.join_schedule:
        for r, n in clients.join_schedule.items():
            count_ok = isinstance(n, int) and not isinstance(n, bool) and n >= 0
            _require(
                str(r).isdigit() and int(r) >= 1 and count_ok,
                f"clients.join_schedule entry {show(r)}: {show(n)} must map a round >= 1 "
                "to a client count >= 0",
            )
        _require(
            clients.joined_by(1) >= 1, "clients.join_schedule must let at least one client join at round 1"
        )
    _validate_faults(faults, runtime)
    if runtime.vectorize:
        _require(
            not faults.active and clients.speed == "uniform" and not runtime.rebuild_model,
            "runtime.vectorize=true trains a worker's clients in lock-step: it does not combine with "
            "faults.*, clients.speed=lognormal or runtime.rebuild_model=true",
        )
        _require(train.eval_clients == 0, "runtime.vectorize=true does not combine with train.eval_clients")
    for key in ("cpus_per_actor", "gpus_per_actor"):  # Ray's rule for resource requests
        value = getattr(runtime, key)
        _require(
            value <= 1 or float(value).is_integer(),
            f"runtime.{key}={value}: Ray needs a fraction <= 1 or a whole number",
        )
    validate_paradigm(cfg)
    if paradigm_of(cfg) != FEDERATED:
        return
    from raypfl.runtime.placement import PLACEMENTS

    _require(
        runtime.placement in PLACEMENTS,
        f"runtime.placement={runtime.placement} must be one of {', '.join(PLACEMENTS)}",
    )


#: Keys of a torchvision dataset's config node (conf/dataset/mnist.yaml).
LOADED_DATASET_KEYS = tuple(f.name for f in fields(LoadedDatasetSpec))


def _without_target(node: Any) -> dict:
    """A group's keys without `_target_: null` (every shipped group has it, for `GROUP._target_=...`)."""
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
    if "_target_" in data and data["_target_"] is None:
        del data["_target_"]
    return data


def _validate_dataset(node: DictConfig, datasets: tuple[str, ...]) -> None:
    """`dataset.*`: a function of the user's (`dataset._target_`: imports, takes the keys given), synthetic
    (its own spec), or a torchvision dataset."""
    from raypfl.data.custom import check_dataset_target
    from raypfl.data.synthetic import NAME as SYNTHETIC
    from raypfl.data.synthetic import synthetic_spec

    if node.get("_target_") is not None:
        check_dataset_target(node)
        return
    _require(node.name in datasets, f"unknown dataset={node.name} (choose from: {', '.join(datasets)})")
    if node.name == SYNTHETIC:
        synthetic_spec(node)
        return
    _spec(LoadedDatasetSpec, _without_target(node), "dataset", context=f" for dataset={node.name}")


def _validate_partition(node: DictConfig, partitioners: Mapping[str, Any]) -> None:
    """`partition.*`: the partitioner exists and takes the knobs given, each of the right type and range;
    a function of the user's (`partition._target_`) imports and takes the keys given."""
    from raypfl.data.partitions import _knob_names, check_partition_target

    if node.get("_target_") is not None:
        check_partition_target(node._target_, node)
        return
    _require(
        node.name in partitioners,
        f"unknown partition={node.name} (choose from: {', '.join(partitioners)})",
    )
    allowed = _knob_names(partitioners[node.name])
    unknown = sorted(set(map(str, node)) - {"name", "_target_", *allowed})
    _require(
        not unknown,
        f"unknown key partition.{unknown[0] if unknown else ''} for partition={node.name} "
        f"(allowed: {', '.join(allowed) or 'none'})",
    )
    _spec(PartitionSpec, _without_target(node), "partition")
    if node.name == "quantity_skew":
        defaults = inspect.signature(partitioners[node.name]).parameters
        min_size = node.get("min_size", defaults["min_size"].default)
        max_size = node.get("max_size", defaults["max_size"].default)
        _require(min_size >= 1, f"partition.min_size={min_size} must be an integer >= 1")
        _require(
            min_size <= max_size,
            f"partition.min_size={min_size} must be <= partition.max_size={max_size}",
        )


def _validate_natural(cfg: DictConfig, model_target: str | None) -> None:
    """What the data and the paradigm must allow: `partition=natural` needs client ids in the data (a
    `dataset._target_`; synthetic's clients are its own anyway), and the non-federated paradigms build
    shipped models by name and split data into their own shards."""
    from raypfl.data.synthetic import NAME as SYNTHETIC
    from raypfl.paradigms.spec import FEDERATED, paradigm_of

    natural = cfg.partition.get("_target_") is None and cfg.partition.name == "natural"
    custom_data = cfg.dataset.get("_target_") is not None
    if natural and not custom_data and cfg.dataset.name != SYNTHETIC:
        raise ConfigError(
            f"partition=natural needs a dataset with client ids: dataset={cfg.dataset.name} has none "
            "(set dataset._target_ to a function that returns client_ids)"
        )
    paradigm = paradigm_of(cfg)
    if paradigm != FEDERATED and model_target:
        raise ConfigError(
            f"model._target_={model_target} needs paradigm=federated (paradigm={paradigm} builds a shipped "
            "model by name: choose model=...)"
        )
    if paradigm != FEDERATED and natural:
        raise ConfigError(
            f"partition=natural needs paradigm=federated (paradigm={paradigm} has its own shards)"
        )


def _validate_faults(faults: FaultsSpec, runtime: RuntimeSpec) -> None:
    """The faults.* rules that involve the runtime (each key's own range is FaultsSpec's)."""
    ray_only = [
        key
        for key, asked in (
            ("faults.quorum", faults.quorum < 1),
            ("faults.round_timeout_s", faults.round_timeout_s is not None),
            ("faults.kill_at_round", faults.kill_at_round is not None),
        )
        if asked
    ]
    if ray_only:
        _require(
            runtime.name == "ray",
            f"{ray_only[0]} needs runtime=ray (only there do clients answer concurrently); "
            f"runtime={runtime.name}",
        )
    _require(
        runtime.name != "mpi" or not faults.active,
        "faults.* (other than crash_after_round) are not supported on runtime=mpi; use runtime=ray",
    )
