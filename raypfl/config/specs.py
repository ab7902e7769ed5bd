"""The groups of conf/config.yaml as frozen specs (one per group), and the run spec they make together.

Every key is declared once, here (or in raypfl.paradigms.spec), with its type and, via `knob(...)`, its
range or choices. `run_spec(cfg)` checks every group's keys and returns the typed `RunSpec` a run consumes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from raypfl.config.knobs import build_spec, knob
from raypfl.errors import ConfigError

OPTIMIZERS = ("sgd", "adam")
SELECTIONS = ("random", "fixed", "poisson")
WEIGHTINGS = ("samples", "uniform")
LOGGERS = ("none", "wandb")
WANDB_MODES = ("online", "offline", "disabled")
RUNTIMES = ("ray", "sequential", "mpi")
MPI_MODES = ("server", "allgather")
#: runtime.node_aggregation: sum a node's partials before the push (raypfl.runtime.node_aggregation)
NODE_AGGREGATION = ("auto", "always", "never")
SPEEDS = ("uniform", "lognormal")
BALANCE_RULES = ("none", "aimd", "steps")
NO_QUORUM_ACTIONS = ("fail", "skip")
PARTIAL_WORK_POLICIES = ("drop", "keep")
ATTACK_KINDS = ("none", "sign_flip", "gaussian", "scaled", "label_flip")
ACCOUNTANTS = ("rdp", "pld")
CLOCKS = ("real", "virtual")
#: Ray refuses a smaller object store (ray._private.ray_constants.OBJECT_STORE_MINIMUM_MEMORY_BYTES, 75 MiB).
RAY_MIN_OBJECT_STORE_MB = 75


# --- the groups of conf/config.yaml ------------------------------------------------------------------


@dataclass(frozen=True)
class RootSpec:
    """The top-level keys that are not groups: `seed`, `resume`, `overwrite`, `paradigm`."""

    seed: int = knob(0, ge=0)
    resume: str | None = knob(None, null="start a new run")
    overwrite: bool = False  # may a run replace the results in its folder (raypfl.jobs.run_folder)
    paradigm: str = "federated"  # checked against raypfl.paradigms.spec.PARADIGMS (which imports this module)
    # update postprocessors, client steps then server steps (raypfl.postprocess), e.g. [clip, central_dp]
    postprocess: list[str] = field(default_factory=list)


#: Top-level groups of conf/config.yaml (each checked by its own spec).
GROUPS = (
    "dataset", "model", "partition", "algorithm", "runtime", "logger", "clients", "train", "faults",
    "optim", "distributed", "ps", "gossip", "report", "aggregator", "attack", "privacy",
    "clip", "topk", "quantize", "local_dp", "clock",
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
    # every partitioner: hold out this fraction of each client's samples as its own test set
    client_test_fraction: float | None = knob(None, gt=0, lt=1, null="no per-client test sets")


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
    # evaluate every client on its held-out data (partition.client_test_fraction) every N rounds (0: off)
    eval_clients_every: int = knob(0, ge=0, note="0: off")


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
    # systems heterogeneity as in FedProx: this fraction of each cohort does fewer than E local epochs
    partial_work_fraction: float = knob(0.0, ge=0, le=1)
    # drop: their updates are discarded (FedAvg in the FedProx paper) | keep: their partial updates count
    partial_work_policy: str = knob("drop", choices=PARTIAL_WORK_POLICIES)
    # select ceil(over_select x per_round) clients, keep the first per_round to finish (clock=virtual)
    over_select: float = knob(1.0, ge=1)

    @property
    def selected(self) -> int:
        """How many clients a round selects: per_round, over-selected by `over_select`."""
        return math.ceil(self.over_select * self.per_round - 1e-9)

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
    # ray: auto (sum the partials of a node's busy actors into one push, except on the server's node) |
    # always (every node, the server's too) | never (one push per busy actor)
    node_aggregation: str = knob("auto", choices=NODE_AGGREGATION)
    # ray: Ray's runtime_env for this run's workers, e.g. {working_dir: .} ships your code to a cluster
    runtime_env: dict[str, Any] | None = knob(None, expect="a mapping (Ray's runtime_env)", null="none")
    dashboard: bool = False  # ray: a local Ray starts its dashboard (and autoscaler monitor) only if true


@dataclass(frozen=True)
class FaultsSpec:
    """Quorum rounds, deadlines, retries, load balancing and fault injection: `faults.*`."""

    quorum: float = knob(1.0, gt=0, le=1)  # fraction of the cohort whose answers close the round
    # the round closes at this deadline even without quorum
    round_timeout_s: float | None = knob(None, gt=0, null="wait for the quorum")
    # at the deadline the update applies if this fraction answered (e.g. quorum 1.0 + 0.1: FedAvg with a
    # deadline keeps whoever answered in time)
    deadline_quorum: float | None = knob(None, gt=0, le=1, null="faults.quorum")
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
        """Answers needed to close a round of `cohort_size` clients (at least 1, but 0 of an empty cohort:
        clients.selection=poisson may select nobody)."""
        if cohort_size == 0:
            return 0
        return max(1, math.ceil(self.quorum * cohort_size - 1e-9))

    def floor_size(self, cohort_size: int) -> int:
        """Answers a round needs for its update to apply when it closes (at the deadline, or when no answer
        can come any more): `deadline_quorum` of the cohort, else the quorum."""
        if self.deadline_quorum is None or cohort_size == 0:
            return self.quorum_size(cohort_size)
        return max(1, math.ceil(self.deadline_quorum * cohort_size - 1e-9))


@dataclass(frozen=True)
class AttackSpec:
    """`attack.*`: a seeded fraction of the clients is malicious (raypfl.attacks)."""

    kind: str = knob("none", choices=ATTACK_KINDS)
    fraction: float = knob(0.0, ge=0, lt=1)  # of the federation's clients (fixed identities)
    scale: float | None = knob(None, gt=0, null="the kind's default: sign_flip 4, scaled 10, gaussian 1")


@dataclass(frozen=True)
class PrivacySpec:
    """`privacy.*`: central DP (postprocess=[clip, central_dp]): the noise and its accountant."""

    noise_multiplier: float | None = knob(None, ge=0, null="calibrated from privacy.epsilon")
    epsilon: float | None = knob(None, gt=0, null="reported from privacy.noise_multiplier")
    delta: float = knob(1e-5, gt=0, lt=1)
    accountant: str = knob("rdp", choices=ACCOUNTANTS)
    # noise calibrated for this cohort size (pfl-research's noise_cohort_size); the simulated one is smaller
    noise_cohort_size: int | None = knob(None, ge=1, null="clients.per_round")
    # the population the accountant assumes (sampling rate noise_cohort_size / population)
    population: int | None = knob(None, ge=1, null="clients.num")


@dataclass(frozen=True)
class ClockSpec:
    """`clock.*`: the machine's real clock, or a virtual clock driven by device profiles (raypfl.clock)."""

    name: str = knob("real", choices=CLOCKS)
    compute_sps: float = knob(50.0, gt=0)  # median device speed: training samples per second
    compute_sigma: float = knob(1.0, ge=0)  # speeds ~ compute_sps x LogNormal(0, compute_sigma)
    down_mbps: float = knob(20.0, gt=0)  # median download bandwidth, Mbit/s
    up_mbps: float = knob(5.0, gt=0)  # median upload bandwidth, Mbit/s
    bandwidth_sigma: float = knob(1.0, ge=0)  # bandwidths ~ median x LogNormal(0, bandwidth_sigma)
    latency_s: float = knob(0.1, ge=0)  # per transfer (download and upload)
    # a CSV of device profiles (columns: raypfl.clock.profiles.TRACE_COLUMNS); replaces the distributions
    trace: str | None = knob(None, null="draw profiles from the distributions")

    @property
    def virtual(self) -> bool:
        return self.name == "virtual"


def optim_spec(cfg: DictConfig) -> OptimSpec:
    return build_spec(OptimSpec, cfg.optim, "optim")


def train_spec(cfg: DictConfig) -> TrainSpec:
    return build_spec(TrainSpec, cfg.train, "train")


def clients_spec(cfg: DictConfig) -> ClientsSpec:
    return build_spec(ClientsSpec, cfg.clients, "clients")


def runtime_spec(cfg: DictConfig) -> RuntimeSpec:
    return build_spec(RuntimeSpec, cfg.runtime, "runtime")


def faults_spec(cfg: DictConfig) -> FaultsSpec:
    return build_spec(FaultsSpec, cfg.get("faults") or {}, "faults")


def root_spec(cfg: DictConfig) -> RootSpec:
    """`seed`, `resume` and `paradigm`, checked; a top-level key that is none of these nor a group is an
    error."""
    known = {f.name for f in fields(RootSpec)}
    unknown = sorted(set(map(str, cfg)) - known - set(GROUPS) - {"hydra"})
    if unknown:
        names = ", ".join(sorted(known | set(GROUPS)))
        raise ConfigError(f"unknown key {unknown[0]} (top-level keys: {names})")
    picked = {k: cfg[k] for k in known if k in cfg}
    picked = {k: OmegaConf.to_container(v) if isinstance(v, ListConfig) else v for k, v in picked.items()}
    return build_spec(RootSpec, picked, "")


@dataclass(frozen=True)
class RunSpec:
    """Every group a federated run reads, checked and typed once (`run_spec`): what the run consumes."""

    root: RootSpec
    clients: ClientsSpec
    train: TrainSpec
    optim: OptimSpec
    runtime: RuntimeSpec
    faults: FaultsSpec
    logger: LoggerSpec
    report: ReportSpec
    attack: AttackSpec = field(default_factory=AttackSpec)
    privacy: PrivacySpec = field(default_factory=PrivacySpec)
    clock: ClockSpec = field(default_factory=ClockSpec)

    @property
    def seed(self) -> int:
        return self.root.seed


def run_spec(cfg: DictConfig) -> RunSpec:
    """The typed run spec of a config (each key's type and range checked; see raypfl.validation for the
    registries and the rules across keys)."""
    return RunSpec(
        root=root_spec(cfg),
        clients=clients_spec(cfg),
        train=train_spec(cfg),
        optim=optim_spec(cfg),
        runtime=runtime_spec(cfg),
        faults=faults_spec(cfg),
        logger=build_spec(LoggerSpec, cfg.get("logger") or {"name": "none"}, "logger"),
        report=build_spec(ReportSpec, cfg.get("report") or {}, "report"),
        attack=build_spec(AttackSpec, cfg.get("attack") or {}, "attack"),
        privacy=build_spec(PrivacySpec, cfg.get("privacy") or {}, "privacy"),
        clock=build_spec(ClockSpec, cfg.get("clock") or {}, "clock"),
    )
