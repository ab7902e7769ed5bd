"""A federated experiment from a config: build the objects, run the rounds, track, save the model."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from raypfl import seeding
from raypfl.algorithms import Algorithm, ServerSnapshot, build_algorithm
from raypfl.algorithms.aggregate import MODEL
from raypfl.config import FaultsSpec, RunSpec, TrainSpec, run_spec
from raypfl.data.datasets import Dataset
from raypfl.data.holdout import hold_out
from raypfl.data.load import load_data
from raypfl.data.partitions import build_partition
from raypfl.data.synthetic import NAME as SYNTHETIC
from raypfl.data.synthetic import SyntheticPartition, synthetic_spec
from raypfl.driver import client_eval
from raypfl.driver.planning import RoundPlanner
from raypfl.driver.result import RunResult
from raypfl.driver.stream import BufferedRounds, StepRecord, stream_timer
from raypfl.driver.updates import EpsilonLedger, Updates, build_updates, step_names, update_columns
from raypfl.driver.virtual import VirtualRounds, virtual_rounds
from raypfl.errors import ConfigError, RunStopped
from raypfl.jobs import interrupts
from raypfl.jobs.checkpoint import (
    FILENAME,
    check_compatible,
    checkpoint_path,
    fingerprint,
    load_checkpoint,
    save_checkpoint,
)
from raypfl.models.io import initial_weights, save_model
from raypfl.models.zoo import ModelSpec, check_model, model_spec
from raypfl.runtime import Runtime, build_runtime
from raypfl.runtime.base import ANSWERED, Evaluation, RoundPlan, RoundResult, work_amount
from raypfl.runtime.setup import FederationSetup
from raypfl.tracking.sinks import build_sinks
from raypfl.tracking.tracker import RunTracker
from raypfl.training.lockstep import check_vectorizable

log = logging.getLogger("raypfl")


def initial_snapshot(setup: FederationSetup, model: ModelSpec | str, seed: int) -> ServerSnapshot:
    """Version 0: the algorithm's first broadcast and server state, from the seeded initial model."""
    broadcast, state = setup.algorithm.server_init(initial_weights(model, setup.dataset, seed))
    return ServerSnapshot(0, broadcast, state)


def build_setup(
    cfg: DictConfig,
    dataset: Dataset,
    spec: RunSpec | None = None,
    algorithm: Algorithm | None = None,
    updates: Updates | None = None,
) -> FederationSetup:
    """Everything the workers need, built (and checked) before any runtime starts (`spec`: the config's
    typed run spec, `algorithm`: its algorithm, `updates`: its update pipeline, if the caller has them)."""
    spec = spec or run_spec(cfg)
    clients, faults, runtime = spec.clients, spec.faults, spec.runtime
    if dataset.name == SYNTHETIC:  # the generator is the partition: each client's data is its own
        partition = SyntheticPartition(synthetic_spec(cfg.dataset), clients.num, cfg.seed)
        untouched = cfg.partition.name in ("iid", "natural") and cfg.partition.get("_target_") is None
        log.log(
            logging.INFO if untouched else logging.WARNING,  # iid: the default; natural: what synthetic is
            "dataset=synthetic generates each client's own data: partition=%s (partition.*) is ignored",
            cfg.partition.name,
        )
    else:
        partition = build_partition(
            cfg.partition.name, cfg.partition, dataset.train_y, clients.num, cfg.seed, dataset.client_ids
        )
    partition = hold_out(partition, cfg.partition.get("client_test_fraction"), cfg.seed)
    model = model_spec(cfg.model)
    # built once here, so that a factory that fails or returns no usable model stops the run before any
    # runtime starts (not in every worker); checked on two test samples
    probe = check_model(model, dataset.in_shape, dataset.num_classes, dataset.test_x[:2])
    speed = None
    if spec.clock.virtual:  # deadline and quorum are decided on virtual time, by the driver (plan.need)
        faults = replace(faults, round_timeout_s=None, quorum=1.0, deadline_quorum=None)
    elif clients.speed == "lognormal":  # slowdown factors >= 1: a client never runs faster than the machine
        factors = seeding.rng(cfg.seed, seeding.SPEED).lognormal(0.0, clients.speed_sigma, clients.num)
        speed = np.maximum(1.0, factors)
    algorithm = algorithm or build_algorithm(cfg, spec)
    algorithm.check_model(probe)  # e.g. FedPer's layer names; what it derives travels with it
    if runtime.vectorize:
        if not algorithm.lockstep:
            raise ConfigError(
                f"runtime.vectorize=true: algorithm={cfg.algorithm.name} has no lock-step client half"
            )
        check_vectorizable(probe, spec.optim)
    updates = updates or build_updates(cfg, spec, algorithm, clients.num)
    return FederationSetup(
        dataset=dataset,
        partition=partition,
        model=model,
        algorithm=algorithm,
        seed=cfg.seed,
        torch_threads=runtime.torch_threads,
        faults=faults if faults.active else None,
        speed=speed,
        vectorize=runtime.vectorize,
        eval_local=spec.train.eval_clients,
        attack=updates.attack,
        postprocess=updates.client,
        finalize=updates.finalize,
    )


def run_experiment(
    cfg: DictConfig,
    out_dir: Path,
    group: str | None = None,
    name: str | None = None,
    started: float | None = None,
) -> RunResult | None:
    """Run `train.rounds` federated rounds of the configured algorithm on the configured runtime.

    `group` and `name` label the run for trackers (a sweep's runs share a group); `started` is when the
    job began (wall_s counts from it; default: when this process started). With `resume=PATH` the run
    continues from that checkpoint's last complete round. Returns None on MPI ranks other than 0, which
    only serve rank 0.
    """
    out_dir = Path(out_dir)
    spec = run_spec(cfg)  # every group's keys, typed once: what this run reads
    train, faults = spec.train, spec.faults
    algorithm = build_algorithm(cfg, spec)
    residuals = "topk" in step_names(cfg) and bool(cfg.topk.error_feedback)
    if cfg.get("resume") and spec.runtime.name == "mpi" and (algorithm.stateful_clients or residuals):
        whose = "error-feedback residuals" if residuals else f"algorithm={cfg.algorithm.name}"
        raise ConfigError(
            f"resume={cfg.resume}: MPI ranks keep their clients' state themselves "
            f"({whose}), so a checkpoint cannot restore it; resume with "
            "runtime=ray or runtime=sequential"
        )
    resumed = _load_resume(cfg, train)
    # an asynchronous stream needs the actors from the start (no warm start in the driver)
    runtime = build_runtime(
        replace(spec.runtime, warm_start=False) if algorithm.asynchronous else spec.runtime
    )
    dataset = load_data(cfg)
    z = None if resumed is None else (resumed.get("privacy") or {}).get("noise_multiplier")
    updates = build_updates(cfg, spec, algorithm, spec.clients.num, z)
    setup = build_setup(cfg, dataset, spec, algorithm, updates)
    ledger = EpsilonLedger.of(updates, train)
    if resumed is None:
        initial, first_round = initial_snapshot(setup, setup.model, cfg.seed), 1
    else:
        initial, first_round = resumed_snapshot(resumed, setup), resumed["round"] + 1
    broadcast_bytes = sum(int(a.nbytes) for a in initial.broadcast.values())
    virtual = None
    if spec.clock.virtual:
        now = ((resumed or {}).get("clock") or {}).get("now", 0.0)
        virtual = virtual_rounds(spec, setup, initial, broadcast_bytes, now)
    torch.set_num_threads(setup.torch_threads)
    if not runtime.is_driver:  # an MPI rank other than 0: follow rank 0, write nothing
        try:
            runtime.start(setup, initial)
            runtime.serve()
        finally:
            runtime.close()
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    tracker = RunTracker(out_dir, train.rounds, build_sinks(cfg, out_dir, group, name), started)
    log.info(
        "%s on %s: %d clients (%s), %d per round, model %s, runtime %s%s",
        cfg.algorithm.name,
        dataset.name,
        setup.partition.num_clients,
        cfg.partition.name,
        cfg.clients.per_round,
        setup.model.label,
        cfg.runtime.name,
        "" if resumed is None else f", resumed from round {first_round - 1} of {cfg.resume}",
    )
    saved = 0  # the last round checkpointed in out_dir
    try:
        runtime.start(setup, initial)
        planner = RoundPlanner(spec.clients, faults, spec.seed, runtime.parallelism, train)
        everyone = list(range(setup.partition.num_clients))
        if resumed is not None:
            planner.load_state_dict(resumed["planner"])
            tracker.restore(resumed["rows"], resumed["client_rows"])
        pending: PendingRound | None = None  # the last round, until its evaluation is in
        buffered = None  # asynchronous rounds (FedBuff): the stream of client updates
        if setup.algorithm.asynchronous:
            buffered = BufferedRounds(
                setup.algorithm,
                runtime.stream(),
                setup.partition.num_clients,
                cfg.seed,
                planner.client_states,
                stream_timer(virtual),
                setup.stateful_clients,
            )
            if resumed is not None:
                buffered.load_state_dict(resumed["stream"])
            else:
                buffered.start()

        def settle() -> None:
            """Finish the pending round: its evaluation, metrics row, checkpoint, and stop conditions."""
            nonlocal pending, saved
            if pending is None:
                return
            done, pending = pending, None
            row, result, ended = done.finish()
            row.update(ledger.row(row["round"]))
            row.update(done.columns)
            tracker.log_round(row, done.client_rows(), ended)
            round_idx = row["round"]
            every = train.checkpoint_every
            if (every and (round_idx % every == 0 or round_idx == train.rounds)) or not result.quorum_met:
                snapshot, stream_state = done.checkpoint_state()
                _checkpoint(
                    out_dir / FILENAME,
                    cfg,
                    round_idx,
                    snapshot or runtime.server_snapshot(),
                    planner,
                    tracker,
                    ledger,
                    virtual,
                    stream_state,
                )
                saved = round_idx
            done.settled()
            if not result.quorum_met:
                _no_quorum(row, len(done.plan.cohort) + len(done.plan.late), faults, out_dir)
            if faults.crash_after_round == round_idx:
                log.warning("faults.crash_after_round=%d: SIGKILL to this process", round_idx)
                logging.shutdown()
                os.kill(os.getpid(), signal.SIGKILL)

        for round_idx in range(first_round, train.rounds + 1):
            if buffered is not None:  # one server step of the stream, submitted; then the last one settles
                step = stream_step(buffered, runtime, round_idx, train, broadcast_bytes)
                settle()
                pending = step
                test_clients(pending, runtime, everyone, planner.client_states, train)
                continue
            plan = planner.plan(round_idx)
            if virtual is not None:  # who answers in time, decided on virtual time before the round
                plan = virtual.schedule(plan)
            evaluate = plan.evaluate = round_idx % train.eval_every == 0 or round_idx == train.rounds
            # the previous round settles (evaluation in, row logged) once this round's clients are training
            previous = pending
            pending = start_round(runtime, plan, evaluate, broadcast_bytes, on_submitted=settle)
            pending.follow(previous)
            if virtual is not None:
                pending.columns = virtual.finish(plan, pending.result)
            discard_without_quorum(pending.result)
            planner.observe(round_idx, pending.result)
            test_clients(pending, runtime, everyone, planner.client_states, train)
        settle()
        final = runtime.server_snapshot()
        weights = final.model
        model_path = out_dir / "model.pt"
        save_model(model_path, setup.model, dataset, weights)  # before closing: an interrupt keeps it
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: if the last round was done, its model is written anyway
        _keep_final_model(out_dir, cfg, dataset, tracker, runtime, train.rounds)
        raise
    except RunStopped as exc:  # e.g. actors lost for good: say where the run can continue from
        if "resume=" in str(exc):  # it says so already (no quorum)
            raise
        raise type(exc)(f"{exc}. {_resume_hint(out_dir, saved, cfg.get('resume'))}") from exc
    finally:
        runtime.close()
        tracker.close()
    tracker.finish(model_path)
    log.info(
        "done: final test accuracy %.2f%% after %d rounds, %.1f s; outputs in %s",
        100 * tracker.rows[-1]["test_acc"],
        train.rounds,
        tracker.wall_s(),
        out_dir,
    )
    return RunResult(weights, tracker.rows, out_dir, len(dataset.train_y), final, dict(planner.client_states))


def _load_resume(cfg: DictConfig, train: TrainSpec) -> dict | None:
    """The checkpoint named by `resume=` (checked against this config), or None."""
    location = cfg.get("resume")
    if not location:
        return None
    state = load_checkpoint(location)
    check_compatible(state["fingerprint"], fingerprint(OmegaConf.to_container(cfg, resolve=True)), location)
    model_missing = not (checkpoint_path(location).parent / "model.pt").exists()
    if state["round"] == train.rounds and model_missing:  # interrupted after its last round
        log.info("resume=%s: all %d rounds are done; writing the final model", location, train.rounds)
    elif state["round"] >= train.rounds:
        raise ConfigError(
            f"resume={location}: the checkpoint is at round {state['round']}; "
            f"train.rounds={train.rounds} leaves nothing to do"
        )
    return state


def checkpoint_model(state: dict) -> np.ndarray:
    """The global model in a loaded checkpoint (one written before named broadcasts holds `weights`)."""
    return state["broadcast"][MODEL] if "broadcast" in state else state["weights"]


def resumed_snapshot(state: dict, setup: FederationSetup) -> ServerSnapshot:
    """The server's side of a checkpoint: broadcast and server state as they were saved.

    A checkpoint written before named broadcasts (FedAvg, the only algorithm then) holds only the model;
    FedAvg's broadcast and (empty) server state are rebuilt from it exactly.
    """
    if "broadcast" in state:
        return ServerSnapshot(state["version"], dict(state["broadcast"]), dict(state["server_state"]))
    broadcast, server_state = setup.algorithm.server_init(state["weights"])
    return ServerSnapshot(state["version"], broadcast, server_state)


def _checkpoint(
    path: Path,
    cfg: DictConfig,
    round_idx: int,
    snapshot: ServerSnapshot,
    planner: RoundPlanner,
    tracker: RunTracker,
    ledger: EpsilonLedger,
    virtual: VirtualRounds | None = None,
    stream: dict | None = None,
) -> None:
    """Everything a resumed run needs, after round `round_idx` (`snapshot`: the version it made)."""
    state = {
        "round": round_idx,
        "version": snapshot.version,
        "broadcast": snapshot.broadcast,  # the global model and what else the algorithm broadcasts
        "server_state": snapshot.state,  # e.g. FedAdam's moments
        "planner": planner.state_dict(),
        "rows": tracker.rows,
        "client_rows": tracker.client_rows,
        "fingerprint": fingerprint(OmegaConf.to_container(cfg, resolve=True)),
        "privacy": ledger.state_dict(),  # the noise multiplier: a resumed run adds the same noise
        "clock": None if virtual is None else virtual.state_dict(),  # the virtual time at the round's close
        "stream": stream,  # asynchronous rounds: the flights after the step
    }
    with interrupts.deferred():  # a Ctrl-C/SIGTERM waits for the write (torch.save turns it into an error)
        save_checkpoint(path, state)


def _resume_hint(out_dir: Path, saved: int, resumed_from: str | None) -> str:
    """How to continue a stopped run: from its last checkpoint, else from the one it resumed from."""
    if saved:
        return f"Checkpoint after round {saved}: {out_dir / FILENAME}; continue with resume={out_dir}"
    if resumed_from:
        return f"No round completed since resuming; continue again with resume={resumed_from}"
    return "No round completed, so there is no checkpoint to resume from; run it again"


def _no_quorum(row: dict, cohort_size: int, faults: FaultsSpec, out_dir: Path) -> None:
    """A round without quorum: stop (RunStopped, exit code 3) or, with on_no_quorum=skip, say so and go on."""
    message = (
        f"round {row['round']}: only {row['answered']} of {cohort_size} clients answered, below "
        f"faults.{'deadline_' if faults.deadline_quorum else ''}quorum="
        f"{faults.deadline_quorum or faults.quorum} (late {row['late']}, failed {row['failed']}); "
        "the global model was not updated"
    )
    if faults.on_no_quorum == "fail":
        raise RunStopped(
            f"{message}. Checkpoint: {out_dir / FILENAME}; continue with resume={out_dir}, "
            "or set faults.on_no_quorum=skip"
        )
    log.warning("%s; going on (faults.on_no_quorum=skip)", message)


@dataclass
class PendingRound:
    """A trained round whose evaluation may still be running on the workers."""

    plan: RoundPlan
    result: RoundResult
    started: float
    trained: float
    evaluation: Callable[[], Evaluation] | None
    broadcast_bytes: int
    client_eval: list[dict] = field(default_factory=list)  # per-client evaluation rows (if due)
    columns: dict = field(default_factory=dict)  # more metrics-row columns (the virtual clock's)
    done: float | None = None  # time.perf_counter() when its evaluation (or training) was done

    def follow(self, previous: PendingRound | None) -> None:
        """This round was submitted while `previous`'s evaluation ran on the same workers (Ray queues it
        before this round's training): its time starts when that evaluation was done, so that no second
        of the run is counted in two rounds' rows (nor the previous evaluation as this round's comm_s)."""
        if previous is not None and previous.done is not None:
            self.started = min(max(self.started, previous.done), self.trained)

    def checkpoint_state(self) -> tuple[ServerSnapshot | None, dict | None]:
        """(the version this round made, if the runtime may be past it; an asynchronous stream's state)."""
        return None, None

    def settled(self) -> None:
        """The round is logged and checkpointed."""

    def client_rows(self) -> list[dict]:
        """The round's clients.csv rows: the cohort's, dropped stragglers', and a per-client evaluation's."""
        dropped = [
            {"round": self.plan.round_idx, "client": c, "status": "straggler", "accepted": False}
            | {"work": work_amount(work), "attempts": 0}
            for c, work in sorted(self.plan.dropped.items())
        ]
        evaluated = client_eval.client_rows(self.plan.round_idx, self.client_eval)
        return [*self.result.client_metrics, *dropped, *evaluated]

    def finish(self) -> tuple[dict, RoundResult, float]:
        """Wait for the evaluation; return the round's metrics row, its result and when it ended (epoch s)."""
        evaluation = self.evaluation() if self.evaluation is not None else None
        now = time.perf_counter()
        done = evaluation.finished if evaluation is not None and evaluation.finished is not None else now
        self.done = max(done, self.trained)
        return round_row(self, evaluation, done), self.result, time.time() - (now - done)


def start_round(
    runtime: Runtime,
    plan: RoundPlan,
    evaluate: bool,
    broadcast_bytes: int,
    on_submitted: Callable[[], None] | None = None,
) -> PendingRound:
    """Run one round's training and start its evaluation (on runtimes that can, without waiting for it).

    Evaluation of version v is safe to overlap with the next round: it reads the immutable weights of v,
    and nothing the next round does depends on the accuracy. `on_submitted` runs once this round's
    clients are handed to the workers (the previous round settles then).
    """
    start = time.perf_counter()
    result = runtime.run_round(plan, on_submitted)
    trained = time.perf_counter()
    return PendingRound(plan, result, start, trained, start_evaluation(runtime, evaluate), broadcast_bytes)


@dataclass
class StreamRound(PendingRound):
    """A server step of an asynchronous stream, submitted: its rows are collected when it settles."""

    buffered: BufferedRounds | None = None
    record: StepRecord | None = None

    def finish(self) -> tuple[dict, RoundResult, float]:
        if self.result is None:
            self.plan, self.result, columns = self.buffered.resolve(self.record)
            self.columns.update(columns, bytes_down=self.broadcast_bytes * self.record.sent)
            self.trained = time.perf_counter()
        return super().finish()

    def checkpoint_state(self) -> tuple[ServerSnapshot | None, dict | None]:
        return self.buffered.snapshot(self.record), self.buffered.state_dict(self.record)

    def settled(self) -> None:
        self.buffered.settled(self.record)


def stream_step(
    buffered: BufferedRounds, runtime: Runtime, round_idx: int, train: TrainSpec, broadcast_bytes: int
) -> StreamRound:
    """One server step of an asynchronous stream, submitted, its evaluation started if due."""
    began = time.perf_counter()
    record = buffered.step(round_idx)
    evaluation = start_evaluation(runtime, round_idx % train.eval_every == 0 or round_idx == train.rounds)
    plan = RoundPlan(round_idx, [])  # filled in when the step settles
    return StreamRound(
        plan, None, began, began, evaluation, broadcast_bytes, buffered=buffered, record=record
    )


def discard_without_quorum(result: RoundResult) -> None:
    """A round without quorum left the model unchanged: its answers are not accepted and their clients'
    new states are not kept (they continue from the state they had). MPI ranks keep their own states."""
    if result.quorum_met:
        return
    for row in result.client_metrics:
        row["accepted"] = False
    result.client_states.clear()


def test_clients(
    pending: PendingRound, runtime: Runtime, clients: list[int], states: dict, train: TrainSpec
) -> None:
    """Every client on its held-out data, if the round is due (`train.eval_clients_every`)."""
    round_idx = pending.plan.round_idx
    if not client_eval.due(round_idx, train.eval_clients_every, train.rounds):
        return
    began = time.perf_counter()
    pending.client_eval = runtime.evaluate_clients(clients, states)
    log.info(
        "round %d: %d clients tested on their held-out data in %.1f s",
        round_idx,
        len(pending.client_eval),
        time.perf_counter() - began,
    )


def start_evaluation(runtime: Runtime, due: bool) -> Callable[[], Evaluation] | None:
    """If `due`, start evaluating the latest global model (without waiting, on runtimes that can); call
    the result to wait for it."""
    if not due:
        return None
    begin = getattr(runtime, "evaluate_async", None)
    if begin is not None:
        return begin()
    done = runtime.evaluate()
    return lambda: done


def round_row(pending: PendingRound, evaluation: Evaluation | None, done: float) -> dict:
    """The metrics row of a finished round."""
    plan, result = pending.plan, pending.result
    accepted = [m for m in result.client_metrics if m["accepted"]]
    trained = [m for m in result.client_metrics if m.get("status") == "ok"]  # (a round without quorum too)
    losses = [m["train_loss"] for m in trained]
    local_accs = [m["local_acc"] for m in trained if "local_acc" in m]
    train_s = pending.trained - pending.started
    return {
        "round": plan.round_idx,
        "test_acc": "" if evaluation is None else round(evaluation.accuracy, 6),
        "test_loss": "" if evaluation is None else round(evaluation.loss, 6),
        "train_loss": round(float(np.mean(losses)), 6) if losses else float("nan"),
        "clients": len(result.aggregated) if result.quorum_met else 0,  # updates averaged into the model
        "answered": len(result.aggregated) + len(result.rejected),
        "rejected": len(result.rejected),
        "late": result.count("late") + result.count("cancelled"),
        "failed": result.count("failed") + result.count("dropped"),
        "retries": sum(max(0, int(m.get("attempts") or 1) - 1) for m in result.client_metrics),
        "quorum": int(result.quorum_met),
        "local_acc": round(float(np.mean(local_accs)), 6) if local_accs else "",
        "round_s": round(done - pending.started, 4),
        "train_s": round(train_s, 4),
        "compute_s": round(result.compute_s, 4),
        "comm_s": round(max(0.0, train_s - result.compute_s - result.aggregate_s), 4),
        "aggregate_s": round(result.aggregate_s, 4),
        "eval_s": round(done - pending.trained, 4),
        # the broadcast to each client of the cohort (dropped stragglers too); the statistics of each client
        # that answered
        "bytes_down": pending.broadcast_bytes * (len(plan.cohort) + len(plan.dropped) + len(plan.late)),
        "bytes_up": sum(
            int(m.get("bytes_up") or 0) for m in result.client_metrics if m["status"] in ANSWERED
        ),
        "partial_work": plan.partial,
        "server_bytes_in": result.server_bytes_in,  # pushed to the parameter server (node sums count once)
        **client_eval.summarize(pending.client_eval),
        **update_columns(accepted, result.client_metrics, result.server_metrics),
    }


def _keep_final_model(
    out_dir: Path, cfg: DictConfig, dataset: Dataset, tracker: RunTracker, runtime: Runtime, rounds: int
) -> None:
    """After an interrupt: if the last round was done, write model.pt (the runtime's global model, else the
    final checkpoint's; failing both, `resume=` with the run's folder writes it)."""
    path = out_dir / "model.pt"
    if (path.exists() and path.stat().st_mtime >= tracker.started) or not tracker.rows:
        return
    if tracker.rows[-1]["round"] != rounds:
        return
    try:
        weights = runtime.global_weights()
    except Exception:
        weights = None
    try:
        if weights is None:
            state = load_checkpoint(out_dir)
            if state["round"] != rounds:
                return
            weights = checkpoint_model(state)
        save_model(path, model_spec(cfg.model), dataset, weights)
    except Exception as exc:  # never hide the interrupt
        log.warning("interrupted after the last round; model.pt not written (%s)", exc)
