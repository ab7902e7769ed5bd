"""Validation of a whole config before anything starts: every key's type and range, the registries
(algorithm, model, dataset, partition: shipped names or `_target_`), and the rules that tie keys together.
Bad input fails here with one line naming the key, before Ray starts.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import fields, replace
from typing import Any

from omegaconf import DictConfig, OmegaConf

from raypfl.config import (
    AttackSpec,
    ClientsSpec,
    ClockSpec,
    FaultsSpec,
    LoadedDatasetSpec,
    LoggerSpec,
    PartitionSpec,
    PrivacySpec,
    ReportSpec,
    RunSpec,
    RuntimeSpec,
    TrainSpec,
    build_spec,
    check_value,
    clients_spec,
    faults_spec,
    optim_spec,
    require,
    root_spec,
    runtime_spec,
    show,
    train_spec,
)
from raypfl.errors import ConfigError


def validate(cfg: DictConfig) -> RunSpec:
    """Check the whole config; raise ConfigError naming the first bad key.

    First every key's type and range (each group's spec), then the rules that tie keys together.
    Returns the typed run spec (`raypfl.config.RunSpec`).
    """
    from raypfl.algorithms import build_algorithm
    from raypfl.data.datasets import DATASETS
    from raypfl.data.partitions import PARTITIONERS
    from raypfl.models.zoo import model_factory, model_spec
    from raypfl.paradigms.spec import (
        FEDERATED,
        distributed_spec,
        gossip_spec,
        paradigm_of,
        ps_spec,
        validate_paradigm,
    )

    root = root_spec(cfg)
    logger = build_spec(LoggerSpec, cfg.get("logger") or {"name": "none"}, "logger")
    _validate_dataset(cfg.dataset, DATASETS)
    model = model_spec(cfg.model)  # a shipped name or a factory of the user's (`model._target_`)
    model_factory(model)  # it exists, imports, and takes the keys of model.*
    _validate_partition(cfg.partition, PARTITIONERS)
    _validate_natural(cfg, model.target)
    clients = clients_spec(cfg)
    optim = optim_spec(cfg)
    train = train_spec(cfg)
    _validate_client_tests(cfg, train)
    algorithm = None
    if paradigm_of(cfg) == FEDERATED:  # its own knobs, checked against the algorithm class's fields
        algorithm = build_algorithm(cfg)
    report = build_spec(ReportSpec, cfg.get("report") or {}, "report")
    runtime = runtime_spec(cfg)
    faults = faults_spec(cfg)
    distributed_spec(cfg)
    ps_spec(cfg)
    gossip_spec(cfg)

    # --- rules across keys (every value has its type and range by now) ---
    require(
        clients.per_round <= clients.num,
        f"clients.per_round={clients.per_round} > clients.num={clients.num}",
    )
    if clients.join_schedule:
        for r, n in clients.join_schedule.items():
            count_ok = isinstance(n, int) and not isinstance(n, bool) and n >= 0
            require(
                str(r).isdigit() and int(r) >= 1 and count_ok,
                f"clients.join_schedule entry {show(r)}: {show(n)} must map a round >= 1 "
                "to a client count >= 0",
            )
        require(
            clients.joined_by(1) >= 1, "clients.join_schedule must let at least one client join at round 1"
        )
    clock = build_spec(ClockSpec, cfg.get("clock") or {}, "clock")
    _validate_clock(clock, clients, runtime)
    _validate_faults(faults, runtime, clock)
    _validate_partial_work(clients, train, faults)
    if runtime.vectorize:
        require(
            not faults.active and clients.speed == "uniform" and not runtime.rebuild_model,
            "runtime.vectorize=true trains a worker's clients in lock-step: it does not combine with "
            "faults.*, clients.speed=lognormal or runtime.rebuild_model=true",
        )
        require(train.eval_clients == 0, "runtime.vectorize=true does not combine with train.eval_clients")
    for key in ("cpus_per_actor", "gpus_per_actor"):  # Ray's rule for resource requests
        value = getattr(runtime, key)
        require(
            value <= 1 or float(value).is_integer(),
            f"runtime.{key}={value}: Ray needs a fraction <= 1 or a whole number",
        )
    validate_paradigm(cfg)
    spec = RunSpec(
        root,
        clients,
        train,
        optim,
        runtime,
        faults,
        logger,
        report,
        build_spec(AttackSpec, cfg.get("attack") or {}, "attack"),
        build_spec(PrivacySpec, cfg.get("privacy") or {}, "privacy"),
        clock,
    )
    if paradigm_of(cfg) != FEDERATED:
        return spec
    from raypfl.driver.updates import check_updates

    check_updates(cfg, spec, algorithm)  # postprocess, aggregator, attack, privacy
    if algorithm.asynchronous:
        _validate_stream(cfg, spec, algorithm.name)
    require(
        clients.over_select == 1 or "central_dp" not in spec.root.postprocess,
        f"clients.over_select={clients.over_select}: central_dp's accountant assumes the sampling of "
        "clients.per_round clients; over-selection samples more (and keeps the fastest)",
    )
    from raypfl.runtime.placement import PLACEMENTS

    require(
        runtime.placement in PLACEMENTS,
        f"runtime.placement={runtime.placement} must be one of {', '.join(PLACEMENTS)}",
    )
    return spec


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
    require(node.name in datasets, f"unknown dataset={node.name} (choose from: {', '.join(datasets)})")
    if node.name == SYNTHETIC:
        synthetic_spec(node)
        return
    build_spec(LoadedDatasetSpec, _without_target(node), "dataset", context=f" for dataset={node.name}")


def _validate_partition(node: DictConfig, partitioners: Mapping[str, Any]) -> None:
    """`partition.*`: the partitioner exists and takes the knobs given, each of the right type and range;
    a function of the user's (`partition._target_`) imports and takes the keys given."""
    from raypfl.data.partitions import RESERVED, _knob_names, check_partition_target

    if node.get("_target_") is not None:
        check_partition_target(node._target_, node)
        return
    require(
        node.name in partitioners,
        f"unknown partition={node.name} (choose from: {', '.join(partitioners)})",
    )
    allowed = _knob_names(partitioners[node.name])
    unknown = sorted(set(map(str, node)) - {*RESERVED, *allowed})
    require(
        not unknown,
        f"unknown key partition.{unknown[0] if unknown else ''} for partition={node.name} "
        f"(allowed: {', '.join(allowed) or 'none'})",
    )
    build_spec(PartitionSpec, _without_target(node), "partition")
    if node.name == "quantity_skew":
        defaults = inspect.signature(partitioners[node.name]).parameters
        min_size = node.get("min_size", defaults["min_size"].default)
        max_size = node.get("max_size", defaults["max_size"].default)
        require(min_size >= 1, f"partition.min_size={min_size} must be an integer >= 1")
        require(
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


def _validate_client_tests(cfg: DictConfig, train: TrainSpec) -> None:
    """`partition.client_test_fraction` (held-out data per client) and `train.eval_clients_every` (which
    tests on it): a fraction in (0, 1), on a partition whose clients keep their data, in a federated run."""
    from raypfl.paradigms.spec import FEDERATED, paradigm_of

    key = "partition.client_test_fraction"
    fraction = cfg.partition.get("client_test_fraction")
    if fraction is not None:
        check_value(PartitionSpec, "client_test_fraction", fraction, key)
        require(
            cfg.partition.get("_target_") is not None or cfg.partition.name != "fresh_slices",
            f"{key}={fraction}: partition=fresh_slices gives clients new samples every round, so a client "
            "has no fixed data to hold out from; choose another partition",
        )
        require(
            paradigm_of(cfg) == FEDERATED,
            f"{key}={fraction} needs paradigm=federated (paradigm={paradigm_of(cfg)} has no clients)",
        )
    require(
        not train.eval_clients_every or fraction is not None,
        f"train.eval_clients_every={train.eval_clients_every} tests every client on its own held-out data: "
        f"set {key} (e.g. 0.2)",
    )


def _validate_partial_work(clients: ClientsSpec, train: TrainSpec, faults: FaultsSpec) -> None:
    """`clients.partial_work_fraction`: stragglers do 1..E-1 epochs (or steps), so E must be >= 2, and the
    load balancer (which also sets each client's work) must be off."""
    if not clients.partial_work_fraction:
        return
    key = f"clients.partial_work_fraction={clients.partial_work_fraction}"
    work = ("train.local_steps", train.local_steps)
    if train.local_steps is None:
        work = ("train.local_epochs", train.local_epochs)
    require(
        work[1] >= 2,
        f"{key}: a straggler does 1..E-1 local epochs (steps) out of E={work[0]}={work[1]}; set E >= 2",
    )
    require(
        faults.balance == "none",
        f"{key} does not combine with faults.balance={faults.balance} (both set each client's local work)",
    )


def _validate_clock(clock: ClockSpec, clients: ClientsSpec, runtime: RuntimeSpec) -> None:
    """The clock.* rules: what needs the virtual clock, what it replaces, and a readable device trace."""
    require(
        clock.virtual or clients.over_select == 1,
        f"clients.over_select={clients.over_select} keeps the first clients.per_round to finish, which "
        "needs clock.name=virtual (on the real clock: raise clients.per_round and set faults.quorum)",
    )
    require(
        not (clock.virtual and clients.speed != "uniform"),
        f"clients.speed={clients.speed} slows clients with real sleeps; with clock.name=virtual device "
        "speeds come from clock.* (compute_sps, compute_sigma, trace): set clients.speed=uniform",
    )
    if clock.trace:
        from raypfl.clock import read_trace

        read_trace(clock.trace, clients.num)  # a missing file, column or a bad value fails here


def _validate_stream(cfg: DictConfig, spec: RunSpec, name: str) -> None:
    """What an asynchronous algorithm (a stream of updates, no rounds to close) does not combine with."""
    where = f"algorithm={name} is asynchronous"
    runtime, clients, faults = spec.runtime, spec.clients, spec.faults
    require(runtime.name != "mpi", f"{where}: runtime=mpi has no streaming; use runtime=ray or sequential")
    require(
        not replace(faults, on_no_quorum=FaultsSpec.on_no_quorum).active,  # (no rounds to lack a quorum)
        f"{where}: faults.* (other than crash_after_round) are not supported; a slow client only "
        "finishes later (clock=virtual models device speeds)",
    )
    require(not runtime.vectorize, f"{where}: runtime.vectorize=true trains cohorts; a stream has none")
    require(
        clients.over_select == 1 and clients.partial_work_fraction == 0 and not clients.join_schedule,
        f"{where}: clients.over_select, clients.partial_work_fraction and clients.join_schedule are "
        "round rules; leave them at their defaults",
    )
    aggregator = (cfg.get("aggregator") or {}).get("name", "mean")
    require(
        aggregator == "mean",
        f"{where}: aggregator={aggregator} combines a round's stacked updates; a buffer is a staleness-"
        "weighted mean (aggregator=mean)",
    )
    require(
        "central_dp" not in spec.root.postprocess,
        f"{where}: central_dp's accounting assumes sampled rounds; postprocess=[clip, ...] works",
    )


def _validate_faults(faults: FaultsSpec, runtime: RuntimeSpec, clock: ClockSpec) -> None:
    """The faults.* rules that involve the runtime (each key's own range is FaultsSpec's). On the virtual
    clock the driver decides deadline and quorum, so they work on every runtime."""
    if faults.deadline_quorum is not None:
        require(
            faults.round_timeout_s is not None,
            f"faults.deadline_quorum={faults.deadline_quorum} is what a round needs at its deadline: set "
            "faults.round_timeout_s",
        )
        require(
            faults.deadline_quorum <= faults.quorum,
            f"faults.deadline_quorum={faults.deadline_quorum} must be <= faults.quorum={faults.quorum} "
            "(the answers that close a round early)",
        )
    if clock.virtual:
        faults = replace(faults, quorum=1.0, round_timeout_s=None, deadline_quorum=None)
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
        require(
            runtime.name == "ray",
            f"{ray_only[0]} needs runtime=ray (only there do clients answer concurrently); "
            f"runtime={runtime.name}",
        )
    require(
        runtime.name != "mpi" or not faults.active,
        "faults.* (other than crash_after_round) are not supported on runtime=mpi; use runtime=ray",
    )
