"""`python -m raypfl.compare`: FedAvg, ps_sync, ps_async, allreduce and gossip on the same data and budget.

Every paradigm runs its shipped experiment config (`conf/experiment/<name>.yaml`) with the same model and
the same budget of samples processed (`--epochs` passes over MNIST's training set), one after another on
one local Ray. Writes one table (Markdown + CSV), accuracy against samples and against wall time
(compare_<model>.png) and the per-iteration time breakdown (compare_time.png) to `--results`; each run's
own folder (metrics.csv, breakdown.csv, plots) goes under `--out`.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from raypfl.tracking import plots

log = logging.getLogger("raypfl")

PARADIGMS = ("fedavg", "ps_sync", "ps_async", "allreduce", "gossip", "gossip_pairwise")
DEFAULT_PARADIGMS = PARADIGMS[:5]
DEFAULT_EPOCHS = {"mlp": 3.0, "cnn": 1.0}
TARGET = 0.97
COLUMNS = [
    "model",
    "paradigm",
    "samples",
    "epochs",
    "final_acc",
    "best_acc",
    f"samples_to_{int(TARGET * 100)}",
    "wall_s",
    "compute_ms",
    "comm_ms",
    "apply_ms",
    "iterations",
]


def compose(paradigm: str, model: str, epochs: float, extra: list[str]) -> DictConfig:
    """The experiment's config with the model and the budget of samples set."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from raypfl.cli import CONF_DIR

    experiment = "gossip" if paradigm == "gossip_pairwise" else paradigm
    overrides = [f"+experiment={experiment}", f"model={model}", "runtime.warm_start=false"]
    if paradigm == "gossip_pairwise":
        overrides.append("gossip.variant=pairwise")
    if paradigm != "fedavg":
        overrides.append(f"distributed.epochs={epochs}")
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=overrides + extra)
    if paradigm == "fedavg":  # the rounds that process the same number of samples
        cfg.train.rounds = max(1, math.ceil(epochs / fedavg_epochs_per_round(cfg) - 1e-9))
        cfg.train.checkpoint_every = 0
    return cfg


def fedavg_epochs_per_round(cfg: DictConfig) -> float:
    """Passes over the training set one FedAvg round makes (IID clients: equal shares of it)."""
    return cfg.clients.per_round / cfg.clients.num * cfg.train.local_epochs


def summarize(model: str, paradigm: str, rows: list[dict], breakdown: dict[str, float]) -> dict:
    """One table row from a run's metrics rows."""
    evaluated = [r for r in rows if r["test_acc"] != ""]
    reached = next((r["samples"] for r in evaluated if float(r["test_acc"]) >= TARGET), "")
    return {
        "model": model,
        "paradigm": paradigm,
        "samples": evaluated[-1]["samples"],
        "epochs": round(float(evaluated[-1]["epoch"]), 3),
        "final_acc": round(float(evaluated[-1]["test_acc"]), 4),
        "best_acc": round(max(float(r["test_acc"]) for r in evaluated), 4),
        f"samples_to_{int(TARGET * 100)}": reached,
        "wall_s": round(float(evaluated[-1]["wall_s"]), 1),
        "compute_ms": round(1000 * breakdown["compute_s"], 2),
        "comm_ms": round(1000 * breakdown["comm_s"], 2),
        "apply_ms": round(1000 * breakdown["apply_s"], 2),
        "iterations": evaluated[-1].get("iteration", evaluated[-1].get("round")),
    }


def fedavg_rows(rows: list[dict], cfg: DictConfig, train_size: int) -> tuple[list[dict], dict[str, float]]:
    """FedAvg's round rows in the paradigms' terms: samples processed and per-round time parts."""
    epochs = fedavg_epochs_per_round(cfg)
    out = [
        {
            **r,
            "samples": round(r["round"] * epochs * train_size),
            "epoch": r["round"] * epochs,
            "iteration": r["round"],
        }
        for r in rows
    ]
    parts = {"compute_s": "compute_s", "comm_s": "comm_s", "apply_s": "aggregate_s"}
    return out, {k: float(np.mean([float(r[v]) for r in rows])) for k, v in parts.items()}


def run_one(
    paradigm: str, model: str, epochs: float, out: Path, extra: list[str]
) -> tuple[dict, list[dict], dict]:
    from raypfl.dispatch import run_job
    from raypfl.paradigms.run import breakdown_means
    from raypfl.validation import validate

    cfg = compose(paradigm, model, epochs, extra)
    validate(cfg)
    run_dir = out / model / paradigm
    log.info("compare: %s, model %s, %.3g epochs -> %s", paradigm, model, epochs, run_dir)
    result = run_job(cfg, run_dir, started=time.time())
    if paradigm == "fedavg":
        rows, means = fedavg_rows(result.rounds, cfg, result.train_samples)
    else:
        rows = result.rounds
        with (run_dir / "breakdown.csv").open() as f:
            means = breakdown_means([{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)])
    return summarize(model, paradigm, rows, means), rows, means


def markdown(table: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in table]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raypfl.compare", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=sorted(DEFAULT_EPOCHS))
    parser.add_argument("--paradigms", nargs="+", default=list(DEFAULT_PARADIGMS), choices=PARADIGMS)
    parser.add_argument("--epochs", type=float, default=None, help="budget (default: mlp 3, cnn 1)")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    parser.add_argument(
        "--out", type=Path, default=None, help="run folders (default: outputs/compare/<time>)"
    )
    parser.epilog = "Config overrides (key=value, anywhere on the line) apply to every run."
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    args = parser.parse_args([a for a in argv if a not in overrides])
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    import ray

    from raypfl.config import RuntimeSpec
    from raypfl.runtime.ray_start import start_ray

    out = args.out or Path("outputs/compare") / f"{datetime.now():%Y-%m-%d_%H-%M-%S}"
    table, curves, times = [], {}, {}
    started_ray = start_ray(RuntimeSpec())  # one local Ray for every run: start-up is not on anyone's clock
    try:
        for model in args.models:
            epochs = args.epochs or DEFAULT_EPOCHS[model]
            curves[model] = {}
            for paradigm in args.paradigms:
                row, rows, means = run_one(paradigm, model, epochs, out, overrides)
                table.append(row)
                curves[model][paradigm] = rows
                times[f"{paradigm}\n{model}"] = means
                log.info("compare: %s", row)
    finally:
        if started_ray:
            ray.shutdown()
    args.results.mkdir(parents=True, exist_ok=True)
    with (args.results / "compare.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(table)
    (args.results / "compare.md").write_text(markdown(table))
    for model, runs in curves.items():
        plots.plot_curves(runs, args.results / f"compare_{model}.png")
    plots.plot_breakdown(times, args.results / "compare_time.png", shares=True)
    print(markdown(table))
    print(f"wrote {args.results / 'compare.md'}, compare.csv, compare_*.png; runs in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
