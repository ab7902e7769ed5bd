"""Reproduce the two-process laptop benchmark: sequential FedAvg vs `mpiexec -n 2`, speedup, efficiency.

    python launch/mpi_benchmark.py                       # the full setting (+experiment=mpi_laptop)
    python launch/mpi_benchmark.py --rounds 2 --faithful # quicker; also the model-per-client sequential mode
    python launch/mpi_benchmark.py --ranks 2 -- dataset.train_limit=6000   # extra overrides after --

Runs, one after another on the same config: the sequential runtime with 1 and with 2 torch threads, then
`mpiexec -n RANKS` with 1 torch thread per rank (one busy process per core: more threads than cores
only fight each other). T is the training time: from the first broadcast to the last aggregation, summed
over rounds (metrics.csv `train_s`), before the test evaluation, as in the original. Prints and writes
a table (CSV + Markdown) and a bar chart of the times under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PUBLISHED = {
    "seq_s": 704.5,
    "mpi_s": 521.0,
    "speedup": 1.35,
    "efficiency": 0.676,
    "seq_acc": 0.9775,
    "mpi_acc": 0.9772,
}


def run(name: str, command: list[str], out_dir: Path, threads: int) -> dict:
    """Run one configuration; return its times and final metrics from metrics.csv."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    print(f"== {name}: {' '.join(command)}", flush=True)
    start = time.time()
    proc = subprocess.run(command, cwd=REPO, env=env, text=True, capture_output=True)
    wall = time.time() - start
    if proc.returncode != 0:
        sys.exit(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    with (out_dir / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    train_s = sum(float(r["train_s"]) for r in rows)
    print(
        f"   T = {train_s:.1f} s, accuracy {100 * float(rows[-1]['test_acc']):.2f}%, wall {wall:.1f} s",
        flush=True,
    )
    return {
        "name": name,
        "train_s": train_s,
        "round_s_median": sorted(float(r["train_s"]) for r in rows)[len(rows) // 2],
        "wall_s": wall,
        "test_acc": float(rows[-1]["test_acc"]),
        "test_loss": float(rows[-1]["test_loss"]),
    }


def system_info() -> dict[str, str]:
    import mpi4py
    import numpy
    import torch
    from mpi4py import MPI

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "mpi4py": mpi4py.__version__,
        "mpi": MPI.Get_library_version().splitlines()[0].strip(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2, help="MPI ranks (default 2)")
    parser.add_argument("--rounds", type=int, default=10, help="FedAvg rounds (default 10)")
    parser.add_argument(
        "--faithful", action="store_true", help="also run the model-per-client sequential mode"
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="where to write")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()

    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs_dir = Path("/tmp") / f"raypfl-mpi-benchmark-{stamp}"
    base = [
        "+experiment=mpi_laptop",
        f"train.rounds={args.rounds}",
        f"train.eval_every={args.rounds}",
        *args.overrides,
    ]
    python = [sys.executable, "-m", "raypfl"]
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    plan = [
        ("sequential, 1 thread", 1, 1, python + base + ["runtime=sequential", "runtime.torch_threads=1"]),
        ("sequential, 2 threads", 1, 2, python + base + ["runtime=sequential", "runtime.torch_threads=2"]),
    ]
    if args.faithful:
        plan.append(
            (
                "sequential faithful (model per client), 1 thread",
                1,
                1,
                python
                + base
                + ["runtime=sequential", "runtime.torch_threads=1", "runtime.rebuild_model=true"],
            )
        )
    plan.append(
        (
            f"mpiexec -n {args.ranks}, 1 thread per rank",
            args.ranks,
            1,
            [mpiexec, "-n", str(args.ranks)] + python + base + ["runtime=mpi", "runtime.torch_threads=1"],
        )
    )

    results = []
    for i, (name, procs, threads, command) in enumerate(plan):
        out_dir = runs_dir / str(i)
        result = run(name, [*command, f"hydra.run.dir={out_dir}"], out_dir, threads)
        results.append({**result, "processes": procs, "threads": threads})

    mpi = results[-1]
    sequential = [r for r in results if r["processes"] == 1 and "faithful" not in r["name"]]
    fastest = min(sequential, key=lambda r: r["train_s"])
    for r in results:
        r["speedup"] = r["train_s"] / mpi["train_s"] if r is not mpi else ""
    mpi["speedup_vs_1_thread"] = results[0]["train_s"] / mpi["train_s"]
    mpi["speedup_vs_fastest"] = fastest["train_s"] / mpi["train_s"]
    mpi["efficiency_vs_fastest"] = mpi["speedup_vs_fastest"] / args.ranks
    write(results, mpi, fastest, args, system_info())


def write(results: list[dict], mpi: dict, fastest: dict, args, info: dict[str, str]) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    header = (
        "| run | processes x threads | T train (s) | median round (s) | S = T_run / T_mpi | accuracy | loss |"
    )
    lines = [header, "|---|---|---|---|---|---|---|"]
    for r in results:
        s = f"{r['speedup']:.2f}" if r["speedup"] != "" else "—"
        lines.append(
            f"| {r['name']} | {r['processes']} x {r['threads']} | {r['train_s']:.1f} | "
            f"{r['round_s_median']:.1f} | {s} | {100 * r['test_acc']:.2f}% | {r['test_loss']:.4f} |"
        )
    n = args.ranks
    summary = [
        "",
        f"Speedup of `mpiexec -n {n}`: S = {mpi['speedup_vs_1_thread']:.2f} vs sequential at 1 thread "
        f"(E = {100 * mpi['speedup_vs_1_thread'] / n:.1f}%), "
        f"S = {mpi['speedup_vs_fastest']:.2f} vs the fastest sequential run "
        f"({fastest['name']}); "
        f"efficiency E = S / {n} = {100 * mpi['efficiency_vs_fastest']:.1f}%.",
        f"Published (2-core 2.7 GHz laptop): sequential {PUBLISHED['seq_s']} s, "
        f"MPI ≈ {PUBLISHED['mpi_s']} s, "
        f"S = {PUBLISHED['speedup']}, E = {100 * PUBLISHED['efficiency']:.1f}%, accuracy "
        f"{100 * PUBLISHED['seq_acc']:.2f}% vs {100 * PUBLISHED['mpi_acc']:.2f}%.",
        f"Setting: +experiment=mpi_laptop, {args.rounds} rounds {' '.join(args.overrides)}".rstrip(),
        "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()),
    ]
    text = "\n".join(lines + summary)
    print("\n" + text)
    (args.out / "mpi_laptop.md").write_text(text + "\n")
    with (args.out / "mpi_laptop.csv").open("w", newline="") as f:
        writer = csv.DictWriter(
            f,
            [
                "name",
                "processes",
                "threads",
                "train_s",
                "round_s_median",
                "wall_s",
                "speedup",
                "test_acc",
                "test_loss",
            ],
            extrasaction="ignore",
        )
        writer.writeheader()
        writer.writerows(results)
    plot(results, args.out / "mpi_laptop.png")
    print(f"\nwrote {args.out / 'mpi_laptop.md'}, mpi_laptop.csv and mpi_laptop.png")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.8))
    names = [r["name"] for r in results]
    times = [r["train_s"] for r in results]
    bars = ax.barh(names, times, color=["#888"] * (len(results) - 1) + ["#2a7"])
    ax.bar_label(bars, [f"{t:.0f} s" for t in times], padding=3)
    ax.invert_yaxis()
    ax.set(xlabel="training time T (s)", title="FedAvg, 2 clients, keras_cnn on MNIST")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
