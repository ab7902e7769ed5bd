"""Bytes into the parameter server and seconds per round, with and without per-node pre-aggregation.

    python benchmarks/node_aggregation.py                       # 2 and 4 worker nodes x 2 actors each
    python benchmarks/node_aggregation.py --nodes 2 --rounds 2 --no-report --csv /tmp/na.csv  # the test's

For each cluster size it starts a local multi-node Ray (benchmarks/multinode.py's `start_cluster`: a 0-CPU
head node where the driver and usually the parameter server run, and worker nodes), spreads
`nodes x actors-per-node` client actors over the worker nodes (`runtime.placement=spread`), gives every
actor two clients a round, and runs the same experiment with `runtime.node_aggregation=never` (one push
per busy actor), `auto` (one push per worker node, but the parameter server's node: its actors push
their own) and `always` (one push per worker node). It reports the server's inbound bytes per round
(metrics.csv `server_bytes_in`), the median round and aggregation seconds (rounds after the first), and
how far apart the two final models are. Results: benchmarks/results/node_aggregation.{md,csv}.

Every node of this cluster is on one machine: a push moves through shared memory and the loopback, not a
NIC, so the seconds here show the overhead of the node sums, not the network time saved (the README's
model of a 100-node cluster does that).
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from multinode import RESULTS, capture_placement, compose_config, start_cluster  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODES = ("never", "auto", "always")
COLUMNS = [
    "worker_nodes",
    "actors",
    "mode",
    "server_node",
    "pushes",
    "server_bytes_in",
    "round_s",
    "train_s",
    "aggregate_s",
    "final_acc",
    "max_abs_diff",
]


def experiment(actors: int, rounds: int, seed: int) -> list[str]:
    """The experiment: mlp on MNIST, two clients per actor a round, every round on the actors."""
    return [
        "model=mlp",
        "dataset.train_limit=6000",
        "dataset.test_limit=1000",
        f"clients.num={4 * actors}",
        f"clients.per_round={2 * actors}",
        f"train.rounds={rounds}",
        f"runtime.num_actors={actors}",
        "runtime.placement=spread",
        "runtime.warm_start=false",
        f"seed={seed}",
    ]


def run_mode(address: str, overrides: list[str], mode: str, out: Path) -> dict[str, Any]:
    """One run with `runtime.node_aggregation=mode`; its per-round rows and final weights."""
    from raypfl.driver.experiment import run_experiment

    cfg = compose_config([*overrides, f"runtime.address='{address}'", f"runtime.node_aggregation={mode}"])
    with capture_placement() as captured:
        result = run_experiment(cfg, out / mode)
    placement = captured[-1]
    server = placement["server"]["node_id"]
    on_worker = server in {row["node_id"] for row in placement["actors"]}
    return {
        "rows": result.rounds,
        "weights": result.weights,
        "final_acc": result.final_accuracy,
        "server_node": "a worker's" if on_worker else "head",
    }


def summarize(nodes: int, actors: int, mode: str, run: dict[str, Any], reference: np.ndarray) -> dict:
    """One table row: bytes of a round (all rounds alike), medians of the rounds after the first."""
    rows = run["rows"]
    later = rows[1:] or rows
    model_bytes = run["weights"].size * 8  # a float64 partial of the model
    bytes_in = int(rows[-1]["server_bytes_in"])
    return {
        "worker_nodes": nodes,
        "actors": actors,
        "mode": mode,
        "server_node": run["server_node"],
        "pushes": round(bytes_in / model_bytes),
        "server_bytes_in": bytes_in,
        "round_s": round(statistics.median(float(r["round_s"]) for r in later), 3),
        "train_s": round(statistics.median(float(r["train_s"]) for r in later), 3),
        "aggregate_s": round(statistics.median(float(r["aggregate_s"]) for r in later), 4),
        "final_acc": round(float(run["final_acc"]), 4),
        "max_abs_diff": float(np.abs(run["weights"] - reference).max()),
    }


def measure(nodes: int, args: argparse.Namespace) -> list[dict]:
    """Start a cluster of `nodes` worker nodes, run every mode on it, shut it down (always)."""
    import ray

    actors = nodes * args.actors_per_node
    cluster = start_cluster(nodes, args.actors_per_node, args.store_mb)
    results: dict[str, dict] = {}
    out = args.out / f"{nodes}x{args.actors_per_node}"
    try:
        for mode in MODES:
            started = time.perf_counter()
            results[mode] = run_mode(cluster.address, experiment(actors, args.rounds, args.seed), mode, out)
            seconds = time.perf_counter() - started
            print(f"== {nodes} nodes, {actors} actors, {mode}: {seconds:.1f} s", flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    reference = results[MODES[0]]["weights"]
    return [summarize(nodes, actors, mode, results[mode], reference) for mode in MODES]


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    head = "| worker nodes | actors | node_aggregation | server on | pushes | server bytes in / round | "
    head += "round s | train s | aggregate s | final acc | max abs diff vs never |"
    lines = [
        "# Per-node pre-aggregation on a local Ray cluster",
        "",
        f"`{' '.join(['python benchmarks/node_aggregation.py', *args.argv])}` ({time.strftime('%Y-%m-%d')}, "
        f"{os.cpu_count()} cores shared by every node): worker nodes of {args.actors_per_node} CPUs, one "
        f"client actor per CPU spread over them, two clients per actor a round, mlp, {args.rounds} rounds, "
        f"seed {args.seed}. Seconds are medians of rounds 2+; bytes are the same every round.",
        "",
        head,
        "|" + "---|" * 11,
    ]
    for r in rows:
        lines.append(
            f"| {r['worker_nodes']} | {r['actors']} | {r['mode']} | {r['server_node']} | {r['pushes']} | "
            f"{r['server_bytes_in']:,} | {r['round_s']:.3f} | {r['train_s']:.3f} | {r['aggregate_s']:.4f} | "
            f"{100 * r['final_acc']:.2f}% | {r['max_abs_diff']:.1e} |"
        )
    lines += [
        "",
        "All nodes are on one machine: pushes go through shared memory, so the seconds show the cost of "
        "the node sums, not network time saved (see the README's 100-node model).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[2, 4], help="worker-node counts to run")
    parser.add_argument("--actors-per-node", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--store-mb", type=int, default=150, help="object store per node (MB)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-report", action="store_true", help="print only; write no results files")
    parser.add_argument("--csv", type=Path, help="also write the table's rows to this CSV file (for tests)")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "node_aggregation", help="run folders")
    args = parser.parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.WARNING, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    rows = [row for nodes in args.nodes for row in measure(nodes, args)]
    text = markdown(rows, args)
    print("\n" + text, flush=True)
    if not args.no_report:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "node_aggregation.md").write_text(text)
        write_csv(RESULTS / "node_aggregation.csv", rows)
        print(f"wrote {RESULTS / 'node_aggregation.md'} and .csv", flush=True)
    if args.csv:
        write_csv(args.csv, rows)
    return 0


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    raise SystemExit(main())
