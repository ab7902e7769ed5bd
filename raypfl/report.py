"""Sweep reports: `summary.csv` (one row per job) and `summary.png`, from any multirun or run folder.

    python -m raypfl.report multirun/2026-11-22/10-00-00 [--target 0.97]

Each job leaves `result.json` (status, error, times) beside its metrics.csv; the report reads those and the
job's `.hydra/overrides.yaml`, so it can be rebuilt at any time, also for a sweep that was interrupted.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import time
from pathlib import Path

import yaml

log = logging.getLogger("raypfl")

RESULT_FILE = "result.json"
DEFAULT_TARGET = 0.97
RESULT_COLUMNS = [
    "status",
    "final_acc",
    "best_acc",
    "rounds",
    "rounds_to_target",
    "total_s",
    "started_at",
    "finished_at",
    "error",
]


#: How a job ended: `ok`, `failed` (bad input, a fault, a crash) or `interrupted` (SIGINT / SIGTERM).
STATUSES = ("ok", "failed", "interrupted")


def write_result(out_dir: Path, started: float, status: str, error: str = "", **extra) -> None:
    """Record how a job ended (written by every job: success, failure or interrupt).

    Written to a temporary name and renamed, so a reader (or an interrupt) never sees half a file.
    """
    finished = time.time()
    record = {
        "status": status,
        "error": error,
        "started_at": round(started, 3),
        "finished_at": round(finished, 3),
        "total_s": round(finished - started, 3),
        **extra,
    }
    path = Path(out_dir) / RESULT_FILE
    tmp = path.with_name(RESULT_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)


def _parse(value: str):
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _overrides(job_dir: Path) -> dict[str, object]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return {}
    items = yaml.safe_load(path.read_text()) or []
    return {k.lstrip("+~"): _parse(v) for k, v in (item.split("=", 1) for item in items if "=" in item)}


def _metrics(job_dir: Path) -> list[dict]:
    path = job_dir / "metrics.csv"
    if not path.exists():
        return []
    with path.open() as f:
        return [r for r in csv.DictReader(f) if r["test_acc"] != ""]


def job_row(job_dir: Path, target: float) -> dict:
    """One summary row: status, final/best accuracy, rounds to `target`, seconds."""
    result_path = job_dir / RESULT_FILE
    result = json.loads(result_path.read_text()) if result_path.exists() else {"status": "unfinished"}
    rows = _metrics(job_dir)
    accs = [float(r["test_acc"]) for r in rows]
    reached = next((int(r["round"]) for r in rows if float(r["test_acc"]) >= target), "")
    return {
        "job": job_dir.name,
        "status": result.get("status", "unfinished"),
        "final_acc": accs[-1] if accs else "",
        "best_acc": max(accs) if accs else "",
        "rounds": int(rows[-1]["round"]) if rows else 0,
        "rounds_to_target": reached,
        "total_s": result.get("total_s", ""),
        "started_at": result.get("started_at", ""),
        "finished_at": result.get("finished_at", ""),
        "error": result.get("error", ""),
        "overrides": _overrides(job_dir),
    }


def job_dirs(path: Path) -> list[Path]:
    """The job folders under a multirun folder (or the run folder itself), in job order."""
    if (path / ".hydra").is_dir() or (path / RESULT_FILE).exists():
        return [path]
    found = [p.parent for p in path.rglob(".hydra") if p.is_dir() and p.parent != path]
    return sorted(found, key=lambda p: (len(p.parts), int(p.name) if p.name.isdigit() else p.name))


def swept_keys(rows: list[dict]) -> list[str]:
    """Override keys whose value differs between jobs (all override keys for a single job)."""
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row["overrides"] if k not in keys)
    if len(rows) == 1:
        return keys
    return [k for k in keys if len({json.dumps(r["overrides"].get(k), default=str) for r in rows}) > 1]


def build_report(path: Path, target: float = DEFAULT_TARGET) -> tuple[Path, Path | None, list[dict]]:
    """Write summary.csv (and summary.png when a numeric key was swept) into `path`."""
    path = Path(path)
    dirs = job_dirs(path)
    if not dirs:
        raise FileNotFoundError(f"no runs found under {path} (expected job folders with .hydra/)")
    raw = [job_row(d, target) for d in dirs]
    keys = swept_keys(raw)
    rows = [_flatten(r, keys) for r in raw]
    columns = ["job", *keys, *RESULT_COLUMNS]
    csv_path = path / "summary.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    numeric = [k for k in keys if all(_is_number(r[k]) for r in rows)]
    png_path = None
    if numeric:
        x_key = "optim.lr" if "optim.lr" in numeric else numeric[0]
        from raypfl.plots import plot_sweep  # matplotlib: not for every `python -m raypfl` start-up

        png_path = plot_sweep(rows, x_key, [k for k in keys if k != x_key], path / "summary.png")
    return csv_path, png_path, rows


def _flatten(row: dict, keys: list[str]) -> dict:
    """A summary row with the swept values as columns: job, *keys, *RESULT_COLUMNS."""
    flat = {"job": row["job"], **{k: row["overrides"].get(k, "") for k in keys}}
    return {**flat, **{k: row[k] for k in RESULT_COLUMNS}}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_table(rows: list[dict], keys: list[str]) -> str:
    """A plain-text table of the summary, for the console."""
    columns = ["job", *keys, "status", "final_acc", "best_acc", "rounds_to_target", "total_s"]
    cells = [[str(round(r[c], 4)) if isinstance(r[c], float) else str(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def report(path: Path, target: float = DEFAULT_TARGET) -> list[dict]:
    """Build the report and log it: the table, the files, and every failed job with its error."""
    csv_path, png_path, rows = build_report(path, target)
    keys = [c for c in rows[0] if c != "job" and c not in RESULT_COLUMNS]
    log.info("sweep summary (%d jobs):\n%s", len(rows), format_table(rows, keys))
    for row in rows:
        if row["status"] != "ok":
            log.error("job %s %s: %s", row["job"], row["status"], row["error"] or "no result.json")
    log.info("wrote %s%s", csv_path, f" and {png_path}" if png_path else "")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raypfl.report", description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="a multirun folder or a single run folder")
    parser.add_argument("--target", type=float, default=DEFAULT_TARGET, help="accuracy for rounds_to_target")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        rows = report(args.path, args.target)
    except FileNotFoundError as exc:
        log.error("error: %s", exc)
        return 2
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
