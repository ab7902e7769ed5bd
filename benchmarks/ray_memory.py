"""Where each MB of a raypfl Ray run goes: the PSS of every process of its tree, by role.

    python benchmarks/ray_memory.py --label after                 # mlp, 6 rounds, runtime=ray
    python benchmarks/ray_memory.py --label dashboard -- runtime.dashboard=true
    python benchmarks/ray_memory.py --report                       # only rewrite the markdown from the CSV

Runs workload W (see workload.py; `--model`, `--rounds`) as `python -m raypfl ... runtime=ray` in a fresh
process and samples, every 0.25 s, the PSS of that process and of all its descendants (Ray's GCS, raylet,
agents, dashboard, workers: all descend from the driver of a local Ray). Each process gets a role from its
command line (the driver, `ray::ClientActor`, `ray::ParameterServer`, `ray::IDLE` workers, gcs_server,
raylet, ...); the table is the sample with the largest total (the peak of the tree), with each role's
process count, its PSS, and whether those processes map libtorch. PSS splits shared pages (the object
store, shared libraries) between the processes that map them, so the rows add up to the total.
Rows are appended to benchmarks/results/ray_memory.csv under `--label`; benchmarks/results/ray_memory.md
puts every label of a model side by side. With `--repeats N` (default 3) the run with the median total is
kept: the PSS of shared libraries depends on what else on the machine maps them (other torch processes),
so totals vary by up to ~100 MB from run to run on a shared machine; anonymous memory varies little.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))
import workload  # noqa: E402

#: (role, substring of the command line), first match wins; the driver is the root of the tree.
ROLES: list[tuple[str, str]] = [
    ("client actor", "ray::ClientActor"),
    ("parameter server", "ray::ParameterServer"),
    ("idle worker", "ray::IDLE"),
    ("gcs_server", "gcs_server"),
    ("raylet", "/raylet"),
    ("dashboard agent", "ray::DashboardAgent"),
    ("runtime env agent", "ray::RuntimeEnvAgent"),
    ("dashboard agent", "dashboard/agent.py"),  # before it names itself
    ("runtime env agent", "runtime_env/agent/main.py"),
    ("dashboard", "dashboard/dashboard.py"),
    ("log monitor", "log_monitor.py"),
    ("autoscaler monitor", "autoscaler/_private/monitor.py"),
    ("worker (starting)", "default_worker.py"),
    ("raypfl watchdog", "raypfl.jobs.watchdog"),
    ("other ray worker", "ray::"),
]
ORDER = ["driver", *dict.fromkeys(role for role, _ in ROLES)]
FIELDS = ["label", "model", "role", "processes", "pss_mb", "torch", "anon_mb", "shm_mb", "libs_mb"]


def role_of(proc: psutil.Process, root: int) -> str:
    """The process's role in the Ray run (see ROLES); a dashboard's subprocess modules count as dashboard."""
    if proc.pid == root:
        return "driver"
    command = " ".join(proc.cmdline()) or proc.name()
    for role, needle in ROLES:
        if needle in command:
            return role
    if "dashboard" in command:
        return "dashboard"
    return proc.name()


def kinds(proc: psutil.Process) -> tuple[float, float, float]:
    """PSS (MB) of a process by kind of mapping: anonymous (heap: Python objects, arrays, torch's own
    state), shared memory (Ray's object store), and files (shared libraries, the interpreter)."""
    anon = shm = files = 0
    for region in proc.memory_maps(grouped=True):
        path = region.path
        if path.startswith("/dev/shm") or "plasma" in path or "memfd" in path:
            shm += region.pss
        elif not path or path.startswith("["):
            anon += region.pss
        else:
            files += region.pss
    return anon / 2**20, shm / 2**20, files / 2**20


def maps_torch(pid: int) -> bool:
    """True if the process has libtorch mapped (it imported torch)."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


class TreeSampler:
    """Samples the PSS of a process tree by role; keeps the sample with the largest total."""

    def __init__(self, pid: int, interval: float = 0.25, detail: bool = False):
        self.root = psutil.Process(pid)
        self.interval = interval
        self.detail = detail  # also split each role's PSS by kind of mapping (slower samples)
        self.peak: dict[str, list] = {}  # role -> [processes, pss MB, any maps torch]
        self.peak_total = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def sample(self) -> dict[str, list]:
        """One sample: role -> [processes, PSS MB, torch mapped, anon MB, shm MB, files MB]."""
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return {}
        roles: dict[str, list] = {}
        for proc in procs:
            with contextlib.suppress(psutil.Error):  # it may end between listing and reading
                role = role_of(proc, self.root.pid)
                pss = proc.memory_full_info().pss / 2**20
                split = kinds(proc) if self.detail else (0.0, 0.0, 0.0)
                row = roles.setdefault(role, [0, 0.0, False, 0.0, 0.0, 0.0])
                row[0] += 1
                row[1] += pss
                row[2] = row[2] or maps_torch(proc.pid)
                for k, mb in enumerate(split):
                    row[3 + k] += mb
        return roles

    def _loop(self) -> None:
        while not self._stop.is_set():
            roles = self.sample()
            total = sum(row[1] for row in roles.values())
            if total > self.peak_total:
                self.peak_total, self.peak = total, roles
            self._stop.wait(self.interval)

    def stop(self) -> dict[str, list]:
        self._stop.set()
        self._thread.join()
        return self.peak


def measure(w: workload.Workload, extra: list[str], scratch: Path, detail: bool = False) -> dict[str, list]:
    """Run W on runtime=ray (plus `extra` overrides); the per-role PSS at the peak of its process tree."""
    command = [
        sys.executable,
        "-m",
        "raypfl",
        *w.overrides(),
        "runtime=ray",
        "runtime.warm_start=false",  # the pool trains every round (warm start may leave it none)
        *extra,
        f"hydra.run.dir={scratch}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled", "WANDB_MODE": "disabled"}
    log_path = scratch / "output.log"
    scratch.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid, detail=detail)
        code = proc.wait()
        peak = sampler.stop()
    if code != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"raypfl exited with {code}; last lines of {log_path}:\n{tail}")
    return peak


def rows_of(label: str, model: str, peak: dict[str, list]) -> list[dict]:
    """CSV rows (one per role, then the total) of a peak sample."""
    known = [role for role in ORDER if role in peak] + sorted(set(peak) - set(ORDER))
    rows = [
        {
            "label": label,
            "model": model,
            "role": role,
            "processes": peak[role][0],
            "pss_mb": round(peak[role][1], 1),
            "torch": "yes" if peak[role][2] else "no",
            "anon_mb": round(peak[role][3], 1),
            "shm_mb": round(peak[role][4], 1),
            "libs_mb": round(peak[role][5], 1),
        }
        for role in known
    ]
    total = {
        "label": label,
        "model": model,
        "role": "total",
        "processes": sum(row["processes"] for row in rows),
        "pss_mb": round(sum(row[1] for row in peak.values()), 1),
        "torch": "",
        **{key: round(sum(row[k] for row in peak.values()), 1) for k, key in enumerate(FIELDS[-3:], 3)},
    }
    return [*rows, total]


def read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def markdown(rows: list[dict]) -> str:
    """Per model, one table: a row per role, a column per label (processes x MB, and whether torch is in)."""
    out = [
        "# Ray memory: PSS per process role at the peak of the process tree",
        "",
        "`python benchmarks/ray_memory.py --label LABEL [--model cnn] [-- overrides]`: W, 6 rounds,",
        "runtime=ray, runtime.warm_start=false. Each cell is `processes: MB` (PSS summed over the role's",
        "processes, at the sample where the tree's total PSS peaked, in the run with the median peak of",
        "`--repeats`); (t) marks roles whose processes map libtorch. before: commit b966c41; after: issue",
        "18's memory cuts. The CSV also splits each role's PSS into anonymous memory, object store (shm)",
        "and files (`--detail`).",
        "",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        labels = list(dict.fromkeys(r["label"] for r in mine))
        roles = [role for role in [*ORDER, "total"] if any(r["role"] == role for r in mine)]
        roles[-1:-1] = sorted({r["role"] for r in mine} - set(roles))
        if "total" in roles:  # last
            roles.remove("total")
            roles.append("total")
        out += [f"## {model}", "", "| role | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        for role in roles:
            cells = []
            for label in labels:
                hit = [r for r in mine if r["label"] == label and r["role"] == role]
                if not hit:
                    cells.append("-")
                    continue
                r = hit[0]
                mark = " (t)" if r["torch"] == "yes" else ""
                cells.append(f"{r['processes']}: {float(r['pss_mb']):.0f}{mark}")
            name = f"**{role}**" if role == "total" else role
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--label", default="now", help="the column of this measurement in the tables")
    parser.add_argument("--report", action="store_true", help="only rewrite the markdown from the CSV")
    parser.add_argument("--repeats", type=int, default=3, help="runs; the table is the median run's")
    parser.add_argument(
        "--detail", action="store_true", help="split each role's PSS: anonymous, object store, files"
    )
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("overrides", nargs="*", help="extra raypfl overrides (after --)")
    args = parser.parse_args(argv)
    csv_path, md_path = args.results / "ray_memory.csv", args.results / "ray_memory.md"
    rows = read_csv(csv_path)
    if not args.report:
        w = workload.Workload(model=args.model, rounds=args.rounds)
        peaks = []
        for repeat in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix="ray_memory-") as scratch:
                peaks.append(measure(w, args.overrides, Path(scratch) / "run", args.detail))
            print(f"run {repeat + 1}/{args.repeats}: {sum(row[1] for row in peaks[-1].values()):.0f} MB")
        peaks.sort(key=lambda peak: sum(row[1] for row in peak.values()))
        peak = peaks[(len(peaks) - 1) // 2]  # the run with the median total (the lower of two)
        new = rows_of(args.label, w.model, peak)
        rows = [r for r in rows if (r["label"], r["model"]) != (args.label, w.model)] + new
        for row in new:
            torch_mark = " (torch)" if row["torch"] == "yes" else ""
            split = (
                f" (anon {row['anon_mb']}, shm {row['shm_mb']}, files {row['libs_mb']})"
                if args.detail
                else ""
            )
            print(f"{row['role']:>20} {row['processes']:>3} {row['pss_mb']:>8.1f} MB{torch_mark}{split}")
        args.results.mkdir(parents=True, exist_ok=True)
        write_csv(csv_path, rows)
    md_path.write_text(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
