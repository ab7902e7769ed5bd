"""Local tracking: one progress line per round, metrics.csv, clients.csv and plots in the run folder."""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path

log = logging.getLogger("raypfl")

METRIC_COLUMNS = [
    "round",
    "test_acc",
    "test_loss",
    "train_loss",
    "clients",
    "rejected",
    "round_s",
    "train_s",
    "eval_s",
    "wall_s",
]
CLIENT_COLUMNS = ["round", "client", "samples", "train_loss", "train_acc", "steps", "accepted", "seconds"]


def process_start_time() -> float:
    """When this process started (epoch seconds), so wall_s counts imports and start-up too."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # psutil comes with ray[default]; fall back to import time without it
        return _IMPORTED_AT


_IMPORTED_AT = time.time()


class _CsvLog:
    """Append rows to a CSV file, flushed per call so a crash leaves every finished round on disk."""

    def __init__(self, path: Path, columns: list[str]):
        self.path = path
        self.columns = columns
        with path.open("w", newline="") as f:
            csv.writer(f).writerow(columns)

    def write(self, rows: list[dict]) -> None:
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, self.columns, extrasaction="ignore")
            writer.writerows(rows)


class RunTracker:
    """Writes the run's metrics as it goes and plots them at the end."""

    def __init__(self, out_dir: Path, total_rounds: int):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.total_rounds = total_rounds
        self.started = process_start_time()
        self.metrics = _CsvLog(self.out_dir / "metrics.csv", METRIC_COLUMNS)
        self.clients = _CsvLog(self.out_dir / "clients.csv", CLIENT_COLUMNS)
        self.rows: list[dict] = []

    def wall_s(self) -> float:
        return time.time() - self.started

    def log_round(self, row: dict, client_rows: list[dict]) -> None:
        row = {**row, "wall_s": round(self.wall_s(), 3)}
        self.rows.append(row)
        self.metrics.write([row])
        self.clients.write(client_rows)
        acc = "  n/a " if row["test_acc"] == "" else f"{100 * row['test_acc']:6.2f}%"
        loss = "  n/a " if row["test_loss"] == "" else f"{row['test_loss']:.4f}"
        log.info(
            "round %*d/%d | test acc %s | test loss %s | train loss %.4f | %d clients | %.2f s | wall %.1f s",
            len(str(self.total_rounds)),
            row["round"],
            self.total_rounds,
            acc,
            loss,
            row["train_loss"],
            row["clients"],
            row["round_s"],
            row["wall_s"],
        )

    def finish(self) -> Path | None:
        """Plot test accuracy and loss per round to metrics.png; returns its path."""
        rows = [r for r in self.rows if r["test_acc"] != ""]
        if not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rounds = [r["round"] for r in rows]
        fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
        ax_acc.plot(rounds, [100 * r["test_acc"] for r in rows], marker="o", ms=3)
        ax_acc.set(xlabel="round", ylabel="test accuracy (%)", title="Global model accuracy")
        ax_loss.plot(rounds, [r["test_loss"] for r in rows], marker="o", ms=3, label="test")
        ax_loss.plot(
            [r["round"] for r in self.rows], [r["train_loss"] for r in self.rows], label="train (clients)"
        )
        ax_loss.set(xlabel="round", ylabel="cross-entropy", title="Loss")
        ax_loss.legend()
        for ax in (ax_acc, ax_loss):
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path = self.out_dir / "metrics.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
