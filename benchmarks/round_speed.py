"""Round speed: the reference workload W on raypfl's runtimes, the plain-loop floor, Flower and pfl.

    python benchmarks/round_speed.py                         # mlp and cnn, every implementation installed
    python benchmarks/round_speed.py --models mlp --rounds 12 --impls floor ray ray_vec flower
    pip install -e '.[bench]'                                # adds Flower and pfl to the comparison

Each implementation runs W (see workload.py) in its own fresh process, one after another and interleaved
(model by model, `--repeats` times), so machine drift hits them alike. Per run it records: seconds from
process start to the end of round 1, steady-state seconds per round (the gaps between the ends of
consecutive rounds 2..N, each round including its central evaluation: median, min, max), final accuracy,
and peak memory of the whole process tree (sum of PSS over the process and all its descendants, sampled
every 0.25 s; PSS splits shared pages such as Ray's object store fairly between processes). On Ray, warm
start (`runtime.warm_start`, on as for users) trains the first rounds in the driver while the actor pool
boots: round 1 is timed as users get it, but the steady state of a Ray row counts only rounds on the pool,
after its hand-over round (`driver_rounds`: how many the driver trained). If the pool took over too late to
leave a steady round (a fast machine: the driver may train every round), the steady state comes from a
second run with `runtime.warm_start=false` (`cold_rerun`). Results go to
benchmarks/results/round_speed.{md,csv}. All implementations share data, partition, initial weights,
cohorts and shuffles, so their accuracies must agree: that is the check that they do the same arithmetic.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))
import workload  # noqa: E402

#: name -> (description, how it is launched, the module it needs)
IMPLS: dict[str, tuple[str, str, str | None]] = {
    "floor": ("plain PyTorch loop, 1 process, 1 thread", "script:impl_floor.py", None),
    "sequential": ("raypfl runtime=sequential", "raypfl:runtime=sequential", None),
    "ray": ("raypfl runtime=ray (2 actors)", "raypfl:runtime=ray", None),
    "sequential_vec": (
        "raypfl runtime=sequential runtime.vectorize=true",
        "raypfl:runtime=sequential runtime.vectorize=true",
        None,
    ),
    "ray_vec": (
        "raypfl runtime=ray runtime.vectorize=true",
        "raypfl:runtime=ray runtime.vectorize=true",
        None,
    ),
    "flower": ("Flower simulation (Ray backend, 2 clients at once)", "script:impl_flower.py", "flwr"),
    "pfl": ("pfl-research simulation (1 process)", "script:impl_pfl.py", "pfl"),
}
DEFAULT_IMPLS = ["floor", "sequential", "ray", "sequential_vec", "ray_vec", "flower", "pfl"]
ACCURACY_AGREEMENT = 0.01  # final accuracies within 1 point of the floor's


@dataclass
class Run:
    impl: str
    model: str
    repeat: int
    first_round_s: float
    median_s: float
    min_s: float
    max_s: float
    final_acc: float
    peak_mb: float
    rounds: int
    wall_s: float
    load: float = 0.0  # 1-minute load average at the end of the run (other work on the machine)
    driver_rounds: int = 0  # Ray: rounds the warm-start driver trained before the actor pool took over
    cold_rerun: bool = False  # Ray: steady state from a second run with runtime.warm_start=false

    def warm_start_note(self) -> str:
        note = f", {self.driver_rounds} round(s) in the warm-start driver" if self.driver_rounds else ""
        return note + (" (steady state from a runtime.warm_start=false run)" if self.cold_rerun else "")

    def row(self, floor: Run | None) -> dict:
        return {
            "model": self.model,
            "impl": self.impl,
            "repeat": self.repeat,
            "round1_s": round(self.first_round_s, 2),
            "median_s": round(self.median_s, 4),
            "min_s": round(self.min_s, 4),
            "max_s": round(self.max_s, 4),
            "vs_floor": round(self.median_s / floor.median_s, 3) if floor else "",
            "final_acc": round(self.final_acc, 4),
            "peak_mb": round(self.peak_mb),
            "rounds": self.rounds,
            "load": round(self.load, 1),
            "driver_rounds": self.driver_rounds,
            "cold_rerun": self.cold_rerun,
        }


class PeakMemory:
    """Samples the summed PSS (MB) of a process and all its descendants until stopped."""

    def __init__(self, pid: int, interval: float = 0.25):
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _sample(self) -> float:
        total = 0
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return 0.0
        for proc in procs:
            with contextlib.suppress(psutil.Error):  # it may end between listing and reading
                total += proc.memory_full_info().pss
        return total / 2**20

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def available(impl: str) -> bool:
    module = IMPLS[impl][2]
    return module is None or importlib.util.find_spec(module) is not None


def is_ray(impl: str) -> bool:
    return IMPLS[impl][1].startswith("raypfl:runtime=ray")


def command(impl: str, w: workload.Workload, out: Path, extra: tuple[str, ...] = ()) -> list[str]:
    kind, _, what = IMPLS[impl][1].partition(":")
    if kind == "script":
        flags = ["--model", w.model, "--rounds", str(w.rounds), "--seed", str(w.seed), "--out", str(out)]
        if w.train_limit:
            flags += ["--train-limit", str(w.train_limit)]
        if w.test_limit:
            flags += ["--test-limit", str(w.test_limit)]
        return [sys.executable, str(HERE / what), *flags]
    run_dir = f"hydra.run.dir={out.parent}"
    return [sys.executable, "-m", "raypfl", *w.overrides(), *what.split(), *extra, run_dir]


def read_rounds(impl: str, out: Path) -> list[dict]:
    """[(round, t since process start, test_acc)] from the implementation's JSON or raypfl's metrics.csv."""
    if IMPLS[impl][1].startswith("script:"):
        return json.loads(out.read_text())["rounds"]
    with open(out.parent / "metrics.csv") as f:
        return [
            {"round": int(r["round"]), "t": float(r["wall_s"]), "test_acc": float(r["test_acc"])}
            for r in csv.DictReader(f)
        ]


def driver_rounds(impl: str, log_text: str) -> int | None:
    """Rounds a Ray run trained in the warm-start driver before its actor pool took over (0: none, or not
    Ray); None if the pool never took over (every round trained in the driver)."""
    if not is_ray(impl):
        return 0
    took_over = re.search(r"the driver trained the first (\d+) round", log_text)
    if took_over:
        return int(took_over.group(1))
    if "ray runtime: " in log_text:  # the pool was up before round 1 (runtime.warm_start=false)
        return 0
    return None


def steady_gaps(ends: list[float], driver: int) -> list[float]:
    """Round times (gaps between round ends) of rounds 2..N; after a warm start only the pool's rounds after
    its hand-over round `driver + 1` (which also pays the actors' first calls)."""
    first = max(2, driver + 2)
    return [ends[k - 1] - ends[k - 2] for k in range(first, len(ends) + 1)]


def execute(impl: str, w: workload.Workload, out: Path, extra: tuple[str, ...] = ()):
    """Run one implementation in a fresh process: (its rounds by end time, its output, peak memory MB)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled", "WANDB_MODE": "disabled"}
    log_path = out.parent / "output.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            command(impl, w, out, extra), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        memory = PeakMemory(proc.pid)
        code = proc.wait()
        peak = memory.stop()
    if code != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"{impl} ({w.model}) exited with {code}; last lines of {log_path}:\n{tail}")
    return sorted(read_rounds(impl, out), key=lambda r: r["round"]), log_path.read_text(), peak


def run_one(impl: str, w: workload.Workload, repeat: int, scratch: Path) -> Run:
    started = time.time()
    rounds, log_text, peak = execute(impl, w, scratch / f"{impl}-{w.model}-{repeat}" / "clock.json")
    ends = [r["t"] for r in rounds]
    driver = driver_rounds(impl, log_text)
    gaps = steady_gaps(ends, len(ends) if driver is None else driver)
    cold = False
    if not gaps and is_ray(impl) and len(ends) >= 2:
        # the pool took over too late (or never: a fast machine): time Ray's rounds without warm start
        cold_out = scratch / f"{impl}-{w.model}-{repeat}-cold" / "clock.json"
        cold_rounds, _, cold_peak = execute(impl, w, cold_out, ("runtime.warm_start=false",))
        gaps = steady_gaps([r["t"] for r in cold_rounds], 0)
        peak, cold = max(peak, cold_peak), True
    if not gaps:
        raise RuntimeError(
            f"{impl} ({w.model}): {len(ends)} round(s) leave no steady-state round: use --rounds >= 2"
        )
    return Run(
        impl,
        w.model,
        repeat,
        ends[0],
        statistics.median(gaps),
        min(gaps),
        max(gaps),
        rounds[-1]["test_acc"],
        peak,
        len(rounds),
        time.time() - started,
        os.getloadavg()[0],
        len(ends) if driver is None else driver,
        cold,
    )


def summarise(runs: list[Run]) -> list[dict]:
    """One row per (model, impl): the median over repeats, with its ratio to the same model's floor."""
    rows = []
    for model in dict.fromkeys(r.model for r in runs):
        by_impl: dict[str, list[Run]] = {}
        for r in runs:
            if r.model == model:
                by_impl.setdefault(r.impl, []).append(r)
        merged = {impl: _median_run(rs) for impl, rs in by_impl.items()}
        floor = merged.get("floor")
        rows += [merged[impl].row(floor) for impl in merged]
    return rows


def _median_run(runs: list[Run]) -> Run:
    mid = sorted(runs, key=lambda r: r.median_s)[len(runs) // 2]
    return Run(
        mid.impl,
        mid.model,
        len(runs),
        statistics.median(r.first_round_s for r in runs),
        mid.median_s,
        min(r.min_s for r in runs),
        max(r.max_s for r in runs),
        mid.final_acc,
        max(r.peak_mb for r in runs),
        mid.rounds,
        mid.wall_s,
        max(r.load for r in runs),
        mid.driver_rounds,
        any(r.cold_rerun for r in runs),
    )


def agreement(rows: list[dict]) -> list[str]:
    """Implementations whose final accuracy strays from the floor's (same arithmetic should agree)."""
    problems = []
    for row in rows:
        floor = next((r for r in rows if r["model"] == row["model"] and r["impl"] == "floor"), None)
        if floor and abs(row["final_acc"] - floor["final_acc"]) > ACCURACY_AGREEMENT:
            problems.append(
                f"{row['impl']} ({row['model']}): {row['final_acc']} vs floor {floor['final_acc']}"
            )
    return problems


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    head = (
        "| model | implementation | to end of round 1 (s) | s/round median | min | max | / floor "
        "| final acc | peak memory (MB) | load |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r['model']} | {r['impl']} | {r['round1_s']} | {r['median_s']} | {r['min_s']} | {r['max_s']} "
        f"| {r['vs_floor']} | {r['final_acc']:.4f} | {r['peak_mb']} | {r['load']} |\n"
        for r in rows
    )
    cpu = psutil.cpu_count()
    info = (
        f"W: MNIST, 100 IID clients x 600, 10 per round, E=1, B=10, SGD lr 0.05, central eval every round; "
        f"{args.rounds} rounds, {args.repeats} repeat(s); steady state = gaps between round ends 2..N "
        "(Ray: only rounds on the actor pool after the warm-start hand-over round, or, if none, from a run "
        "with runtime.warm_start=false: see driver_rounds and cold_rerun in the CSV). "
        f"Machine: {cpu} CPUs, {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M')}.\n\n"
    )
    return info + head + body


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--impls", nargs="+", default=DEFAULT_IMPLS, choices=list(IMPLS))
    parser.add_argument("--rounds", type=int, default=12, help="rounds per run (steady state: rounds 2..N)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--train-limit", type=int, default=None, help="quick runs only")
    parser.add_argument("--test-limit", type=int, default=None, help="quick runs only")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where round_speed.{md,csv} go")
    args = parser.parse_args(argv)
    impls = [i for i in args.impls if available(i)]
    for missing in sorted(set(args.impls) - set(impls)):
        print(f"skipping {missing}: {IMPLS[missing][2]} is not installed (pip install -e '.[bench]')")
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="round_speed-") as tmp:
        for repeat in range(args.repeats):
            for model in args.models:
                w = workload.Workload(
                    model=model, rounds=args.rounds, train_limit=args.train_limit, test_limit=args.test_limit
                )
                for impl in impls:
                    run = run_one(impl, w, repeat, Path(tmp))
                    runs.append(run)
                    print(
                        f"{model:4} {impl:15} round 1 at {run.first_round_s:6.1f} s, "
                        f"{run.median_s:7.3f} s/round (min {run.min_s:.3f}, max {run.max_s:.3f}), "
                        f"acc {run.final_acc:.4f}, peak {run.peak_mb:,.0f} MB{run.warm_start_note()}",
                        flush=True,
                    )
    rows = summarise(runs)
    args.results.mkdir(parents=True, exist_ok=True)
    with open(args.results / "round_speed.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows, args)
    problems = agreement(rows)
    if problems:
        table += "\nAccuracy disagrees with the floor: " + "; ".join(problems) + "\n"
    (args.results / "round_speed.md").write_text(table)
    print(table)
    return rows


if __name__ == "__main__":
    main()
