"""Where a Ray round's time goes, from Ray's own task timeline: are the cores busy, and with what?

    python benchmarks/round_timeline.py                  # mlp and cnn, workload W, 2 actors
    python benchmarks/round_timeline.py --models cnn --rounds 6

It runs workload W (benchmarks/workload.py) with `runtime=ray` on a Ray it starts itself (2 CPUs, no
dashboard), reads `ray.timeline()` (every actor task's start and duration, recorded by the workers) and,
over the steady rounds (after the first, which pays torch's one-off warm-up), reports per client actor:
the seconds of a round it spends training, evaluating, in other tasks, and idle (waiting for the other
actor, the parameter server or the driver). A core is idle exactly when its actor is, since each actor is
pinned to one of the 2 CPUs. Results: benchmarks/results/round_timeline.{md,csv}.
"""

from __future__ import annotations

import argparse
import collections
import csv
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))
os.environ.setdefault("RAYPFL_DATA", str(REPO.parent / "shared" / "data"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("WANDB_MODE", "offline")

import workload  # noqa: E402

KINDS = ("train_cohort", "evaluate")


def run(model: str, rounds: int) -> list[dict]:
    """One run of W on Ray; per steady round and actor: seconds training, evaluating, other, idle."""
    import ray
    from hydra import compose, initialize_config_dir

    from raypfl.driver.experiment import run_experiment

    w = workload.Workload(model=model, rounds=rounds)
    overrides = [*w.overrides(), "runtime=ray", "runtime.address=auto", "runtime.warm_start=false"]
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=400 * 2**20)
    try:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        start = time.time()
        result = run_experiment(cfg, Path(tempfile.mkdtemp(prefix="timeline_")))
        wall = time.time() - start
        events = ray.timeline()
    finally:
        ray.shutdown()
    return summarise(events, model, result.rounds, wall)


def summarise(events: list[dict], model: str, rounds: list[dict], wall: float) -> list[dict]:
    """Cut each client actor's task spans into rounds (a round ends with its evaluation) and add them up."""
    spans: dict[str, list[tuple[float, float, str]]] = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("name") in (*KINDS, "push", "round_summary", "pull"):
            spans[e["tid"]].append((e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6, e["name"]))
    actors = {t: sorted(s) for t, s in spans.items() if any(n == "train_cohort" for *_, n in s)}
    # round k ends when the last actor finishes evaluating it (every round is evaluated, one part per actor)
    evals = [[end for _, end, n in s if n == "evaluate"] for s in actors.values()]
    bounds = [max(ends) for ends in zip(*evals)]
    rows = []
    for k in range(1, len(bounds)):  # steady rounds: the first round (warm-up) is left out
        lo, hi = bounds[k - 1], bounds[k]
        for a, (_, s) in enumerate(sorted(actors.items())):
            busy = collections.Counter()
            for start, end, name in s:
                overlap = min(end, hi) - max(start, lo)
                if overlap > 0:
                    busy[name if name in KINDS else "other"] += overlap
            period = hi - lo
            rows.append(
                {
                    "model": model,
                    "round": k + 1,
                    "actor": a,
                    "period_s": round(period, 4),
                    "train_s": round(busy["train_cohort"], 4),
                    "eval_s": round(busy["evaluate"], 4),
                    "other_s": round(busy["other"], 4),
                    "idle_s": round(period - sum(busy.values()), 4),
                    "run_wall_s": round(wall, 2),
                }
            )
    return rows


def table(rows: list[dict]) -> str:
    """Medians over the steady rounds, per model and actor."""
    lines = [
        "| model | actor | s/round (median) | training | evaluation | other tasks | idle | idle share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups = collections.defaultdict(list)
    for r in rows:
        groups[(r["model"], r["actor"])].append(r)
    for (model, actor), rs in groups.items():
        med = {
            k: statistics.median(r[k] for r in rs)
            for k in ("period_s", "train_s", "eval_s", "other_s", "idle_s")
        }
        share = sum(r["idle_s"] for r in rs) / sum(r["period_s"] for r in rs)
        lines.append(
            f"| {model} | {actor} | {med['period_s']:.3f} | {med['train_s']:.3f} | {med['eval_s']:.3f} | "
            f"{med['other_s']:.3f} | {med['idle_s']:.3f} | {100 * share:.1f}% |"
        )
    return "\n".join(lines)


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    rows = [row for model in args.models for row in run(model, args.rounds)]
    RESULTS.mkdir(exist_ok=True)
    with (RESULTS / "round_timeline.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    header = (
        f"W on runtime=ray (2 actors, warm_start=false), steady rounds 2..{args.rounds}, from ray.timeline()"
        ". "
        f"Machine: {os.cpu_count()} CPUs, {cpu_model()}, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d %H:%M')}.\n\n"
    )
    text = header + table(rows) + "\n"
    (RESULTS / "round_timeline.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
