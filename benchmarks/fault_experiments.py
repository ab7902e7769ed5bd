"""Run the three classic fault experiments and collect their tables and plots under benchmarks/results/.

    python benchmarks/fault_experiments.py                    # all three (~10 min on 2 cores)
    python benchmarks/fault_experiments.py kill -- train.rounds=3   # one, with extra overrides after --

Each experiment writes its own fault_<kind>.{md,csv,png} into its run/multirun folder (a Hydra callback);
this script runs them one after another and copies those files here.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
#: kind -> (experiment config, runs as a sweep)
EXPERIMENTS = {
    "scaling": ("fault_scaling", True),
    "dynamic": ("fault_dynamic", False),
    "kill": ("fault_kill", True),
}


def run(kind: str, extra: list[str], out_root: Path) -> Path:
    experiment, sweep = EXPERIMENTS[kind]
    out = out_root / experiment
    where = f"hydra.sweep.dir={out}" if sweep else f"hydra.run.dir={out}"
    command = [
        sys.executable,
        "-m",
        "raypfl",
        *(["-m"] if sweep else []),
        f"+experiment={experiment}",
        where,
        *extra,
    ]
    print(f"== {kind}: {' '.join(command)}", flush=True)
    start = time.time()
    subprocess.run(command, cwd=REPO, check=True)
    print(f"== {kind}: {time.time() - start:.0f} s", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for suffix in (".md", ".csv", ".png"):
        shutil.copy(out / f"fault_{kind}{suffix}", RESULTS / f"fault_{kind}{suffix}")
    print((out / f"fault_{kind}.md").read_text(), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kinds", nargs="*", help=f"any of {', '.join(EXPERIMENTS)} (default: all)")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "fault_experiments")
    args = parser.parse_args(argv)
    unknown = [k for k in args.kinds if k not in EXPERIMENTS]
    if unknown:
        parser.error(f"unknown experiment {unknown[0]} (choose from {', '.join(EXPERIMENTS)})")
    for kind in args.kinds or EXPERIMENTS:
        run(kind, extra, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
