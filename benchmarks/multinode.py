"""A short experiment on a local multi-node Ray cluster: where did the client actors land?

    python benchmarks/multinode.py                  # spread + pack on the cluster, single-node reference
    python benchmarks/multinode.py --placements spread --json /tmp/mn.json --no-report -- train.rounds=2
    python benchmarks/multinode.py --gpus-per-node 1 -- runtime.gpus_per_actor=0.5 runtime.num_actors=4

It starts a cluster on this machine with `ray.cluster_utils.Cluster` (a head node with 0 CPUs, where the
driver runs, and worker nodes with their own CPUs, a custom resource naming each, and their own object
store), runs the experiment through `raypfl.driver.experiment.run_experiment` with `runtime.address=<cluster>`
(the same path as `python -m raypfl ... runtime.address=auto` on a real cluster), prints where every actor
landed, and tears the cluster down. By default it also runs the same experiment on a one-node local Ray
and checks that the final weights agree (placement must not change the result). The report goes to
benchmarks/results/multinode.md; `--json` writes the placement and final-weights files for tests.

Every run has `runtime.warm_start=false`: the one-node reference starts its own local Ray, where warm start
would train rounds in the driver until the actors are up; on a fast machine that can be every round, and
then there is no pool whose placement to report (nor actors whose weights to compare).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
os.environ.setdefault("RAYPFL_DATA", str(REPO.parent / "shared" / "data"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("WANDB_MODE", "offline")

#: The experiment: small enough for seconds per run on 2 cores.
EXPERIMENT = [
    "model=mlp",
    "dataset.train_limit=6000",
    "dataset.test_limit=1000",
    "clients.num=20",
    "clients.per_round=4",
    "train.rounds=3",
    "runtime.num_actors=2",
    "runtime.warm_start=false",  # every round on the actors, whatever the machine's speed (see above)
]


def compose_config(overrides: list[str]):
    """conf/config.yaml with overrides, as `python -m raypfl` composes it; validated."""
    from hydra import compose, initialize_config_dir

    from raypfl.validation import validate

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    validate(cfg)
    return cfg


def start_cluster(workers: int, cpus_per_node: float, store_mb: int, gpus_per_node: float = 0):
    """A head node without CPUs (the driver lives there) plus `workers` nodes named worker_a, worker_b, ..."""
    from ray.cluster_utils import Cluster

    common = {"object_store_memory": store_mb * 1024 * 1024, "include_dashboard": False}
    # Raylets prestart one Python worker per CPU; on a small machine hosting several nodes that is many
    # idle processes competing for the cores while the cluster starts, so workers start on demand instead.
    system = {"enable_worker_prestart": False, "prestart_worker_first_driver": False}
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": system, **common}
    )
    for k in range(workers):
        name = f"worker_{chr(ord('a') + k)}"
        cluster.add_node(num_cpus=cpus_per_node, num_gpus=gpus_per_node, resources={name: 1}, **common)
    cluster.wait_for_nodes()
    return cluster


def cluster_nodes() -> list[dict[str, Any]]:
    """The live nodes of the Ray this process is connected to: id, IP, resources, head or not."""
    import ray

    return [
        {
            "node_id": n["NodeID"],
            "ip": n["NodeManagerAddress"],
            "resources": {k: v for k, v in n["Resources"].items() if not k.startswith("node:")},
            "head": "node:__internal_head__" in n["Resources"],
        }
        for n in ray.nodes()
        if n["Alive"]
    ]


@contextlib.contextmanager
def capture_placement() -> Iterator[list[dict[str, Any]]]:
    """Collect `RayRuntime.placement` (and the server's node) of every actor pool that came up in the block.

    It hooks `wait_ready`, which every pool passes once its actors answered: at `start`, or when it takes
    over from a warm-start driver.
    """
    from raypfl.runtime.ray_runtime import RayRuntime

    captured: list[dict[str, Any]] = []
    original = RayRuntime.wait_ready

    def wait_ready(self: RayRuntime, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        captured.append({"actors": self.placement, "server": self.server_location, "nodes": cluster_nodes()})

    RayRuntime.wait_ready = wait_ready
    try:
        yield captured
    finally:
        RayRuntime.wait_ready = original


def run(name: str, overrides: list[str], out_root: Path) -> dict[str, Any]:
    """One experiment; returns its placement, final accuracy, wall time and final weights."""
    from raypfl.driver.experiment import run_experiment

    cfg = compose_config(overrides)
    start = time.perf_counter()
    with capture_placement() as captured:
        result = run_experiment(cfg, out_root / name)
    wall = time.perf_counter() - start
    if not captured:
        raise RuntimeError(
            f"{name}: no actor pool came up, so there is no placement to report (did the warm-start driver "
            f"train every round? overrides: {' '.join(overrides)})"
        )
    placement = captured[-1]
    nodes = {row["node_id"] for row in placement["actors"]}
    print(f"\n== {name}: {len(placement['actors'])} actors on {len(nodes)} node(s), {wall:.1f} s", flush=True)
    from raypfl.runtime.placement import describe

    for line in describe(placement["actors"]):
        print(f"   {line}", flush=True)
    return {
        "name": name,
        "overrides": overrides,
        "placement": placement["actors"],
        "server": placement["server"],
        "nodes": placement["nodes"],
        "distinct_nodes": len(nodes),
        "final_acc": result.final_accuracy,
        "wall_s": round(wall, 2),
        "weights": result.weights,
        "out_dir": str(result.out_dir),
    }


def run_on_cluster(args: argparse.Namespace, extra: list[str]) -> tuple[list[dict[str, Any]], list[dict]]:
    """Start the cluster, run one experiment per placement, tear the cluster down (always)."""
    import ray

    started = time.perf_counter()
    cluster = start_cluster(args.workers, args.cpus_per_node, args.store_mb, args.gpus_per_node)
    print(f"cluster up in {time.perf_counter() - started:.1f} s at {cluster.address}", flush=True)
    runs = []
    try:
        for placement in args.placements:
            overrides = [
                *EXPERIMENT,
                f"seed={args.seed}",
                f"runtime.placement={placement}",
                f"runtime.address='{cluster.address}'",
                *extra,
            ]
            runs.append(run(f"cluster-{placement}", overrides, args.out))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
        print("cluster shut down", flush=True)
    return runs, runs[0]["nodes"]


def report(runs: list[dict[str, Any]], nodes: list[dict], reference: dict[str, Any] | None, args) -> str:
    from raypfl.runtime.placement import markdown_table

    lines = [
        "# Multi-node placement on a local Ray cluster",
        "",
        f"`{' '.join(['python benchmarks/multinode.py', *args.argv])}` ({time.strftime('%Y-%m-%d')}): a "
        f"`ray.cluster_utils.Cluster` on one machine ({os.cpu_count()} cores) with a 0-CPU head node (the "
        f"driver) and {args.workers} worker nodes of {args.cpus_per_node:g} logical CPUs each (custom "
        f"resources `worker_a`, `worker_b`, ...; {args.store_mb} MB object store per node), joined with "
        "`runtime.address=<cluster address>`. Every node has the same IP here (one machine); the node ids "
        f"and custom resources tell them apart. Experiment: `{' '.join([*EXPERIMENT, *args.extra])}`, "
        f"seed {args.seed}."
        + (
            f" Each worker node declares {args.gpus_per_node:g} logical GPU(s) (`num_gpus`; this machine has "
            'no GPU): Ray schedules and assigns them (GPU ids, `CUDA_VISIBLE_DEVICES`); "model on" is '
            "the device the worker put the model on."
            if args.gpus_per_node
            else ""
        ),
        "",
        "`spread` asks Ray for its SPREAD strategy (round-robin over the nodes with room); `pack` is Ray's "
        "default (hybrid) policy: the driver's node first, and a node until half its CPUs are taken, then "
        "the next one.",
        "",
        "## Nodes",
        "",
        "| node id | role | resources |",
        "|---|---|---|",
    ]
    for n in sorted(nodes, key=lambda n: (not n["head"], sorted(n["resources"]))):
        resources = ", ".join(f"{k}={v:g}" for k, v in sorted(n["resources"].items()) if "memory" not in k)
        lines.append(f"| {n['node_id'][:12]} | {'head' if n['head'] else 'worker'} | {resources} |")
    for r in runs:
        server = r["server"]
        lines += [
            "",
            f"## `runtime.placement={r['name'].split('-', 1)[1]}`: {len(r['placement'])} actors on "
            f"{r['distinct_nodes']} node(s)",
            "",
            markdown_table(r["placement"]),
            "",
            f"Parameter server: node {server['node_id'][:12]} ({server.get('label') or '-'}). "
            f"Final test accuracy {100 * r['final_acc']:.2f}%, {r['wall_s']:.1f} s (with Ray connect/start).",
        ]
    if reference is not None:
        lines += ["", "## Same result as one node", ""]
        for r in runs:
            diff = float(np.abs(r["weights"] - reference["weights"]).max())
            lines.append(
                f"- {r['name']} vs single-node pack run: max |w - w_ref| = {diff:.2e}, "
                f"accuracy {100 * r['final_acc']:.2f}% vs {100 * reference['final_acc']:.2f}%"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command_line = list(argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--placements", nargs="+", default=["spread", "pack"], choices=["spread", "pack"])
    parser.add_argument("--workers", type=int, default=2, help="worker nodes besides the head")
    parser.add_argument("--cpus-per-node", type=float, default=4, help="CPUs of each worker node")
    parser.add_argument("--store-mb", type=int, default=200, help="object store per node (MB)")
    parser.add_argument(
        "--gpus-per-node",
        type=float,
        default=0,
        help="logical GPUs of each worker node (Ray schedules them; no GPU needed), with e.g. "
        "`-- runtime.gpus_per_actor=0.5 runtime.num_actors=4`; the report goes to multinode_gpu.md",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-reference", action="store_true", help="skip the single-node reference run")
    parser.add_argument("--no-report", action="store_true", help=f"do not write {RESULTS / 'multinode.md'}")
    parser.add_argument("--json", type=Path, help="write placements (and <stem>-<run>.npy final weights)")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "multinode", help="run folders")
    args = parser.parse_args(argv)
    args.argv = command_line
    args.extra = extra
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")

    runs, nodes = run_on_cluster(args, extra)
    reference = None
    if not args.no_reference:
        # one local Ray without GPUs: the same run on the CPU (8 logical CPUs: room for every actor)
        same = [o for o in extra if not o.startswith("runtime.gpus_per_actor=")]
        overrides = [*EXPERIMENT, f"seed={args.seed}", "runtime.placement=pack", "runtime.num_cpus=8", *same]
        reference = run("local-pack", overrides, args.out)
    text = report(runs, nodes, reference, args)
    print("\n" + text, flush=True)
    if not args.no_report:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / ("multinode_gpu.md" if args.gpus_per_node else "multinode.md")
        path.write_text(text)
        print(f"wrote {path}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        for r in [*runs, *([reference] if reference else [])]:
            weights_path = args.json.with_name(f"{args.json.stem}-{r['name']}.npy")
            np.save(weights_path, r["weights"])
            rows.append({**{k: v for k, v in r.items() if k != "weights"}, "weights_path": str(weights_path)})
        args.json.write_text(json.dumps({"nodes": nodes, "runs": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
