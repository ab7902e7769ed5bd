"""Does a round cost the same with 1k and 100k clients? Synthetic(1, 1) at two federation sizes.

    python benchmarks/synthetic_scale.py      # ray and sequential, 1k and 100k clients, 20 rounds, twice
    python benchmarks/synthetic_scale.py --runtimes ray --repeats 1 -- train.rounds=10

Each run is `python -m raypfl +experiment=synthetic_scale clients.num=N` in its own subprocess (100 clients
per round). While it runs, the memory of its whole process tree (the driver and every descendant: Ray's
GCS, raylet, workers and actors) is sampled every `--interval` seconds: the sum of PSS (proportional set
size: a page shared by k processes, e.g. Ray's object store or torch's libraries, counts 1/k in each, so
the sum counts it once; on a shared machine other users' processes mapping the same libraries lower it a
little), and for reference the sum of RSS (an upper bound: shared pages count once per process).
From each run's metrics.csv: the median, min and max round time over the steady rounds (round 1 pays the
actors' first-call imports and is skipped) and the final test accuracy.
Ray runs use `runtime.warm_start=false` (if the key exists), so every measured round runs on the actors.
With `--repeats` > 1 the sizes alternate (1k, 100k, 1k, ...) so a change in machine load hits both, and
the steady rounds of all repeats are pooled. Writes benchmarks/results/synthetic_scale.{md,csv}.
Targets: median round time 100k / 1k <= 1.2, peak memory <= 2 GB.

Wall-clock round times move with the machine's load; so the driver's per-round work (planning a cohort,
with static and with dynamic membership) and the generation of the same 100 clients' data are also
timed in this process as CPU time (`time.process_time`), which shows their dependence on N directly.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
RAY_CONF = REPO / "conf" / "runtime" / "ray.yaml"
MB = 1024 * 1024
TARGET_RATIO = 1.2
TARGET_MEMORY_MB = 2048


@dataclass
class Run:
    """One subprocess: what it was, and what it measured."""

    runtime: str
    clients: int
    repeat: int
    round_s: list[float] = field(default_factory=list)  # steady rounds (from round 2)
    samples: list[int] = field(default_factory=list)  # training samples of those rounds' cohorts
    final_acc: float = float("nan")
    peak_pss_mb: float = 0.0
    peak_rss_mb: float = 0.0
    peak_processes: int = 0
    wall_s: float = 0.0
    load_before: float = 0.0
    load_after: float = 0.0


def tree_memory(root: psutil.Process) -> tuple[int, int, int]:
    """(sum of PSS, sum of RSS, number of processes) of `root` and all its descendants, in bytes."""
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0, 0
    pss = rss = count = 0
    for proc in procs:
        try:
            info = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue  # exited between listing and reading
        pss += getattr(info, "pss", info.rss)
        rss += info.rss
        count += 1
    return pss, rss, count


def ray_overrides() -> list[str]:
    """A local Ray of 2 CPUs whose rounds all run on the actors (no driver-side warm start)."""
    cold = "runtime.warm_start=false" if "warm_start:" in RAY_CONF.read_text() else None
    return ["runtime.num_cpus=2", *([cold] if cold else [])]


def run_one(run: Run, rounds: int, out: Path, extra: list[str], interval: float) -> Run:
    """Run one experiment, sampling its process tree's memory; fill in `run` from its metrics.csv."""
    out.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "raypfl",
        "+experiment=synthetic_scale",
        f"clients.num={run.clients}",
        f"runtime={run.runtime}",
        *(ray_overrides() if run.runtime == "ray" else []),
        f"train.rounds={rounds}",
        f"hydra.run.dir={out}",
        *extra,
    ]
    print(f"== {run.runtime}, {run.clients} clients: {' '.join(command[1:])}", flush=True)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    run.load_before = os.getloadavg()[0]
    start = time.perf_counter()
    with (out / "stdout.log").open("w") as log:
        proc = psutil.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            pss, rss, count = tree_memory(proc)
            run.peak_pss_mb = max(run.peak_pss_mb, pss / MB)
            run.peak_rss_mb = max(run.peak_rss_mb, rss / MB)
            run.peak_processes = max(run.peak_processes, count)
            time.sleep(interval)
    run.wall_s = time.perf_counter() - start
    run.load_after = os.getloadavg()[0]
    if proc.returncode != 0:
        tail = (out / "stdout.log").read_text()[-3000:]
        raise RuntimeError(f"run failed (exit {proc.returncode}); see {out / 'stdout.log'}:\n{tail}")
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    run.round_s = [float(r["round_s"]) for r in rows if int(r["round"]) >= 2]
    per_round: dict[int, int] = {}
    with (out / "clients.csv").open() as f:
        for r in csv.DictReader(f):
            per_round[int(r["round"])] = per_round.get(int(r["round"]), 0) + int(r["samples"] or 0)
    run.samples = [per_round.get(int(r["round"]), 0) for r in rows if int(r["round"]) >= 2]
    run.final_acc = float(next(r["test_acc"] for r in reversed(rows) if r["test_acc"] != ""))
    print(
        f"   median {statistics.median(run.round_s):.3f} s/round, peak PSS {run.peak_pss_mb:.0f} MB "
        f"({run.peak_processes} processes), accuracy {run.final_acc:.4f}, {run.wall_s:.0f} s",
        flush=True,
    )
    return run


def driver_cost(num_clients: int, rounds: int = 50) -> dict[str, float]:
    """CPU ms: building the partition; planning a round (static, dynamic membership); clients 0-99's data."""
    from raypfl.config import ClientsSpec, FaultsSpec
    from raypfl.data.synthetic import SyntheticPartition, SyntheticSpec
    from raypfl.driver.planning import RoundPlanner

    clock = time.process_time
    start = clock()
    part = SyntheticPartition(SyntheticSpec(max_size=1000), num_clients, seed=0)
    out = {"build_ms": 1e3 * (clock() - start)}
    for label, faults in (("plan_ms", FaultsSpec()), ("plan_dynamic_ms", FaultsSpec(evict_after=3))):
        planner = RoundPlanner(
            ClientsSpec(num=num_clients, per_round=min(100, num_clients)), faults, seed=0, parallelism=2
        )
        start = clock()
        for round_idx in range(1, rounds + 1):
            sizes = [part.size(c) for c in planner.plan(round_idx).cohort]
        out[label] = 1e3 * (clock() - start) / rounds
    start = clock()
    samples = sum(len(part.client_data(c)[1]) for c in range(100))
    out["data_ms"] = 1e3 * (clock() - start)
    assert sizes and samples
    return out


def summarize(runs: list[Run]) -> list[dict]:
    """One row per (runtime, clients): steady rounds of all repeats pooled."""
    rows = []
    for key in dict.fromkeys((r.runtime, r.clients) for r in runs):
        group = [r for r in runs if (r.runtime, r.clients) == key]
        times = [t for r in group for t in r.round_s]
        samples = [n for r in group for n in r.samples]
        rows.append(
            {
                "runtime": key[0],
                "clients": key[1],
                "runs": len(group),
                "steady_rounds": len(times),
                "median_round_s": round(statistics.median(times), 4),
                "min_round_s": round(min(times), 4),
                "max_round_s": round(max(times), 4),
                "samples_per_round": round(statistics.mean(samples)),
                "peak_pss_mb": round(max(r.peak_pss_mb for r in group), 1),
                "peak_rss_mb": round(max(r.peak_rss_mb for r in group), 1),
                "peak_processes": max(r.peak_processes for r in group),
                "final_acc": round(statistics.mean(r.final_acc for r in group), 4),
                "wall_s": round(statistics.mean(r.wall_s for r in group), 1),
                "load_avg": round(statistics.mean((r.load_before + r.load_after) / 2 for r in group), 2),
            }
        )
    return rows


def ratios(rows: list[dict], small: int, large: int) -> dict[str, float]:
    """Median round time of `large` clients over that of `small`, per runtime."""
    out = {}
    for runtime in dict.fromkeys(r["runtime"] for r in rows):
        by_n = {r["clients"]: r["median_round_s"] for r in rows if r["runtime"] == runtime}
        if small in by_n and large in by_n:
            out[runtime] = by_n[large] / by_n[small]
    return out


def write_results(rows: list[dict], small: int, large: int, setting: str, costs: dict[int, dict]) -> str:
    RESULTS.mkdir(parents=True, exist_ok=True)
    with (RESULTS / "synthetic_scale.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    peak = max(r["peak_pss_mb"] for r in rows)
    lines = [
        "| runtime | clients | median s/round | min | max | samples/round | peak memory MB (PSS) | "
        "peak RSS MB | final accuracy | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *(
            f"| {r['runtime']} | {r['clients']:,} | {r['median_round_s']:.3f} | {r['min_round_s']:.3f} | "
            f"{r['max_round_s']:.3f} | {r['samples_per_round']:,} | {r['peak_pss_mb']:.0f} | "
            f"{r['peak_rss_mb']:.0f} | "
            f"{100 * r['final_acc']:.2f}% | {r['load_avg']:.1f} |"
            for r in rows
        ),
        "",
    ]
    for runtime, ratio in ratios(rows, small, large).items():
        ok = "meets" if ratio <= TARGET_RATIO else "misses"
        lines.append(
            f"Round time {large:,} / {small:,} clients ({runtime}): **{ratio:.2f}** ({ok} the target <= "
            f"{TARGET_RATIO})."
        )
    ok = "meets" if peak <= TARGET_MEMORY_MB else "misses"
    lines += [
        f"Peak memory of the whole process tree: {peak:.0f} MB PSS "
        f"({ok} the target <= {TARGET_MEMORY_MB} MB).",
        "",
        "CPU time in one process (ms; N-dependence without the load noise):",
        "",
        "| clients | build partition | plan a round | plan, dynamic membership | data of clients 0-99 |",
        "|---|---|---|---|---|",
        *(
            f"| {n:,} | {c['build_ms']:.1f} | {c['plan_ms']:.2f} | {c['plan_dynamic_ms']:.2f} | "
            f"{c['data_ms']:.1f} |"
            for n, c in costs.items()
        ),
        "",
        f"Setting: {setting}. Round times are medians over rounds 2.. (round 1 pays first-call imports), "
        "pooled over repeats; memory is the sum of PSS (RSS: upper bound) over the run's process and all its "
        "descendants (Ray's GCS, raylet, actors), sampled every 0.5 s. Accuracy: Synthetic(1, 1)'s clients "
        "have independent label models, so a "
        "global model is near chance (10%) on clients it has not trained on; see README.",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GB, python {platform.python_version()}; "
        "load avg is the 1-min load average around each run (the machine may be shared).",
    ]
    text = "\n".join(lines) + "\n"
    (RESULTS / "synthetic_scale.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs=2, default=[1000, 100_000], metavar=("SMALL", "LARGE"))
    parser.add_argument("--runtimes", nargs="+", default=["ray", "sequential"], choices=["ray", "sequential"])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--retries", type=int, default=1, help="re-runs of a failed run")
    parser.add_argument("--interval", type=float, default=0.5, help="memory sampling period (s)")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "synthetic_scale")
    args = parser.parse_args(argv)
    small, large = args.clients
    driver_cost(100)  # warm-up: first calls pay imports and numpy's set-up
    costs = {n: driver_cost(n) for n in (small, large)}
    runs = []
    for repeat in range(args.repeats):
        for runtime in args.runtimes:
            for clients in (small, large) if repeat % 2 == 0 else (large, small):
                run = Run(runtime, clients, repeat)
                where = args.out / f"{runtime}_{clients}_r{repeat}"
                for attempt in range(args.retries + 1):  # a shared machine: someone may stop our Ray
                    try:
                        runs.append(run_one(run, args.rounds, where, extra, args.interval))
                        break
                    except RuntimeError as exc:
                        if attempt == args.retries:
                            raise SystemExit(str(exc)) from None
                        print(f"   {str(exc).splitlines()[0]}: retrying", flush=True)
                        run = Run(runtime, clients, repeat)
    setting = (
        f"+experiment=synthetic_scale (Synthetic(1, 1), logreg, 100 clients per round, batch 10, 1 local "
        f"epoch), {args.rounds} rounds, {args.repeats} repeat(s)" + (f", {' '.join(extra)}" if extra else "")
    )
    text = write_results(summarize(runs), small, large, setting, costs)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
