"""Typed views of the Hydra config, and validation: bad input fails here, before Ray starts.

Every error names the key to change, e.g. `clients.per_round=120 > clients.num=100`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from raypfl.errors import ConfigError

OPTIMIZERS = ("sgd", "adam")
SELECTIONS = ("random", "fixed")
WEIGHTINGS = ("samples", "uniform")
LOGGERS = ("none", "wandb")
RUNTIMES = ("ray", "sequential", "mpi")
MPI_MODES = ("server", "allgather")


@dataclass(frozen=True)
class OptimSpec:
    """Client optimizer: `optim.*`."""

    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    persistent_state: bool = False


@dataclass(frozen=True)
class TrainSpec:
    """Rounds and local work: `train.*`. `local_steps` (if set) replaces `local_epochs`."""

    rounds: int = 20
    local_epochs: int = 1
    local_steps: int | None = None
    batch_size: int = 10
    eval_every: int = 1


@dataclass(frozen=True)
class ClientsSpec:
    """Federation size and cohort selection: `clients.*`."""

    num: int = 100
    per_round: int = 10
    selection: str = "random"


@dataclass(frozen=True)
class RuntimeSpec:
    """How rounds execute: `runtime.*`."""

    name: str = "ray"
    num_cpus: int | None = None
    num_actors: int | None = None
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    address: str | None = None
    object_store_mb: int | None = None
    torch_threads: int = 1
    mpi_mode: str = "server"
    rebuild_model: bool = False


def _spec(cls: type, node: Any, prefix: str) -> Any:
    """Build a frozen spec from a config node; unknown keys are an error naming them."""
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown key {prefix}.{unknown[0]} (known: {', '.join(sorted(known))})")
    return cls(**data)


def optim_spec(cfg: DictConfig) -> OptimSpec:
    return _spec(OptimSpec, cfg.optim, "optim")


def train_spec(cfg: DictConfig) -> TrainSpec:
    return _spec(TrainSpec, cfg.train, "train")


def clients_spec(cfg: DictConfig) -> ClientsSpec:
    return _spec(ClientsSpec, cfg.clients, "clients")


def runtime_spec(cfg: DictConfig) -> RuntimeSpec:
    return _spec(RuntimeSpec, cfg.runtime, "runtime")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive_int(value: Any, key: str) -> None:
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value > 0,
        f"{key}={value} must be an integer > 0",
    )


def validate(cfg: DictConfig) -> None:
    """Check the whole config; raise ConfigError naming the first bad key."""
    from raypfl.data.datasets import DATASETS
    from raypfl.data.partitions import PARTITIONERS
    from raypfl.models import MODELS

    logger = cfg.get("logger", {}).get("name", "none")
    _require(logger in LOGGERS, f"logger={logger} must be one of {', '.join(LOGGERS)}")
    _require(
        cfg.dataset.name in DATASETS,
        f"unknown dataset={cfg.dataset.name} (choose from: {', '.join(DATASETS)})",
    )
    _require(cfg.model.name in MODELS, f"unknown model={cfg.model.name} (choose from: {', '.join(MODELS)})")
    _require(
        cfg.partition.name in PARTITIONERS,
        f"unknown partition={cfg.partition.name} (choose from: {', '.join(PARTITIONERS)})",
    )
    if "alpha" in cfg.partition:
        _require(cfg.partition.alpha > 0, f"partition.alpha={cfg.partition.alpha} must be > 0")

    clients = clients_spec(cfg)
    _positive_int(clients.num, "clients.num")
    _positive_int(clients.per_round, "clients.per_round")
    _require(
        clients.per_round <= clients.num,
        f"clients.per_round={clients.per_round} > clients.num={clients.num}",
    )
    _require(
        clients.selection in SELECTIONS, f"clients.selection={clients.selection} must be one of {SELECTIONS}"
    )

    optim = optim_spec(cfg)
    _require(optim.name in OPTIMIZERS, f"optim.name={optim.name} must be one of {', '.join(OPTIMIZERS)}")
    _require(isinstance(optim.lr, (int, float)) and optim.lr > 0, f"optim.lr={optim.lr} must be > 0")
    _require(0 <= optim.momentum < 1, f"optim.momentum={optim.momentum} must be in [0, 1)")
    _require(optim.weight_decay >= 0, f"optim.weight_decay={optim.weight_decay} must be >= 0")

    train = train_spec(cfg)
    _positive_int(train.rounds, "train.rounds")
    _positive_int(train.batch_size, "train.batch_size")
    _positive_int(train.eval_every, "train.eval_every")
    if train.local_steps is None:
        _positive_int(train.local_epochs, "train.local_epochs")
    else:
        _positive_int(train.local_steps, "train.local_steps")

    algo = cfg.algorithm
    _require(
        algo.weighting in WEIGHTINGS, f"algorithm.weighting={algo.weighting} must be one of {WEIGHTINGS}"
    )
    _require(algo.server_lr > 0, f"algorithm.server_lr={algo.server_lr} must be > 0")

    if "report" in cfg:
        target = cfg.report.target_acc
        _require(0 < target <= 1, f"report.target_acc={target} must be in (0, 1]")

    runtime = runtime_spec(cfg)
    _require(runtime.name in RUNTIMES, f"runtime={runtime.name} must be one of {', '.join(RUNTIMES)}")
    _require(runtime.mpi_mode in MPI_MODES, f"runtime.mpi_mode={runtime.mpi_mode} must be one of {MPI_MODES}")
    _require(runtime.torch_threads >= 1, f"runtime.torch_threads={runtime.torch_threads} must be >= 1")
    if runtime.num_cpus is not None:
        _positive_int(runtime.num_cpus, "runtime.num_cpus")
    if runtime.num_actors is not None:
        _positive_int(runtime.num_actors, "runtime.num_actors")
    _require(runtime.cpus_per_actor > 0, f"runtime.cpus_per_actor={runtime.cpus_per_actor} must be > 0")
