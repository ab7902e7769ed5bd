"""Run one non-federated paradigm from the config: data, Ray, the paradigm's points evaluated and logged.

Every run leaves, like a FedAvg run: config.yaml, metrics.csv (one row per evaluated point: samples
processed, epochs, test accuracy and loss, training loss, wall time, and the paradigm's own columns),
breakdown.csv (compute / communication / apply seconds per iteration and worker), time.png (the same as
stacked bars), curve.png (accuracy against samples and against wall time), summary.json and model.pt.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import ray
import torch
from omegaconf import DictConfig, OmegaConf

from raypfl.config import optim_spec, runtime_spec
from raypfl.data.partitions import build_partition
from raypfl.data.synthetic import NAME as SYNTHETIC
from raypfl.errors import ConfigError
from raypfl.paradigms import COLUMNS, trainer
from raypfl.paradigms.base import ParadigmContext
from raypfl.paradigms.spec import distributed_spec, gossip_spec, paradigm_of, ps_spec
from raypfl.paradigms.worker import Evaluator
from raypfl.tracking import plots
from raypfl.tracking.tracker import _CsvLog, process_start_time

log = logging.getLogger("raypfl")

BASE_COLUMNS = [
    "round",
    "samples",
    "epoch",
    "iteration",
    "test_acc",
    "test_loss",
    "train_loss",
    "wall_s",
    "eval_s",
]
BREAKDOWN_COLUMNS = ["iteration", "worker", "compute_s", "comm_s", "apply_s"]


def build_context(cfg: DictConfig, dataset) -> ParadigmContext:
    """The paradigm's context: shards (one per worker, or per gossip node), initial model, specs."""
    from raypfl.models.io import initial_weights

    name = paradigm_of(cfg)
    if dataset.name == SYNTHETIC:
        raise ConfigError(
            f"paradigm={name} trains on a loaded dataset (mnist, ...); dataset=synthetic is FL-only"
        )
    dist, gossip = distributed_spec(cfg), gossip_spec(cfg)
    shards = gossip.nodes if name == "gossip" else dist.workers
    partition = build_partition(cfg.partition.name, cfg.partition, dataset.train_y, shards, cfg.seed)
    return ParadigmContext(
        name=name,
        dataset=dataset,
        dataset_ref=None,
        partition=partition,
        model_name=cfg.model.name,
        weights=initial_weights(cfg.model.name, dataset, cfg.seed),
        optim=optim_spec(cfg),
        dist=dist,
        ps=ps_spec(cfg),
        gossip=gossip,
        seed=cfg.seed,
        torch_threads=runtime_spec(cfg).torch_threads,
        extra_columns=COLUMNS[name],
    )


def run_paradigm(cfg: DictConfig, out_dir: Path, sinks: list, started: float | None = None):
    """Train with `paradigm=...` for `distributed.epochs`; returns a RunResult (final weights, rows)."""
    from raypfl.data.load import load_data
    from raypfl.driver.result import RunResult
    from raypfl.models.io import save_model
    from raypfl.runtime.ray_start import start_ray

    started = started or process_start_time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    dataset = load_data(cfg)
    ctx = build_context(cfg, dataset)
    torch.set_num_threads(ctx.torch_threads)
    evaluator = Evaluator(dataset, ctx.model_name)
    train_size = len(dataset.train_y)
    metrics = _CsvLog(out_dir / "metrics.csv", BASE_COLUMNS + ctx.extra_columns)
    rows: list[dict] = []
    log.info(
        "%s on %s: %d workers, batch %d, %.3g epochs (%d samples), model %s",
        ctx.name,
        dataset.name,
        ctx.dist.workers,
        ctx.dist.batch_size,
        ctx.dist.epochs,
        ctx.total_samples,
        ctx.model_name,
    )
    started_ray = start_ray(runtime_spec(cfg))
    weights = ctx.weights
    try:
        ctx.dataset_ref = ray.put(dataset)
        for point in trainer(ctx.name)(ctx):
            t0 = time.perf_counter()
            acc, loss = evaluator(point.weights)
            row = {
                "round": len(rows) + 1,
                "samples": point.samples,
                "epoch": round(point.samples / train_size, 4),
                "iteration": point.iteration,
                "test_acc": round(acc, 6),
                "test_loss": round(loss, 6),
                "train_loss": round(point.train_loss, 6),
                "wall_s": round(point.time - started, 3),
                "eval_s": round(time.perf_counter() - t0, 4),
                **point.extra,
            }
            rows.append(row)
            metrics.write([row])
            for sink in sinks:
                sink.log_round(row, [])
            weights = point.weights
            log.info(
                "%s | %s samples (%.2f epochs) | test acc %6.2f%% | test loss %.4f | train loss %.4f"
                " | wall %.1f s%s",
                ctx.name,
                f"{point.samples:,}",
                row["epoch"],
                100 * acc,
                loss,
                point.train_loss,
                row["wall_s"],
                "".join(f" | {k} {v}" for k, v in point.extra.items()),
            )
    finally:
        if started_ray:
            ray.shutdown()
    if not rows:
        raise RuntimeError(f"paradigm={ctx.name} produced no model to evaluate")
    _write_outputs(ctx, out_dir, rows)
    model_path = out_dir / "model.pt"
    save_model(model_path, ctx.model_name, dataset, weights)
    for sink in sinks:
        sink.finish(out_dir, model_path)
    log.info(
        "done: %s, final test accuracy %.2f%% after %s samples, %.1f s; outputs in %s",
        ctx.name,
        100 * rows[-1]["test_acc"],
        f"{rows[-1]['samples']:,}",
        rows[-1]["wall_s"],
        out_dir,
    )
    return RunResult(np.asarray(weights), rows, out_dir, train_size)


def breakdown_means(rows: list[dict]) -> dict[str, float]:
    """Mean seconds per iteration (averaged over workers) of compute, communication and apply."""
    if not rows:
        return {"compute_s": 0.0, "comm_s": 0.0, "apply_s": 0.0}
    return {k: float(np.mean([r[k] for r in rows])) for k in ("compute_s", "comm_s", "apply_s")}


def _write_outputs(ctx: ParadigmContext, out_dir: Path, rows: list[dict]) -> None:
    _CsvLog(out_dir / "breakdown.csv", BREAKDOWN_COLUMNS).write(
        [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()} for r in ctx.breakdown]
    )
    for name, table in ctx.tables.items():
        if table:
            _CsvLog(out_dir / f"{name}.csv", list(table[0])).write(table)
    means = breakdown_means(ctx.breakdown)
    summary = {
        "paradigm": ctx.name,
        "final_acc": rows[-1]["test_acc"],
        "samples": rows[-1]["samples"],
        "wall_s": rows[-1]["wall_s"],
        "iterations": rows[-1]["iteration"],
        "per_iteration": means,
        **ctx.summary,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    plots.plot_curves({ctx.name: rows}, out_dir / "curve.png")
    plots.plot_breakdown({ctx.name: means}, out_dir / "time.png")
