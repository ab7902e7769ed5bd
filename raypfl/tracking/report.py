"""Sweep reports: `summary.csv` (one row per job), `summary.png` and `curves.png`, from any multirun or run
folder.

    python -m raypfl.tracking.report multirun/2026-11-22/10-00-00 [--target 0.97]

Each job leaves `result.json` (status, error, times) beside its metrics.csv; the report reads those and the
job's `.hydra/overrides.yaml`, so it can be rebuilt at any time, also for a sweep that was interrupted. A
folder that holds several multirun folders (e.g. one per algorithm, each with its own knob) gets one report
of all their jobs, named by their paths below it (`fedadam/0`).
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


def job_row(job_dir: Path, target: float, name: str | None = None) -> dict:
    """One summary row: status, final/best accuracy, rounds to `target`, seconds (and the accuracy curve)."""
    result_path = job_dir / RESULT_FILE
    result = json.loads(result_path.read_text()) if result_path.exists() else {"status": "unfinished"}
    rows = _metrics(job_dir)
    accs = [float(r["test_acc"]) for r in rows]
    reached = next((int(r["round"]) for r in rows if float(r["test_acc"]) >= target), "")
    return {
        "job": name or job_dir.name,
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
        "curve": [(int(r["round"]), acc) for r, acc in zip(rows, accs)],
    }


def job_dirs(path: Path) -> list[Path]:
    """The job folders under a multirun folder (or the run folder itself), in job order."""
    if (path / ".hydra").is_dir() or (path / RESULT_FILE).exists():
        return [path]
    found = [p.parent for p in path.rglob(".hydra") if p.is_dir() and p.parent != path]
    return sorted(found, key=lambda p: (len(p.parts), p.parent.as_posix(), *_name_key(p.name)))


def _name_key(name: str) -> tuple:
    """Job folders in numeric order (2 before 10), any other names after them in text order."""
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def swept_keys(rows: list[dict]) -> list[str]:
    """Override keys whose value differs between jobs (all override keys for a single job)."""
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row["overrides"] if k not in keys)
    if len(rows) == 1:
        return keys
    return [k for k in keys if len({json.dumps(r["overrides"].get(k), default=str) for r in rows}) > 1]


def _job_name(job_dir: Path, root: Path) -> str:
    """`3` for a job of a multirun folder, `fedadam/0` for one of a folder of multirun folders."""
    return job_dir.name if job_dir == root else job_dir.relative_to(root).as_posix()


def build_report(path: Path, target: float = DEFAULT_TARGET) -> tuple[Path, Path | None, list[dict]]:
    """Write summary.csv, summary.png (final accuracy per swept value) and curves.png into `path`.

    summary.png: final accuracy against a numeric swept key, or one bar per job when only non-numeric keys
    (`algorithm=fedavg,fedadam`) were swept; none for a single job. curves.png: test accuracy per round,
    one line per job with any evaluated round, labelled by its swept values.
    """
    path = Path(path)
    dirs = job_dirs(path)
    if not dirs:
        raise FileNotFoundError(f"no runs found under {path} (expected job folders with .hydra/)")
    raw = [job_row(d, target, _job_name(d, path)) for d in dirs]
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
    from raypfl.tracking import plots  # matplotlib: not for every `python -m raypfl` start-up

    if numeric:
        x_key = "optim.lr" if "optim.lr" in numeric else numeric[0]
        png_path = plots.plot_sweep(rows, x_key, [k for k in keys if k != x_key], path / "summary.png")
    elif len(rows) > 1:
        png_path = plots.plot_sweep_bars(rows, [_label(r, keys) for r in raw], path / "summary.png")
    curves = [(_label(r, keys), r["curve"]) for r in raw if r["curve"]]
    if curves:
        plots.plot_round_curves(curves, path / "curves.png", target)
    else:
        (path / "curves.png").unlink(missing_ok=True)  # a stale plot of an earlier report
    return csv_path, png_path, rows


def _label(row: dict, keys: list[str]) -> str:
    """A job's swept values (`algorithm=fedadam, algorithm.server_lr=0.03`; keys it lacks left out), its
    name when nothing was swept, and its status unless ok."""
    label = ", ".join(f"{k}={row['overrides'][k]}" for k in keys if k in row["overrides"]) or row["job"]
    return label if row["status"] == "ok" else f"{label} ({row['status']})"


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
    curves = csv_path.with_name("curves.png")
    pngs = [str(p) for p in (png_path, curves if curves.exists() else None) if p]
    log.info("wrote %s%s", csv_path, "".join(f" and {p}" for p in pngs))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m raypfl.tracking.report", description=__doc__.splitlines()[0]
    )
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
