"""Tables and plots of the three classic fault experiments, from their run or multirun folders.

    python -m raypfl.tracking.fault_tables scaling multirun/.../fault_scaling  # also run by the experiment
    python -m raypfl.tracking.fault_tables dynamic outputs/.../fault_dynamic
    python -m raypfl.tracking.fault_tables kill multirun/.../fault_kill

Each writes `fault_<kind>.md`, `fault_<kind>.csv` and `fault_<kind>.png` into the folder.
"""

from __future__ import annotations

import argparse
import csv
import logging
import statistics
from collections.abc import Callable
from pathlib import Path

from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from matplotlib.ticker import MaxNLocator
from omegaconf import DictConfig

from raypfl.tracking.plots import plt, save_figure
from raypfl.tracking.report import _overrides, job_dirs

log = logging.getLogger("raypfl")


def _rows(path: Path, name: str) -> list[dict]:
    file = path / name
    if not file.exists():
        return []
    with file.open() as f:
        return list(csv.DictReader(f))


def _num(value: str) -> float | None:
    return None if value in ("", None) else float(value)


def _median(values: list[float]) -> float | str:
    return round(statistics.median(values), 3) if values else ""


def _final(rows: list[dict], key: str) -> float | str:
    values = [r[key] for r in rows if r.get(key) not in ("", None)]
    return round(float(values[-1]), 4) if values else ""


def scaling(path: Path) -> tuple[list[dict], Callable]:
    """One row per worker count N: accuracy and round time."""
    table = []
    for job in job_dirs(path):
        rows, overrides = _rows(job, "metrics.csv"), _overrides(job)
        if not rows:
            continue
        workers = int(overrides.get("clients.num", len(_rows(job, "clients.csv")) // max(1, len(rows))))
        table.append(
            {
                "workers": workers,
                "images_per_worker": int(overrides.get("dataset.train_limit", 40000)) // workers,
                "rounds": len(rows),
                "global_acc": _final(rows, "test_acc"),
                "mean_local_acc": _final(rows, "local_acc"),
                "median_round_s": _median([float(r["round_s"]) for r in rows]),
                "median_train_s": _median([float(r["train_s"]) for r in rows]),
            }
        )
    table.sort(key=lambda r: r["workers"])

    def plot(ax_acc, ax_time):
        x = [r["workers"] for r in table]
        ax_acc.plot(x, [100 * r["global_acc"] for r in table], "o-", label="global model")
        local = [r for r in table if r["mean_local_acc"] != ""]
        ax_acc.plot(
            [r["workers"] for r in local],
            [100 * r["mean_local_acc"] for r in local],
            "s--",
            label="mean local",
        )
        ax_acc.set(xlabel="workers N", ylabel="final test accuracy (%)", title="Accuracy vs workers")
        ax_time.plot(x, [r["median_round_s"] for r in table], "o-")
        ax_time.set(
            xlabel="workers N", ylabel="median round time (s)", title="Round time vs workers", ylim=(0, None)
        )
        ax_acc.legend()

    return table, plot


def dynamic(path: Path) -> tuple[list[dict], Callable]:
    """One row per round of the (first) run: who was there, who answered, accuracy, times."""
    job = job_dirs(path)[0]
    clients = _rows(job, "clients.csv")
    table = []
    for row in _rows(job, "metrics.csv"):
        mine = [c for c in clients if c["round"] == row["round"]]
        rtts = [float(c["rtt_s"]) for c in mine if c.get("rtt_s")]
        table.append(
            {
                "round": int(row["round"]),
                "selected": len(mine),
                "answered": int(row["answered"]),
                "late": int(row["late"]),
                "global_acc": _final([row], "test_acc"),
                "mean_local_acc": _final([row], "local_acc"),
                "round_s": round(float(row["round_s"]), 3),
                "median_rtt_s": _median(rtts),
                "max_rtt_s": round(max(rtts), 3) if rtts else "",
            }
        )

    def plot(ax_acc, ax_time):
        x = [r["round"] for r in table]
        ax_acc.plot(x, [100 * r["global_acc"] for r in table], "o-", label="global model")
        local = [r for r in table if r["mean_local_acc"] != ""]
        ax_acc.plot(
            [r["round"] for r in local], [100 * r["mean_local_acc"] for r in local], "s--", label="mean local"
        )
        ax_acc.set(xlabel="round", ylabel="test accuracy (%)", title="Accuracy as workers join")
        ax_acc.legend()
        ax_time.plot(x, [r["round_s"] for r in table], "o-", label="round time")
        for c in clients:
            if c.get("rtt_s"):
                ax_time.plot(int(c["round"]), float(c["rtt_s"]), ".", color="gray", alpha=0.5)
        ax_time.plot([], [], ".", color="gray", label="client round trips")
        ax_time.set(xlabel="round", ylabel="seconds", title="Round and round-trip times")
        ax_time.legend()

    return table, plot


def kill(path: Path) -> tuple[list[dict], Callable]:
    """One row per number of killed workers: the kill round's time and quorum, and what followed."""
    table = []
    for job in job_dirs(path):
        rows, overrides = _rows(job, "metrics.csv"), _overrides(job)
        if not rows:
            continue
        at = int(overrides.get("faults.kill_at_round", 2))
        hit = next((r for r in rows if int(r["round"]) == at), None)
        before = [float(r["round_s"]) for r in rows if 1 < int(r["round"]) < at] or [
            float(r["round_s"]) for r in rows if int(r["round"]) < at
        ]
        after = [float(r["round_s"]) for r in rows if int(r["round"]) > at]
        last = rows[-1]["round"]
        selected_last = sum(1 for c in _rows(job, "clients.csv") if c["round"] == last)
        table.append(
            {
                "killed": int(overrides.get("faults.kill_count", 0)),
                "workers": int(overrides.get("clients.num", 8)),
                "kill_round_s": round(float(hit["round_s"]), 3) if hit else "",
                "answered_at_kill": int(hit["answered"]) if hit else "",
                "quorum_at_kill": ("yes" if hit["quorum"] == "1" else "NO") if hit else "",
                "round_s_before": _median(before),
                "round_s_after": _median(after),
                "workers_after": selected_last,  # still selected in the last round (the dead were evicted)
                "global_acc": _final(rows, "test_acc"),
            }
        )
    table.sort(key=lambda r: r["killed"])

    def plot(ax_time, ax_acc):
        x = [r["killed"] for r in table]
        ax_time.plot(x, [r["kill_round_s"] for r in table], "o-", label="kill round")
        ax_time.plot(
            x, [r["round_s_after"] or float("nan") for r in table], "s--", label="later rounds (median)"
        )
        failed = [r for r in table if r["quorum_at_kill"] == "NO"]
        ax_time.plot(
            [r["killed"] for r in failed], [r["kill_round_s"] for r in failed], "rx", ms=12, label="no quorum"
        )
        ax_time.set(xlabel="workers killed N", ylabel="round time (s)", title="Round time vs killed workers")
        ax_time.legend()
        ax_acc.plot(x, [100 * r["global_acc"] for r in table], "o-")
        ax_acc.set(
            xlabel="workers killed N", ylabel="final test accuracy (%)", title="Accuracy vs killed workers"
        )

    return table, plot


KINDS = {"scaling": scaling, "dynamic": dynamic, "kill": kill}


def write_tables(kind: str, path: Path) -> list[dict]:
    """Write fault_<kind>.{md,csv,png} into `path`; returns the table's rows."""
    path = Path(path)
    table, plot = KINDS[kind](path)
    if not table:
        raise FileNotFoundError(f"no finished runs under {path}")
    columns = list(table[0])
    stem = path / f"fault_{kind}"
    with stem.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(table)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in table]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    plot(*axes)
    for ax in axes:  # every x here counts something: workers, rounds
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    save_figure(fig, stem.with_suffix(".png"))
    log.info("fault_%s table:\n%s\nwrote %s.{md,csv,png}", kind, "\n".join(lines), stem)
    return table


class FaultTable(Callback):
    """Hydra callback of the fault experiments: writes their table and plot when the run or sweep ends."""

    def __init__(self, kind: str):
        if kind not in KINDS:
            raise ValueError(f"kind={kind} must be one of {', '.join(KINDS)}")
        self.kind = kind

    def _write(self, path: Path) -> None:
        try:
            write_tables(self.kind, path)
        except FileNotFoundError as exc:
            log.error("no fault_%s table: %s", self.kind, exc)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs) -> None:
        hydra_cfg = job_return.hydra_cfg.hydra if job_return.hydra_cfg else None
        if hydra_cfg is not None and hydra_cfg.mode == RunMode.RUN:  # a single run; sweeps: on_multirun_end
            self._write(Path(str(hydra_cfg.runtime.output_dir)))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        self._write(Path(str(config.hydra.sweep.dir)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m raypfl.tracking.fault_tables", description=__doc__.splitlines()[0]
    )
    parser.add_argument("kind", choices=sorted(KINDS))
    parser.add_argument("path", type=Path, help="the experiment's run or multirun folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        write_tables(args.kind, args.path)
    except FileNotFoundError as exc:
        log.error("error: %s", exc)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
