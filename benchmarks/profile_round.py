"""Profile a raypfl run with py-spy (every process: driver, actors, Ray's own) and summarise where time goes.

    pip install -e '.[bench]'    # py-spy
    python benchmarks/profile_round.py --model cnn --rounds 6   # -> benchmarks/results/profile_cnn.md
    python benchmarks/profile_round.py --model mlp -- runtime.vectorize=true

py-spy samples every thread's Python stack (idle threads excluded) at `--rate` Hz. The summary counts samples
per process role and, inside the client actors and the driver, per "activity" (the innermost frame that
belongs to a known phase: forward, backward, optimizer step, evaluation, data gathering, (de)serialisation,
Ray calls), so it reads as "where the busy cores spend their time".

On Ray, warm start (`runtime.warm_start`) trains the first rounds in the driver while the actor pool boots;
the summary says how many, and warns if the pool never took over (a fast machine, few rounds: then the
profile shows the driver's training, not the actors'; use more --rounds or `-- runtime.warm_start=false`).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import workload  # noqa: E402

#: (activity, substring of a frame) — the innermost matching frame names a sample's activity
ACTIVITIES = [
    ("optimizer step", "optimizer.py"),
    ("optimizer step", "sgd.py"),
    ("optimizer step", "_sgd_step"),
    ("backward", "run_backward"),
    ("backward", "autograd"),
    ("forward", "forward (raypfl/models/zoo.py"),
    ("forward", "_call_impl"),
    ("evaluation", "evaluate (raypfl/training/local.py"),
    ("batch gather", "train_lockstep"),
    ("batch gather", "train_local"),
    ("weights in/out", "set_flat"),
    ("weights in/out", "get_flat"),
    ("aggregation", "aggregate.py"),
    ("(de)serialisation", "serializ"),
    ("(de)serialisation", "pickle"),
    ("ray calls", "ray/_private/worker.py"),
    ("ray calls", "ray/actor.py"),
    ("imports", "<frozen importlib"),
    ("data loading", "datasets.py"),
]


def role(header: str) -> str:
    if "default_worker.py" in header or "ray::" in header:
        return "ray worker (actors)"
    if "raylet" in header:
        return "raylet"
    if "gcs_server" in header:
        return "gcs"
    if "agent" in header or "dashboard" in header or "log_monitor" in header:
        return "ray agents"
    if "-m raypfl" in header:
        return "driver"
    return "other"


def activity(stack: str) -> str:
    best, best_pos = "other", -1
    for name, needle in ACTIVITIES:
        pos = stack.rfind(needle)
        if pos > best_pos:
            best, best_pos = name, pos
    return best


def summarise(raw: Path) -> tuple[collections.Counter, dict[str, collections.Counter]]:
    by_role: collections.Counter = collections.Counter()
    by_activity: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        starts = [m.end() for m in re.finditer(r'process \d+:"', stack)]  # outermost first
        who = role(stack[starts[-1] : starts[-1] + 300] if starts else stack)
        if who == "ray worker (actors)" and "parameter_server.py" in stack:
            who = "parameter server actor"
        by_role[who] += int(count)
        by_activity[who][activity(stack)] += int(count)
    return by_role, by_activity


def table(by_role: collections.Counter, by_activity: dict[str, collections.Counter], rate: int) -> str:
    lines = ["| process | busy s | top activities (share of that process's samples) |", "|---|---|---|"]
    for who, samples in by_role.most_common():
        acts = by_activity[who]
        top = ", ".join(f"{a} {100 * n / samples:.0f}%" for a, n in acts.most_common(6))
        lines.append(f"| {who} | {samples / rate:.1f} | {top} |")
    return "\n".join(lines) + "\n"


def warm_start_note(log_text: str, config_text: str) -> str:
    """One line on where the rounds trained, for a run on a local Ray with warm start ('' otherwise).

    `config_text`: the run's .hydra/config.yaml; `log_text`: its output.
    """
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(config_text or "{}")
    runtime, rounds = cfg.get("runtime", {}), cfg.get("train", {}).get("rounds", "?")
    if runtime.get("name") != "ray" or not runtime.get("warm_start", False) or runtime.get("address"):
        return ""
    took_over = re.search(r"the driver trained the first (\d+) round", log_text)
    if took_over:
        return (
            f"Warm start: the driver trained the first {took_over.group(1)} of {rounds} rounds, "
            "then the actor pool took over.\n\n"
        )
    if "ray runtime: " in log_text:
        return ""
    return (
        f"**Warning: the actor pool never took over**: the warm-start driver trained all {rounds} rounds, "
        "so the actors did no training here; profile more --rounds or pass `-- runtime.warm_start=false`.\n\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn", choices=["mlp", "cnn"])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--rate", type=int, default=50, help="samples per second")
    parser.add_argument("--out", type=Path, default=None, help="Markdown summary (default: results/)")
    parser.add_argument("overrides", nargs="*", help="extra raypfl overrides, after --")
    args = parser.parse_args()
    w = workload.Workload(model=args.model, rounds=args.rounds)
    out = args.out or HERE / "results" / f"profile_{args.model}.md"
    with tempfile.TemporaryDirectory(prefix="profile-") as tmp:
        raw = Path(tmp) / "raw.txt"
        run = [sys.executable, "-m", "raypfl", *w.overrides(), *args.overrides, f"hydra.run.dir={tmp}/run"]
        spy = [
            *(Path(sys.executable).parent / "py-spy",),
            "record",
            "--subprocesses",
            "--rate",
            str(args.rate),
            "--format",
            "raw",
            "-o",
            str(raw),
            "--",
            *run,
        ]
        env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
        log_path = Path(tmp) / "output.log"
        with open(log_path, "w") as log:
            proc = subprocess.run([str(c) for c in spy], env=env, stdout=log, stderr=subprocess.STDOUT)
        code = proc.returncode
        if code:
            sys.stderr.write("".join(log_path.read_text().splitlines(keepends=True)[-20:]))
            raise SystemExit(f"py-spy / raypfl exited with {code}")
        by_role, by_activity = summarise(raw)
        config = Path(tmp) / "run" / ".hydra" / "config.yaml"
        note = warm_start_note(log_path.read_text(), config.read_text() if config.exists() else "")
    text = (
        f"py-spy, {args.rate} Hz, idle threads excluded: `python -m raypfl {' '.join(w.overrides())} "
        f"{' '.join(args.overrides)}`\n\n" + note + table(by_role, by_activity, args.rate)
    )
    if note.startswith("**Warning"):
        print(note.strip(), file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
