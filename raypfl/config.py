"""Typed views of the Hydra config, and validation: bad input fails here, before Ray starts.

Every error names the key to change, e.g. `clients.per_round=120 > clients.num=100`.
"""

from __future__ import annotations

import math
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
SPEEDS = ("uniform", "lognormal")
BALANCE_RULES = ("none", "aimd", "steps")
NO_QUORUM_ACTIONS = ("fail", "skip")


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
    eval_clients: int = 0  # test each client's local model on the first N test images (0: off)
    checkpoint_every: int = 1  # write checkpoint.pkl every N rounds (0: never)


@dataclass(frozen=True)
class ClientsSpec:
    """Federation size and cohort selection: `clients.*`."""

    num: int = 100
    per_round: int = 10
    selection: str = "random"
    speed: str = "uniform"  # uniform | lognormal: per-client slowdown factors (real sleeps), seeded
    speed_sigma: float = 0.5
    join_schedule: dict[int, int] | None = None  # round -> clients joining then (in id order); None: all at 1

    def joined_by(self, round_idx: int) -> int:
        """How many clients (ids 0..n-1) have joined the federation by `round_idx`."""
        if not self.join_schedule:
            return self.num
        return min(self.num, sum(n for r, n in self.join_schedule.items() if int(r) <= round_idx))


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
    warm_start: bool = True  # ray: the driver trains the first rounds while the actor pool boots
    vectorize: bool = False  # train a worker's clients together in lock-step (torch.func.vmap)
    placement: str = "pack"  # ray: pack (fill a node first) | spread (actors over the cluster's nodes)


@dataclass(frozen=True)
class FaultsSpec:
    """Quorum rounds, deadlines, retries, load balancing and fault injection: `faults.*`."""

    quorum: float = 1.0  # fraction of the cohort whose answers close the round
    round_timeout_s: float | None = None  # the round closes at this deadline even without quorum
    on_no_quorum: str = "fail"  # fail: checkpoint and stop (exit 3) | skip: keep the model, go on
    max_retries: int = 2  # retries of a client whose training raised or whose actor was lost
    retry_backoff_s: float = 0.1  # first retry waits this long, then twice as long each time
    balance: str = "none"  # none | aimd (epochs: +1 on time, halve when late) | steps (target round time)
    start_epochs: int = 4  # aimd: every client starts here
    max_epochs: int = 10  # aimd: never more than this
    target_round_s: float = 2.0  # steps: size each client's local steps to answer in this many seconds
    drop_prob: float = 0.0  # a selected client never answers
    error_prob: float = 0.0  # a client's training raises (a transient error; retried)
    corrupt_prob: float = 0.0  # a client sends NaN/Inf (rejected by the server)
    kill_at_round: int | None = None  # ray.kill client actors in the middle of this round
    kill_count: int = 0
    kill_restart: bool = True  # Ray restarts killed actors (False: they stay dead)
    reassign: bool = True  # clients of a dead actor move to the living ones (False: they die with it)
    evict_after: int | None = None  # consecutive failures after which a client is no longer sampled
    actor_timeout_s: float = 60.0  # how long a restarting actor may take before it is given up
    crash_after_round: int | None = None  # SIGKILL this process after the round's checkpoint (resume tests)

    @property
    def active(self) -> bool:
        """True if anything beyond plain synchronous rounds is asked for."""
        return self != FaultsSpec(crash_after_round=self.crash_after_round)

    def quorum_size(self, cohort_size: int) -> int:
        """Answers needed to close a round of `cohort_size` clients (at least 1)."""
        return max(1, math.ceil(self.quorum * cohort_size - 1e-9))


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


def faults_spec(cfg: DictConfig) -> FaultsSpec:
    return _spec(FaultsSpec, cfg.get("faults") or {}, "faults")


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
    from raypfl.paradigms.spec import FEDERATED, paradigm_of, validate_paradigm

    logger = cfg.get("logger", {}).get("name", "none")
    _require(logger in LOGGERS, f"logger={logger} must be one of {', '.join(LOGGERS)}")
    _require(
        cfg.dataset.name in DATASETS,
        f"unknown dataset={cfg.dataset.name} (choose from: {', '.join(DATASETS)})",
    )
    _validate_dataset(cfg.dataset)
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

    _require(clients.speed in SPEEDS, f"clients.speed={clients.speed} must be one of {', '.join(SPEEDS)}")
    _require(clients.speed_sigma >= 0, f"clients.speed_sigma={clients.speed_sigma} must be >= 0")
    if clients.join_schedule:
        for r, n in clients.join_schedule.items():
            _require(
                str(r).isdigit() and int(r) >= 1 and isinstance(n, int) and n >= 0,
                f"clients.join_schedule entry {r}: {n} must map a round >= 1 to a client count >= 0",
            )
        _require(
            clients.joined_by(1) >= 1, "clients.join_schedule must let at least one client join at round 1"
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
    _require(
        isinstance(train.eval_clients, int)
        and not isinstance(train.eval_clients, bool)
        and train.eval_clients >= 0,
        f"train.eval_clients={train.eval_clients} must be a number of test images >= 0 (0: off)",
    )
    _require(
        isinstance(train.checkpoint_every, int) and train.checkpoint_every >= 0,
        f"train.checkpoint_every={train.checkpoint_every} must be an integer >= 0",
    )
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
    _validate_faults(faults_spec(cfg), runtime, train)
    _require(runtime.name in RUNTIMES, f"runtime={runtime.name} must be one of {', '.join(RUNTIMES)}")
    _require(runtime.mpi_mode in MPI_MODES, f"runtime.mpi_mode={runtime.mpi_mode} must be one of {MPI_MODES}")
    _require(runtime.torch_threads >= 1, f"runtime.torch_threads={runtime.torch_threads} must be >= 1")
    if runtime.num_cpus is not None:
        _positive_int(runtime.num_cpus, "runtime.num_cpus")
    if runtime.num_actors is not None:
        _positive_int(runtime.num_actors, "runtime.num_actors")
    if runtime.vectorize:
        _require(
            not faults_spec(cfg).active and clients.speed == "uniform" and not runtime.rebuild_model,
            "runtime.vectorize=true trains a worker's clients in lock-step: it does not combine with "
            "faults.*, clients.speed=lognormal or runtime.rebuild_model=true",
        )
        _require(train.eval_clients == 0, "runtime.vectorize=true does not combine with train.eval_clients")
    _require(runtime.cpus_per_actor > 0, f"runtime.cpus_per_actor={runtime.cpus_per_actor} must be > 0")
    _require(runtime.gpus_per_actor >= 0, f"runtime.gpus_per_actor={runtime.gpus_per_actor} must be >= 0")
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
LOADED_DATASET_KEYS = ("name", "root", "download", "train_limit", "test_limit")


def _validate_dataset(node: DictConfig) -> None:
    """Unknown `dataset.*` keys are errors; synthetic's knobs are checked by its spec."""
    from raypfl.data.synthetic import NAME as SYNTHETIC
    from raypfl.data.synthetic import synthetic_spec

    if node.name == SYNTHETIC:
        synthetic_spec(node)
        return
    unknown = sorted(set(node) - set(LOADED_DATASET_KEYS))
    _require(
        not unknown,
        f"unknown key dataset.{unknown[0] if unknown else ''} for dataset={node.name} "
        f"(known: {', '.join(LOADED_DATASET_KEYS)})",
    )


def _validate_faults(faults: FaultsSpec, runtime: RuntimeSpec, train: TrainSpec) -> None:
    _require(0 < faults.quorum <= 1, f"faults.quorum={faults.quorum} must be in (0, 1]")
    if faults.round_timeout_s is not None:
        _require(faults.round_timeout_s > 0, f"faults.round_timeout_s={faults.round_timeout_s} must be > 0")
    _require(
        faults.on_no_quorum in NO_QUORUM_ACTIONS,
        f"faults.on_no_quorum={faults.on_no_quorum} must be one of {', '.join(NO_QUORUM_ACTIONS)}",
    )
    _require(faults.max_retries >= 0, f"faults.max_retries={faults.max_retries} must be >= 0")
    _require(faults.retry_backoff_s >= 0, f"faults.retry_backoff_s={faults.retry_backoff_s} must be >= 0")
    _require(
        faults.balance in BALANCE_RULES,
        f"faults.balance={faults.balance} must be one of {', '.join(BALANCE_RULES)}",
    )
    _positive_int(faults.start_epochs, "faults.start_epochs")
    _positive_int(faults.max_epochs, "faults.max_epochs")
    _require(faults.target_round_s > 0, f"faults.target_round_s={faults.target_round_s} must be > 0")
    for key in ("drop_prob", "error_prob", "corrupt_prob"):
        value = getattr(faults, key)
        _require(0 <= value < 1, f"faults.{key}={value} must be in [0, 1)")
    if faults.evict_after is not None:
        _positive_int(faults.evict_after, "faults.evict_after")
    if faults.kill_at_round is not None:
        _positive_int(faults.kill_at_round, "faults.kill_at_round")
        _require(
            isinstance(faults.kill_count, int) and faults.kill_count >= 0,
            f"faults.kill_count={faults.kill_count} must be an integer >= 0",
        )
    if faults.crash_after_round is not None:
        _positive_int(faults.crash_after_round, "faults.crash_after_round")
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
