"""A federated experiment from a config: build the objects, run the rounds, track, save the model."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from raypfl import seeding
from raypfl.algorithms import build_algorithm
from raypfl.config import clients_spec, runtime_spec, train_spec
from raypfl.data.datasets import Dataset, load_dataset
from raypfl.data.partitions import build_partition
from raypfl.models import build_model
from raypfl.runtime import Runtime, build_runtime
from raypfl.runtime.setup import FederationSetup
from raypfl.selection import CohortSampler
from raypfl.tracking import RunTracker
from raypfl.weights import get_flat, set_flat

log = logging.getLogger("raypfl")


@dataclass
class RunResult:
    """The final global weights and the per-round metrics rows."""

    weights: np.ndarray
    rounds: list[dict]
    out_dir: Path

    @property
    def final_accuracy(self) -> float:
        return float(next(r["test_acc"] for r in reversed(self.rounds) if r["test_acc"] != ""))


def initial_weights(model_name: str, dataset: Dataset, seed: int) -> np.ndarray:
    """The round-0 global model, initialised from the root seed."""
    torch.manual_seed(seeding.derive_seed(seed, seeding.INIT))
    return get_flat(build_model(model_name, dataset.in_shape, dataset.num_classes))


def load_data(cfg: DictConfig) -> Dataset:
    d = cfg.dataset
    return load_dataset(d.name, d.root, d.download, d.get("train_limit"), d.get("test_limit"))


def build_setup(cfg: DictConfig, dataset: Dataset) -> FederationSetup:
    """Everything the workers need, built (and checked) before any runtime starts."""
    clients = clients_spec(cfg)
    partition = build_partition(cfg.partition.name, cfg.partition, dataset.train_y, clients.num, cfg.seed)
    return FederationSetup(
        dataset=dataset,
        partition=partition,
        model_name=cfg.model.name,
        algorithm=build_algorithm(cfg),
        seed=cfg.seed,
        torch_threads=runtime_spec(cfg).torch_threads,
    )


def run_experiment(
    cfg: DictConfig,
    out_dir: Path,
    group: str | None = None,
    name: str | None = None,
    started: float | None = None,
) -> RunResult | None:
    """Run `train.rounds` rounds of the configured algorithm on the configured runtime.

    `group` and `name` label the run for trackers (a sweep's runs share a group); `started` is when the
    job began (wall_s counts from it; default: when this process started). Returns None on MPI ranks
    other than 0, which only serve rank 0.
    """
    out_dir = Path(out_dir)
    train = train_spec(cfg)
    runtime = build_runtime(runtime_spec(cfg))
    dataset = load_data(cfg)
    setup = build_setup(cfg, dataset)
    weights = initial_weights(cfg.model.name, dataset, cfg.seed)
    torch.set_num_threads(setup.torch_threads)
    if not runtime.is_driver:  # an MPI rank other than 0: follow rank 0, write nothing
        try:
            runtime.start(setup, weights)
            runtime.serve()
        finally:
            runtime.close()
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    sampler = CohortSampler(clients_spec(cfg), cfg.seed)
    tracker = RunTracker(out_dir, train.rounds, build_sinks(cfg, out_dir, group, name), started)
    log.info(
        "%s on %s: %d clients (%s), %d per round, model %s, runtime %s",
        cfg.algorithm.name,
        dataset.name,
        setup.partition.num_clients,
        cfg.partition.name,
        cfg.clients.per_round,
        cfg.model.name,
        cfg.runtime.name,
    )
    try:
        runtime.start(setup, weights)
        for round_idx in range(1, train.rounds + 1):
            evaluate = round_idx % train.eval_every == 0 or round_idx == train.rounds
            row, client_rows = play_round(
                runtime, round_idx, sampler.cohort(round_idx), evaluate, weights.nbytes
            )
            tracker.log_round(row, client_rows)
        weights = runtime.global_weights()
    finally:
        runtime.close()
        tracker.close()
    model_path = out_dir / "model.pt"
    save_model(model_path, cfg.model.name, dataset, weights)
    tracker.finish(model_path)
    log.info(
        "done: final test accuracy %.2f%% after %d rounds, %.1f s; outputs in %s",
        100 * tracker.rows[-1]["test_acc"],
        train.rounds,
        tracker.wall_s(),
        out_dir,
    )
    return RunResult(weights, tracker.rows, out_dir)


def play_round(
    runtime: Runtime, round_idx: int, cohort: list[int], evaluate: bool, model_bytes: int
) -> tuple[dict, list[dict]]:
    """Run one round (and maybe evaluate); return its metrics row and the clients' rows."""
    start = time.perf_counter()
    result = runtime.run_round(round_idx, cohort)
    trained = time.perf_counter()
    evaluation = runtime.evaluate() if evaluate else None
    done = time.perf_counter()
    losses = [m["train_loss"] for m in result.client_metrics if m["accepted"]]
    train_s = trained - start
    row = {
        "round": round_idx,
        "test_acc": "" if evaluation is None else round(evaluation.accuracy, 6),
        "test_loss": "" if evaluation is None else round(evaluation.loss, 6),
        "train_loss": round(float(np.mean(losses)), 6) if losses else float("nan"),
        "clients": len(result.aggregated),
        "rejected": len(result.rejected),
        "round_s": round(done - start, 4),
        "train_s": round(train_s, 4),
        "compute_s": round(result.compute_s, 4),
        "comm_s": round(max(0.0, train_s - result.compute_s - result.aggregate_s), 4),
        "aggregate_s": round(result.aggregate_s, 4),
        "eval_s": round(done - trained, 4),
        # what FedAvg moves: the global model to each client, one update back from each
        "bytes_down": model_bytes * len(cohort),
        "bytes_up": model_bytes * len(result.client_metrics),
    }
    return row, result.client_metrics


def build_sinks(cfg: DictConfig, out_dir: Path, group: str | None, name: str | None) -> list:
    """Trackers besides the always-on CSV files, from `logger.*`."""
    logger = cfg.get("logger") or {"name": "none"}
    if logger["name"] == "none":
        return []
    if logger["name"] == "wandb":
        from raypfl.wandb_sink import WandbSink

        config = OmegaConf.to_container(cfg, resolve=True)
        return [
            WandbSink(
                config,
                out_dir,
                logger["project"],
                logger.get("entity"),
                group,
                name,
                logger.get("mode"),
                list(logger.get("tags") or []),
            )
        ]
    raise ValueError(f"logger={logger['name']} is not supported")


def save_model(path: Path, model_name: str, dataset: Dataset, weights: np.ndarray) -> None:
    """Save the global model as a state_dict (load with `build_model(name)` + `load_state_dict`)."""
    model = build_model(model_name, dataset.in_shape, dataset.num_classes)
    set_flat(model, weights)
    torch.save(model.state_dict(), path)
