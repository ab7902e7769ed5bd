"""Time to accuracy on a virtual clock: synchronous FedAvg (all, a deadline, over-selection) vs FedBuff.

    python benchmarks/virtual_clock.py --jobs 2               # 5 schemes, seed 0     (~4 min on 2 cores)
    python benchmarks/virtual_clock.py --jobs 2 --seeds 0 1 2 # 3 device populations  (~11 min)
    python benchmarks/virtual_clock.py --jobs 2 --ray         # + FedBuff vs FedAvg on 2 Ray actors (+4 min)
    python benchmarks/virtual_clock.py --ray-only             # only the Ray runs (the rest from its folders)
    python benchmarks/virtual_clock.py --collect --ray        # only rebuild the tables from the runs' folders
    python benchmarks/virtual_clock.py -- optim.lr=0.05       # extra overrides for every run, after --

MNIST, `mlp`, 1,000 IID clients (60 images each), `clock.name=virtual` with lognormal device speeds and
bandwidths (sigma 1), the same number of clients training at once in every scheme (`--cohort`, 20) and the
same budget of client updates (`--updates`, 4,000: a synchronous round aggregates up to `--cohort` of them, a
FedBuff step `--buffer`). Schemes:

- sync: FedAvg waits for its whole cohort (the round lasts as long as its slowest client);
- deadline: FedAvg with a deadline as FedScale runs it: `faults.round_timeout_s` = the `--deadline-pct`
  percentile of the devices' durations, `faults.quorum` 1.0 (wait for everyone until the deadline),
  `faults.deadline_quorum` 0.1 (then aggregate whoever answered in time, if at least 10% did) and
  `on_no_quorum=skip`;
- deadline_q0.5: the same deadline with `faults.quorum` 0.5 and no `deadline_quorum`: the round closes at
  its 10th answer, or is skipped at the deadline when fewer than 10 answered by then;
- over-select: FedAvg selecting 130% of the cohort and keeping the first `--cohort` to finish;
- fedbuff: FedBuff with concurrency `--cohort`, buffer `--buffer`, staleness 1/sqrt(1 + s).

Each run goes to OUT/seedS/SCHEME (default OUT: outputs/virtual_clock); the runtime is `sequential` (on the
virtual clock the model and the timeline do not depend on it). The script writes
benchmarks/results/virtual_clock.{csv,md,png}: per scheme the virtual hours to `--target` test accuracy,
the rounds (FedBuff: server steps) and client updates to it, the final accuracy, the virtual hours and
updates of the whole budget and the real seconds of the simulation; what explains the FedBuff-vs-sync ratio
(round and step times, throughput, staleness, from metrics.csv and clients.csv); and the accuracy against
virtual hours.

`--ray` adds a real-time measurement: sync FedAvg and FedBuff on `runtime=ray runtime.num_actors=2`
(still `clock.name=virtual`, so both are the same runs as above), a budget of `--ray-updates` client updates,
one run at a time (whatever `--jobs`), `--ray-repeats` times each: real seconds, client updates per second
of training wall time (round 1's start to the last round's end) and the actors' utilisation (see the md for
the definitions); the machine's load average and busy cores before each run are recorded.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere: the checkout's raypfl
    sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results"
NAME = "virtual_clock"

#: Device medians: an MNIST client's 60 images take ~6 s to train once at 10 samples/s; the mlp's 0.8 MB
#: take ~0.6 s down at 10 Mbit/s and ~3.2 s up at 2 Mbit/s (+0.1 s latency each way): compute ~60% and
#: communication ~40% of an average client's time, both spread by lognormal factors of sigma 1.
CLOCK = {
    "compute_sps": 10.0,
    "compute_sigma": 1.0,
    "down_mbps": 10.0,
    "up_mbps": 2.0,
    "bandwidth_sigma": 1.0,
    "latency_s": 0.1,
}
CLIENTS = 1000
TRAIN = {"local_epochs": 1, "batch_size": 10}
LR = 0.1
COMMON = [
    "dataset=mnist",
    "model=mlp",
    "partition=iid",
    f"clients.num={CLIENTS}",
    "clock.name=virtual",
    *(f"clock.{k}={v}" for k, v in CLOCK.items()),
    *(f"train.{k}={v}" for k, v in TRAIN.items()),
    f"optim.lr={LR}",
    "train.checkpoint_every=0",
]
#: Column names of the per-seed table
SHORT = {
    "sync": "sync",
    "deadline": "deadline (in time)",
    "deadline_q0.5": "10th answer or skip",
    "overselect": "over-select 1.3",
    "fedbuff": "FedBuff",
}


@dataclass
class Scheme:
    key: str
    label: str
    overrides: list[str]
    rounds: int  # rounds, or FedBuff's server steps
    eval_every: int
    asynchronous: bool = False


@dataclass
class Population:
    """The federation's devices as the driver times them: every client's duration, and its compute part."""

    durations: np.ndarray
    compute: np.ndarray
    model_bytes: int

    def percentile(self, pct: float) -> float:
        return round(float(np.percentile(self.durations, pct)), 1)

    def within(self, seconds: float) -> float:
        """The devices' fraction that answer within `seconds`."""
        return float(np.mean(self.durations <= seconds))


def population(seed: int) -> Population:
    """Client durations as the driver computes them: the IID partition gives every client 60000 / 1000
    images, the mlp's float32 weights go down and its update (the same size) comes up."""
    from raypfl.clock import build_profiles
    from raypfl.config import ClockSpec
    from raypfl.models.zoo import build_model, count_parameters

    model_bytes = 4 * count_parameters(build_model("mlp"))
    profiles = build_profiles(ClockSpec(name="virtual", **CLOCK), CLIENTS, seed)
    samples = TRAIN["local_epochs"] * 60000 // CLIENTS
    durations = [profiles.duration(c, samples, model_bytes, model_bytes) for c in range(CLIENTS)]
    return Population(np.array(durations), samples / profiles.compute_sps, model_bytes)


def schemes(args: argparse.Namespace, deadline: float, on_time: float) -> list[Scheme]:
    """The schemes, each with the rounds that spend about `args.updates` client updates and an evaluation
    about every `args.eval_updates` updates. `on_time`: the devices' fraction whose duration is within the
    deadline (the classic deadline round aggregates `on_time` x cohort of its clients on average)."""
    cohort, buffer, budget = args.cohort, args.buffer, args.updates

    def every(per_round: int) -> int:
        return max(1, round(args.eval_updates / per_round))

    out = [
        Scheme(
            "sync",
            f"FedAvg, waits for all {cohort}",
            [f"clients.per_round={cohort}"],
            budget // cohort,
            every(cohort),
        )
    ]
    expected = max(1.0, on_time * cohort)  # answers per classic deadline round, on average
    out.append(
        Scheme(
            "deadline",
            f"FedAvg, deadline {deadline:g} s (whoever answered in time)",
            [
                f"clients.per_round={cohort}",
                f"faults.round_timeout_s={deadline}",
                "faults.quorum=1.0",
                "faults.deadline_quorum=0.1",
                "faults.on_no_quorum=skip",
            ],
            round(budget / expected),
            every(round(expected)),
        )
    )
    need = math.ceil(0.5 * cohort - 1e-9)
    out.append(
        Scheme(
            "deadline_q0.5",
            f"FedAvg, deadline {deadline:g} s, quorum 0.5 (closes at the {need}th answer, or skipped at "
            "the deadline)",
            [
                f"clients.per_round={cohort}",
                f"faults.round_timeout_s={deadline}",
                "faults.quorum=0.5",
                "faults.on_no_quorum=skip",
            ],
            budget // need,
            every(need),
        )
    )
    selected = math.ceil(1.3 * cohort)
    out.append(
        Scheme(
            "overselect",
            f"FedAvg, over-selection 1.3 (first {cohort} of {selected})",
            [f"clients.per_round={cohort}", "clients.over_select=1.3"],
            budget // cohort,
            every(cohort),
        )
    )
    out.append(
        Scheme(
            "fedbuff",
            f"FedBuff, concurrency {cohort}, K={buffer}",
            [
                "algorithm=fedbuff",
                f"algorithm.concurrency={cohort}",
                f"algorithm.buffer_size={buffer}",
                "algorithm.staleness=polynomial",
            ],
            budget // buffer,
            every(buffer),
            asynchronous=True,
        )
    )
    return out


def busy_cores(seconds: float = 2.0) -> float:
    """Cores busy (all processes) over the next `seconds`, from /proc/stat; NaN where there is none."""

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except OSError:
        return float("nan")
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / max(1, total1 - total0))


def run(overrides: list[str], out: Path, quiet: bool) -> float:
    """One `python -m raypfl` run into `out`; returns its real seconds (also saved as out/real_s.txt)."""
    command = [sys.executable, "-m", "raypfl", *overrides, f"hydra.run.dir={out}", "overwrite=true"]
    print("$", " ".join(command[1:]), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    loadavg = " ".join(f"{v:.2f}" for v in os.getloadavg())  # 1, 5, 15 min, as `uptime` shows them
    load = busy_cores()  # the machine is shared: what else was running
    start = time.perf_counter()
    if quiet:
        with open(out.parent / f"{out.name}.log", "w") as log:
            subprocess.run(command, cwd=REPO, check=True, stdout=log, stderr=subprocess.STDOUT)
    else:
        subprocess.run(command, cwd=REPO, check=True)
    seconds = time.perf_counter() - start
    (out / "real_s.txt").write_text(f"{seconds:.2f}\n")
    (out / "load.txt").write_text(f"{load:.2f}\n")
    (out / "loadavg.txt").write_text(loadavg + "\n")
    return seconds


def finished(out: Path, rounds: int) -> bool:
    """The run in `out` logged all its rounds (and the script timed it)."""
    metrics = out / "metrics.csv"
    return (out / "real_s.txt").exists() and metrics.exists() and len(read_csv(metrics)) == rounds


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def real_seconds(out: Path, rows: list[dict[str, str]]) -> float:
    """The run's real seconds as the script measured them, else the process's own `wall_s`."""
    saved = out / "real_s.txt"
    return float(saved.read_text()) if saved.exists() else float(rows[-1]["wall_s"])


def summarize(scheme: Scheme, out: Path, target: float, deadline: float) -> dict:
    """One scheme's row of the time-to-accuracy table, and what explains it (from both CSVs)."""
    rows = read_csv(out / "metrics.csv")
    clients = [r for r in read_csv(out / "clients.csv") if r["status"] in ("ok", "late")]
    updates = np.cumsum([int(r["clients"]) for r in rows])
    hit = next((i for i, r in enumerate(rows) if r["test_acc"] and float(r["test_acc"]) >= target), None)
    virtual = [float(r["virtual_s"]) for r in rows]
    steps = np.diff([0.0, *virtual])
    aggregated = [r for r in clients if r["status"] == "ok" and int(rows[int(r["round"]) - 1]["clients"])]
    record = {
        "scheme": scheme.label,
        "key": scheme.key,
        "target_h": round(virtual[hit] / 3600, 3) if hit is not None else "",
        "rounds_to_target": int(rows[hit]["round"]) if hit is not None else "",
        "updates_to_target": int(updates[hit]) if hit is not None else "",
        "final_acc": float(rows[-1]["test_acc"]),
        "total_h": round(virtual[-1] / 3600, 3),
        "rounds": len(rows),
        "updates": int(updates[-1]),
        "real_s": round(real_seconds(out, rows), 1),
        # what explains it
        "round_virtual_s": round(float(np.mean(steps)), 2),
        "updates_per_h": round(updates[-1] / (virtual[-1] / 3600)),
        "client_s_mean": round(float(np.mean([float(r["virtual_s"]) for r in aggregated])), 2),
        "skipped": sum(r["quorum"] == "0" for r in rows),
        "trained_discarded": sum(r["status"] == "ok" for r in clients) - int(updates[-1]),
        "distinct_clients": len({r["client"] for r in aggregated}),
    }
    if not scheme.asynchronous:  # a synchronous round: the slowest kept client closes it (or the deadline)
        cohort = {}
        for r in clients:
            cohort.setdefault(int(r["round"]), []).append(float(r["virtual_s"]))
        record["cohort_max_s"] = round(float(np.mean([max(d) for d in cohort.values()])), 2)
        record["cohort_mean_s"] = round(float(np.mean([d for ds in cohort.values() for d in ds])), 2)
        applied = [int(r["clients"]) for r in rows if r["quorum"] != "0"]  # updates per applied round
        record["answers_mean"] = round(float(np.mean(applied)), 2) if applied else ""
        record["answers_min"] = min(applied, default="")
        record["answers_max"] = max(applied, default="")
        record["late_mean"] = round(float(np.mean([int(r["late"]) for r in rows])), 2)
        if any(o.startswith("faults.round_timeout_s=") for o in scheme.overrides):
            record["closed_at_deadline"] = sum(float(r["round_virtual_s"]) == deadline for r in rows)
    else:
        lag = np.array([int(r["staleness"]) for r in aggregated])
        record.update(
            staleness_mean=round(float(lag.mean()), 2),
            staleness_p50=int(np.percentile(lag, 50)),
            staleness_p90=int(np.percentile(lag, 90)),
            staleness_max=int(lag.max()),
            weight_mean=round(float(np.mean(1 / np.sqrt(1 + lag))), 3),
            staleness_hist={int(s): int((lag == s).sum()) for s in np.unique(lag)},
        )
    return record | {
        "curve": [(v / 3600, float(r["test_acc"])) for v, r in zip(virtual, rows) if r["test_acc"]]
    }


def summarize_ray(key: str, label: str, repeat: int, out: Path) -> dict:
    """One Ray run: real seconds, updates per second of training wall time, the two actors' utilisation.

    Training wall time runs from round 1's start to the last round's end (`wall_s` is cumulative process
    seconds): not the sum of `train_s`, since FedBuff's steps overlap (the driver runs ahead of the
    workers and collects a step's rows a step later, so a step's `train_s` spans from its submission to
    that collection)."""
    rows = read_csv(out / "metrics.csv")
    clients = [r for r in read_csv(out / "clients.csv") if r["status"] == "ok"]
    busy = sum(float(r["seconds"]) for r in clients)
    updates = sum(int(r["clients"]) for r in rows)
    start = float(rows[0]["wall_s"]) - float(rows[0]["round_s"])  # the first round's start, process seconds
    wall = float(rows[-1]["wall_s"]) - start
    saved = {name: (out / f"{name}.txt") for name in ("load", "loadavg")}
    return {
        "scheme": label,
        "key": key,
        "repeat": repeat,
        "rounds": len(rows),
        "updates": updates,
        "real_s": round(real_seconds(out, rows), 1),
        "startup_s": round(start, 1),
        "train_s": round(wall, 1),
        "train_s_sum": round(sum(float(r["train_s"]) for r in rows), 1),
        "round1_s": round(float(rows[0]["round_s"]), 2),
        "updates_per_s": round(updates / wall, 1),
        "updates_per_real_s": round(updates / real_seconds(out, rows), 1),
        "client_s": round(busy, 1),
        "client_ms_mean": round(1000 * busy / len(clients), 1),
        "server_s": round(sum(float(r["aggregate_s"]) for r in rows), 1),
        "utilisation": round(busy / (2 * wall), 3),
        "final_acc": float(rows[-1]["test_acc"]),
        "busy_cores_before": saved["load"].read_text().strip() if saved["load"].exists() else "",
        "loadavg_before": saved["loadavg"].read_text().strip() if saved["loadavg"].exists() else "",
    }


def ray_summary(records: list[dict]) -> list[str]:
    """The Ray table's upshot: updates per training-wall second of each scheme (median and range), and
    why."""

    def stat(key: str, column: str) -> tuple[float, float, float]:
        values = [float(r[column]) for r in records if r["key"] == key]
        return float(np.median(values)), min(values), max(values)

    rate = {key: stat(key, "updates_per_s") for key in ("sync", "fedbuff")}
    util = {key: stat(key, "utilisation")[0] for key in rate}
    ms = {key: stat(key, "client_ms_mean")[0] for key in rate}
    server = {key: stat(key, "server_s")[0] for key in rate}
    ratio = rate["fedbuff"][0] / rate["sync"][0]
    slower = "the slower" if ratio < 1 else "the faster"
    busy = {key: stat(key, "client_s")[0] for key in rate}
    first = next(r for r in records if r["key"] == "sync")
    tasks = {"sync": 2 * int(first["rounds"]), "updates": int(first["updates"])}  # 2 actors per round
    return [
        f"Updates per training-wall second, median (range): sync FedAvg {rate['sync'][0]:.0f} "
        f"({rate['sync'][1]:.0f}-{rate['sync'][2]:.0f}), FedBuff {rate['fedbuff'][0]:.0f} "
        f"({rate['fedbuff'][1]:.0f}-{rate['fedbuff'][2]:.0f}): {ratio:.2f}x; utilisation "
        f"{util['sync']:.2f} vs {util['fedbuff']:.2f}. In real time FedBuff is {slower} simulation. Both "
        "are CPU-bound (2 actors, the parameter server, the raylet and the driver on 2 cores), and FedBuff "
        "spends more CPU per update outside the clients' training: every update is its own actor task, its "
        "own 0.8 MB partial pushed to the parameter server and its own fold call there (server time "
        f"{server['fedbuff']:.1f} s vs {server['sync']:.1f} s), each dispatched and folded by the driver, "
        "while a synchronous round sends one task per actor, which sums its 10 clients into one partial "
        f"({tasks['sync']:,} training tasks and pushes for {tasks['updates']:,} updates instead of "
        f"{tasks['updates']:,}). That work competes with the "
        f"actors for the cores: a client's training takes {ms['fedbuff']:.1f} ms in FedBuff vs "
        f"{ms['sync']:.1f} ms in sync (medians of the runs' means; {busy['fedbuff']:.0f} vs "
        f"{busy['sync']:.0f} client seconds in all), and the utilisation counts those seconds as busy even "
        "while an actor waits for a core. FedBuff's asynchrony saves device (virtual) time, not simulator "
        "time.",
        "",
    ]


def command(out: Path, name: str) -> str:
    """The command line that ran the runs (saved in OUT), else the script's name."""
    saved = out / name
    return saved.read_text().strip() if saved.exists() else "python benchmarks/virtual_clock.py"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def hours(value: object) -> str:
    return "not reached" if value == "" else f"{float(value):.3f}"


def table(columns: list[tuple[str, str]], records: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for record in records:
        lines.append("| " + " | ".join(str(record.get(k, "")) for _, k in columns) + " |")
    return lines


def explain(args: argparse.Namespace, by_key: dict[str, dict], deadline: float, on_time: float) -> list[str]:
    """The md's account of the FedBuff-vs-sync ratio: throughput (round and step times) x statistical
    efficiency (updates to the target, staleness), and what the other schemes do."""
    sync, buff = by_key["sync"], by_key["fedbuff"]
    target = f"{100 * args.target:g}%"
    ratio = float(sync["target_h"]) / float(buff["target_h"])
    thr_s = sync["updates_to_target"] / float(sync["target_h"])
    thr_b = buff["updates_to_target"] / float(buff["target_h"])
    per_update = sync["updates_to_target"] / buff["updates_to_target"]
    fewer = "fewer" if per_update > 1 else "more"
    hist = list(buff["staleness_hist"].items())
    selected = math.ceil(1.3 * args.cohort)
    lines = [
        f"**FedBuff reaches {target} {ratio:.2f}x sooner than synchronous FedAvg** ({buff['target_h']:.3f} h "
        f"vs {sync['target_h']:.3f} h of virtual time). The ratio is exactly (updates sync needs / updates "
        "FedBuff needs) x (FedBuff's updates per virtual hour / sync's, both up to the target): "
        f"{sync['updates_to_target']}/{buff['updates_to_target']} x {thr_b:.0f}/{thr_s:.0f} = "
        f"{per_update:.2f} x {thr_b / thr_s:.2f}.",
        "",
        "Why (from `metrics.csv` and `clients.csv`):",
        "",
        *table(
            [
                ("scheme", "scheme"),
                ("mean round/step (virtual s)", "round_virtual_s"),
                ("mean duration of its clients (s)", "client_s_mean"),
                ("updates per virtual h", "updates_per_h"),
                ("updates per applied round", "answers_mean"),
                ("skipped rounds", "skipped"),
                ("trained, discarded", "trained_discarded"),
                ("distinct clients aggregated", "distinct_clients"),
            ],
            list(by_key.values()),
        ),
        "",
        "- Throughput. A synchronous round lasts as long as the slowest client it waits for: sync's rounds "
        f"average {sync['round_virtual_s']:.1f} s, the mean of the max of each cohort's durations "
        f"({sync['cohort_max_s']:.1f} s), while its clients average {sync['cohort_mean_s']:.1f} s "
        f"({sync['cohort_max_s'] / sync['cohort_mean_s']:.1f}x: the slowest of {args.cohort} lognormal "
        f"durations sits near their {100 * args.cohort / (args.cohort + 1):.0f}th percentile). FedBuff keeps "
        f"{args.cohort} clients busy all the time, so by Little's law it completes {args.cohort} / "
        f"{buff['client_s_mean']:.1f} s = {3600 * args.cohort / buff['client_s_mean']:.0f} updates per "
        f"virtual hour (measured {buff['updates_per_h']}), a server step every "
        f"{buff['round_virtual_s']:.1f} s; sync: {args.cohort} per {sync['round_virtual_s']:.1f} s = "
        f"{sync['updates_per_h']} per h, {buff['updates_per_h'] / sync['updates_per_h']:.2f}x fewer.",
        f"- Statistical efficiency. FedBuff's updates are stale: {buff['staleness_mean']} server steps on "
        f"average (median {buff['staleness_p50']}, 90th percentile {buff['staleness_p90']}, max "
        f"{buff['staleness_max']}: with {args.cohort} in flight and a step every {args.buffer} arrivals, a "
        f"typical client sees ~{args.cohort / args.buffer:g} steps go by, a slow one many more), weighted "
        f"1/sqrt(1+s) (mean weight {buff['weight_mean']}). Updates per staleness: "
        + ", ".join(f"{lag}: {n}" for lag, n in hist[:10])
        + (f", >= {hist[10][0]}: {sum(n for _, n in hist[10:])}" if len(hist) > 10 else "")
        + f". Still, FedBuff needed {fewer} updates than sync ({buff['updates_to_target']} vs "
        f"{sync['updates_to_target']}): it steps the server {args.cohort / args.buffer:g}x as often, each "
        f"step averaging {args.buffer} updates instead of {args.cohort}. On IID data a step of fewer "
        "updates is nearly as good as one of more (any client's update points the same way on average), "
        "so more, smaller, slightly stale steps win here; the FedBuff paper, on non-IID data, needs more "
        "updates than FedAvg and gains from throughput alone.",
    ]
    dl, half, over = (by_key.get(k) for k in ("deadline", "deadline_q0.5", "overselect"))
    if dl is not None:
        floor = math.ceil(0.1 * args.cohort - 1e-9)
        lines.append(
            "- FedAvg with a deadline, as FedScale runs it (`faults.quorum=1.0 faults.deadline_quorum=0.1`): "
            f"a round waits for all {args.cohort} until the {deadline:g} s deadline (the "
            f"{args.deadline_pct:g}th percentile of the devices' durations; {100 * on_time:.0f}% of the "
            f"devices make it) and aggregates whoever answered in time, if at least {floor} did. Of its "
            f"{dl['rounds']} rounds {dl['closed_at_deadline']} closed at the deadline"
            + (
                f" (the others when all {args.cohort} had answered before it)"
                if dl["closed_at_deadline"] < dl["rounds"]
                else f" (never did all {args.cohort} answer in time)"
            )
            + f" and {dl['skipped']} were skipped (fewer than {floor} in time); an applied round "
            f"aggregated {dl['answers_mean']} updates on average (min "
            f"{dl['answers_min']}, max {dl['answers_max']}; {on_time * args.cohort:.1f} expected), "
            f"{dl['late_mean']} clients per round were late (not trained). Rounds of "
            f"{dl['round_virtual_s']:.1f} s instead of sync's {sync['round_virtual_s']:.1f} s give "
            f"{dl['updates_per_h']} updates per virtual h (sync {sync['updates_per_h']}); "
            f"{dl['distinct_clients']} distinct clients were aggregated, about the {100 * on_time:.0f}% of "
            "the 1,000 devices fast enough (a device's duration does not change between rounds, so the "
            f"others never contribute). It reaches {target} at {hours(dl['target_h'])} h with "
            f"{dl['updates_to_target'] or 'n/a'} updates (sync {hours(sync['target_h'])} h, FedBuff "
            f"{hours(buff['target_h'])} h)."
        )
    if half is not None:
        need = math.ceil(0.5 * args.cohort - 1e-9)
        lines.append(
            f"- The early-closing variant (`faults.quorum=0.5`, no `deadline_quorum`) closes a round at its "
            f"{need}th answer, or skips it at the deadline when fewer than {need} answered by then: "
            f"{half['skipped']} of {half['rounds']} rounds skipped ({half['trained_discarded']} trained "
            f"updates thrown away), {half['closed_at_deadline']} closed at the deadline, rounds of "
            f"{half['round_virtual_s']:.1f} s, {half['updates_per_h']} updates per virtual h, "
            f"{half['distinct_clients']} distinct clients (the {need} fastest of each cohort); {target} at "
            f"{hours(half['target_h'])} h. Both deadline schemes select for fast devices, which costs "
            "accuracy when speed and data are correlated (not the case in this IID setting)."
        )
    if over is not None:
        lines.append(
            f"- Over-selection keeps the first {args.cohort} of {selected}: a round lasts "
            f"{over['round_virtual_s']:.1f} s (the {args.cohort}th of {selected} durations) instead of "
            f"{sync['round_virtual_s']:.1f} s, for the same {args.cohort} updates per round; it sends the "
            f"model to {selected - args.cohort} more clients per round whose work is thrown away."
        )
    return [*lines, ""]


def write_results(
    args: argparse.Namespace,
    deadline: dict[int, float],
    on_time: dict[int, float],
    devices: Population,
    records: dict[int, list[dict]],
    ray_records: list[dict],
) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    seed = args.seeds[0]
    main = records[seed]
    by_key = {r["key"]: r for r in main}
    sync, buff = by_key["sync"], by_key["fedbuff"]
    shown = [
        r
        | {
            "target_h": hours(r["target_h"]),
            "final_acc": f"{100 * r['final_acc']:.2f}",
            "speedup": ""
            if r["target_h"] == ""
            else f"{float(sync['target_h']) / float(r['target_h']):.2f}x",
        }
        for r in main
    ]
    durations = devices.durations
    compute_share = devices.compute.sum() / durations.sum()
    target = f"{100 * args.target:g}%"
    lines = [
        f"# Time to {target} test accuracy on a virtual clock: synchronous FedAvg vs FedBuff",
        "",
        f"`{command(args.out, 'command.txt')}`"
        + (f", then `{command(args.out, 'ray_command.txt')}`" if ray_records else "")
        + f" on {cpu_model()}. MNIST, `mlp` (784-200-200-10, {devices.model_bytes / 1e6:.2f} MB of float32 "
        "weights), "
        f"{CLIENTS:,} IID clients of 60 images, local SGD lr {LR}, batch {TRAIN['batch_size']}, "
        f"{TRAIN['local_epochs']} epoch; {args.cohort} clients training at once in every scheme; a budget of "
        f"{args.updates} client updates each; evaluation on the 10,000 test images about every "
        f"{args.eval_updates} updates; `runtime=sequential`.",
        "",
        f"Devices (`clock.*`): compute {CLOCK['compute_sps']:g} samples/s, down {CLOCK['down_mbps']:g} "
        f"Mbit/s, up {CLOCK['up_mbps']:g} Mbit/s (medians, each x LogNormal(0, 1) per client), latency "
        f"{CLOCK['latency_s']:g} s per transfer. A median client then needs "
        f"{60 * TRAIN['local_epochs'] / CLOCK['compute_sps']:.0f} s to train its 60 images, "
        f"{devices.model_bytes / (CLOCK['down_mbps'] * 1e6 / 8):.1f} s to download the model and "
        f"{devices.model_bytes / (CLOCK['up_mbps'] * 1e6 / 8):.1f} s to upload its update: over the devices, "
        f"compute is {100 * compute_share:.0f}% and communication {100 * (1 - compute_share):.0f}% of the "
        "total time, so both decide who straggles (slow phones, and slow uplinks with a phone-like 5:1 "
        "down:up ratio); the medians are low (a small model on MNIST) so that a client's time is seconds, "
        "as a larger model on a faster phone would be. Client durations over the 1,000 devices (seed "
        f"{seed}): median {np.median(durations):.1f} s, mean {durations.mean():.1f} s, 90th percentile "
        f"{np.percentile(durations, 90):.1f} s, max {durations.max():.0f} s.",
        "",
        f"## Seed {seed}",
        "",
        *table(
            [
                ("scheme", "scheme"),
                (f"{target} reached at (virtual h)", "target_h"),
                ("rounds/steps to target", "rounds_to_target"),
                ("updates to target", "updates_to_target"),
                ("speedup vs sync", "speedup"),
                ("final acc (%)", "final_acc"),
                ("total virtual h", "total_h"),
                ("rounds/steps", "rounds"),
                ("client updates", "updates"),
                ("real s", "real_s"),
            ],
            shown,
        ),
        "",
        "Client updates are those averaged into the model (a skipped round's are not). Real s: the whole "
        "`python -m raypfl` process (start-up ~7 s included), `--jobs` of them at a time on the 2 cores of a "
        "machine shared with other work: a rough figure.",
        "",
    ]
    if sync["target_h"] != "" and buff["target_h"] != "":
        lines += explain(args, by_key, deadline[seed], on_time[seed])
    if len(args.seeds) > 1:
        keys = [r["key"] for r in main]
        lines += [
            f"## Virtual hours to {target} per seed (a seed is also a new device population)",
            "",
            "| seed | deadline (s) | " + " | ".join(SHORT.get(k, k) for k in keys) + " | FedBuff vs sync |",
            "|" + "---|" * (len(keys) + 3),
        ]
        ratios: list[float] = []
        for s in args.seeds:
            got = {r["key"]: r for r in records[s]}
            ratio = ""
            if got["sync"]["target_h"] != "" and got["fedbuff"]["target_h"] != "":
                ratio = f"{float(got['sync']['target_h']) / float(got['fedbuff']['target_h']):.2f}x"
            cells = [hours(got[k]["target_h"]) for k in keys]
            lines.append(f"| {s} | {deadline[s]:g} | " + " | ".join(cells) + f" | {ratio} |")
            if ratio:
                ratios.append(float(ratio[:-1]))
        if ratios:
            lines += [
                "",
                f"FedBuff vs sync over {len(ratios)} seeds: {min(ratios):.2f}x to {max(ratios):.2f}x "
                f"(mean {np.mean(ratios):.2f}x). The deadline is the {args.deadline_pct:g}th percentile of "
                "each seed's device durations.",
            ]
        lines.append("")
    if ray_records:
        lines += [
            "## Real time on Ray: FedBuff vs sync FedAvg, 2 actors",
            "",
            "`runtime=ray runtime.num_actors=2 runtime.warm_start=false`, the same setting and virtual "
            f"clock, {args.ray_updates} client updates each, evaluated once at the end, one run at a time "
            "(the 2 actors, the parameter server and the driver share the 2 cores). The machine is shared: "
            "load average before: the 1, 5 and 15 min load averages (`/proc/loadavg`, as `uptime` prints "
            "them) just before the run started; busy cores: how many cores all processes kept busy in the "
            "2 s after that, before the run started.",
            "",
            *table(
                [
                    ("scheme", "scheme"),
                    ("repeat", "repeat"),
                    ("updates", "updates"),
                    ("real s (whole run)", "real_s"),
                    ("Ray start-up s", "startup_s"),
                    ("training wall s", "train_s"),
                    ("sum of train_s", "train_s_sum"),
                    ("updates / training wall s", "updates_per_s"),
                    ("updates / real s", "updates_per_real_s"),
                    ("client s (sum)", "client_s"),
                    ("ms per client", "client_ms_mean"),
                    ("server s (aggregate_s)", "server_s"),
                    ("utilisation", "utilisation"),
                    ("round 1 s", "round1_s"),
                    ("load average before", "loadavg_before"),
                    ("busy cores before", "busy_cores_before"),
                ],
                ray_records,
            ),
            "",
            "Training wall time = `wall_s` of the last row of `metrics.csv` - (`wall_s` - `round_s`) of "
            "the first (`wall_s`: cumulative seconds since the process started), i.e. from round 1's "
            "(FedBuff: server step 1's) start to the last round's end, for both schemes; it excludes Ray's "
            "start-up before round 1 and includes the final evaluation (in the last row's `round_s`). It "
            "is not the sum of `train_s` (shown next to it): FedBuff on the virtual clock runs ahead of the "
            "workers (the driver folds updates and dispatches new clients without waiting, and collects a "
            "step's rows one step later), so a step's `train_s` spans from its submission to that "
            "collection and the steps' spans overlap; summing them double-counts. Utilisation = the sum of "
            "`seconds` (each client's training time in its actor) over the `ok` rows of `clients.csv` / "
            "(training wall time x 2 actors). Round 1 s: `round_s` of the first row (it includes the "
            "actors' start: `warm_start=false`). Updates / real s divides by the whole process (Ray's "
            "start-up, the final evaluation, model and plots written).",
            "",
            *ray_summary(ray_records),
        ]
    lines += [
        f"![accuracy against virtual hours]({NAME}.png)",
        "",
    ]
    text = "\n".join(lines)
    (RESULTS / f"{NAME}.md").write_text(text)
    print(text)
    columns = [
        "part",
        "seed",
        "scheme",
        "key",
        "target",
        "target_h",
        "rounds_to_target",
        "updates_to_target",
        "final_acc",
        "total_h",
        "rounds",
        "updates",
        "real_s",
        "round_virtual_s",
        "updates_per_h",
        "client_s_mean",
        "cohort_max_s",
        "cohort_mean_s",
        "skipped",
        "trained_discarded",
        "distinct_clients",
        "staleness_mean",
        "staleness_p50",
        "staleness_p90",
        "staleness_max",
        "weight_mean",
        "answers_mean",
        "answers_min",
        "answers_max",
        "late_mean",
        "closed_at_deadline",
        "deadline_s",
        "repeat",
        "startup_s",
        "train_s",
        "train_s_sum",
        "round1_s",
        "updates_per_s",
        "updates_per_real_s",
        "client_s",
        "client_ms_mean",
        "utilisation",
        "server_s",
        "busy_cores_before",
        "loadavg_before",
    ]
    with (RESULTS / f"{NAME}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        for s in args.seeds:
            for r in records[s]:
                writer.writerow(
                    r | {"part": "virtual", "seed": s, "target": args.target, "deadline_s": deadline[s]}
                )
        for r in ray_records:
            writer.writerow(r | {"part": "ray", "seed": args.seeds[0]})
    plot(main, args.target, seed)


def plot(records: list[dict], target: float, seed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in records:
        x = [p[0] for p in r["curve"]]
        y = [100 * p[1] for p in r["curve"]]
        for a in (ax, zoom):
            a.plot(x, y, label=r["scheme"], linewidth=1.2)
    horizon = max(float(r["target_h"] or 0) for r in records) * 1.6 or None
    for a in (ax, zoom):
        a.axhline(100 * target, color="grey", linestyle="--", linewidth=0.8)
        a.set(xlabel="virtual hours", ylabel="test accuracy (%)")
        a.grid(alpha=0.3)
    ax.set_title(f"MNIST mlp, 1,000 clients, lognormal devices (seed {seed})")
    zoom.set_title(f"zoom: {100 * target - 5:g}% and above")
    zoom.set_ylim(100 * target - 5, 100)
    if horizon:
        zoom.set_xlim(0, horizon)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{NAME}.png", dpi=110)
    plt.close(fig)


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / NAME)
    parser.add_argument("--jobs", type=int, default=1, help="virtual-clock runs at a time (each one process)")
    parser.add_argument("--collect", action="store_true", help="do not run: tables from the runs' folders")
    parser.add_argument("--keep", action="store_true", help="do not rerun runs that finished before")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--target", type=float, default=0.95, help="test accuracy to reach")
    parser.add_argument("--cohort", type=int, default=20, help="clients training at once")
    parser.add_argument("--buffer", type=int, default=10, help="FedBuff's K")
    parser.add_argument("--updates", type=int, default=4000, help="client updates per scheme")
    parser.add_argument("--eval-updates", type=int, default=20, help="evaluate about every this many updates")
    parser.add_argument(
        "--deadline-pct", type=float, default=60.0, help="deadline: this percentile of durations"
    )
    parser.add_argument("--ray", action="store_true", help="also the real-time measurement on 2 Ray actors")
    parser.add_argument(
        "--ray-only", action="store_true", help="run only the Ray measurement (implies --ray)"
    )
    parser.add_argument("--ray-updates", type=int, default=4000)
    parser.add_argument("--ray-repeats", type=int, default=2)
    args = parser.parse_args(argv)
    args.ray = args.ray or args.ray_only

    deadline, on_time, runs = {}, {}, []
    devices = population(args.seeds[0])
    for seed in args.seeds:
        devices_s = population(seed)
        deadline[seed] = devices_s.percentile(args.deadline_pct)
        on_time[seed] = devices_s.within(deadline[seed])
        for scheme in schemes(args, deadline[seed], on_time[seed]):
            overrides = [
                *COMMON,
                "runtime=sequential",
                f"seed={seed}",
                *scheme.overrides,
                f"train.rounds={scheme.rounds}",
                f"train.eval_every={scheme.eval_every}",
                *extra,
            ]
            runs.append((seed, scheme, overrides, args.out / f"seed{seed}" / scheme.key))
    ray_runs = []
    if args.ray:
        for repeat in range(1, args.ray_repeats + 1):
            for scheme in schemes(args, deadline[args.seeds[0]], on_time[args.seeds[0]]):
                if scheme.key not in ("sync", "fedbuff"):
                    continue
                per_round = args.buffer if scheme.asynchronous else args.cohort
                rounds = args.ray_updates // per_round
                overrides = [
                    *COMMON,
                    "runtime=ray",
                    "runtime.num_actors=2",
                    "runtime.warm_start=false",
                    f"seed={args.seeds[0]}",
                    *scheme.overrides,
                    f"train.rounds={rounds}",
                    f"train.eval_every={rounds}",
                    *extra,
                ]
                ray_runs.append((scheme, repeat, overrides, args.out / "ray" / f"{scheme.key}_{repeat}"))
    if not args.collect:
        started = time.perf_counter()
        args.out.mkdir(parents=True, exist_ok=True)
        line = " ".join(["python", "benchmarks/virtual_clock.py", *sys.argv[1:]])
        if not args.ray_only:
            (args.out / "command.txt").write_text(line + "\n")
        if args.ray:
            (args.out / "ray_command.txt").write_text(line + "\n")
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            todo = (
                [] if args.ray_only else [r for r in runs if not (args.keep and finished(r[3], r[1].rounds))]
            )
            futures = [pool.submit(run, o, out, args.jobs > 1) for _, _, o, out in todo]
            for future in futures:
                future.result()
        for _, _, o, out in ray_runs:  # one at a time: each uses both cores
            run(o, out, False)
        print(f"all runs: {time.perf_counter() - started:.0f} s", flush=True)
    records: dict[int, list[dict]] = {seed: [] for seed in args.seeds}
    for seed, scheme, _, out in runs:
        records[seed].append(summarize(scheme, out, args.target, deadline[seed]))
    ray_records = []
    for scheme, repeat, _, out in ray_runs:
        label = "FedAvg (sync)" if scheme.key == "sync" else "FedBuff"
        ray_records.append(summarize_ray(scheme.key, label, repeat, out))
    write_results(args, deadline, on_time, devices, records, ray_records)


if __name__ == "__main__":
    main()
