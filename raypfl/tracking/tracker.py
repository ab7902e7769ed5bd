"""Tracking: a progress line (or bar) per round, metrics.csv, clients.csv, plots, and optional W&B."""

from __future__ import annotations

import contextlib
import csv
import logging
import sys
import time
from pathlib import Path
from typing import Protocol

log = logging.getLogger("raypfl")

METRIC_COLUMNS = [
    "round",
    "test_acc",
    "test_loss",
    "train_loss",
    "clients",
    "answered",
    "rejected",
    "late",
    "failed",
    "retries",
    "quorum",
    "local_acc",
    "round_s",
    "train_s",
    "compute_s",
    "comm_s",
    "aggregate_s",
    "eval_s",
    "wall_s",
    "bytes_down",
    "bytes_up",
    "partial_work",  # clients of the cohort doing partial work (clients.partial_work_fraction)
    "server_bytes_in",  # bytes pushed into the parameter server (runtime.node_aggregation sums per node)
    # per-client evaluation (train.eval_clients_every): client accuracy of the global model and of the
    # personal models: mean, mean of the worst 10% of clients, standard deviation
    "client_acc_mean",
    "client_acc_worst10",
    "client_acc_std",
    "personal_acc_mean",
    "personal_acc_worst10",
    "personal_acc_std",
    # the update pipeline: epsilon spent so far (central_dp), the noise std in the released mean, the
    # fraction of updates clipped and their median norm before clipping (clip), malicious clients (attack)
    "epsilon",
    "dp_noise_std",
    "clipped_frac",
    "update_norm_median",
    "attackers",
    # the virtual clock (clock=virtual): its time at the round's close, and the round's virtual seconds
    "virtual_s",
    "round_virtual_s",
    # asynchronous FL (algorithm=fedbuff): a round is one server step; the staleness of its updates
    "staleness_mean",
    "staleness_max",
]
CLIENT_COLUMNS = [
    "round",
    "client",
    # ok | rejected (NaN/Inf) | late | dropped | failed | cancelled | straggler (partial work, dropped)
    # | eval (a per-client evaluation: eval_* and personal_* columns)
    "status",
    "actor",
    "work",  # local epochs or steps assigned by the load balancer ("" when not balancing)
    "samples",
    "train_loss",
    "train_acc",
    "local_acc",
    "steps",
    "accepted",
    "attempts",
    "seconds",  # the client's own training (+ straggler sleep) time
    "rtt_s",  # weights sent -> update received, as the driver saw it
    "bytes_up",  # the size of the statistics the client sent
    "eval_samples",  # per-client evaluation: the client's held-out samples
    "eval_acc",  # the global model on them
    "eval_loss",
    "personal_acc",  # the client's personal model on them (personalized algorithms)
    "personal_loss",
    "update_norm",  # the client's model update's l2 norm before clipping (postprocess=[clip, ...])
    "clipped",  # 1 if clip scaled it down
    "malicious",  # 1 for an attacker's update (attack.*)
    "virtual_s",  # clock=virtual: the client's simulated duration (download + compute + upload)
    "base_version",  # asynchronous FL: the global model version the client trained from
    "staleness",  # asynchronous FL: server steps between its base version and the step that used it
]


def process_start_time() -> float:
    """When this process started (epoch seconds), so wall_s counts imports and start-up too."""
    import psutil

    return psutil.Process().create_time()


class Sink(Protocol):
    """Somewhere else metrics go (W&B); the CSV files are always written."""

    def log_round(self, row: dict, client_rows: list[dict]) -> None: ...

    def finish(self, out_dir: Path, model_path: Path | None) -> None: ...


class _CsvLog:
    """Append rows to a CSV file, flushed per call so a crash leaves every finished round on disk."""

    def __init__(self, path: Path, columns: list[str]):
        self.path = path
        self.columns = columns
        with path.open("w", newline="") as f:
            csv.writer(f).writerow(columns)

    def write(self, rows: list[dict]) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.columns, extrasaction="ignore").writerows(rows)


class _Progress:
    """A live bar on a terminal; nothing extra (just the log lines) when output is a file or CI log."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        self._redirect = contextlib.nullcontext()
        if enabled:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=total, unit="round", file=sys.stderr, leave=False, dynamic_ncols=True)
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()

    def update(self, description: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(description, refresh=False)
            self.bar.update(1)

    def advance(self, rounds: int) -> None:
        if self.bar is not None:
            self.bar.update(rounds)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self._redirect.__exit__(None, None, None)
            self.bar = None


class RunTracker:
    """Writes the run's metrics as it goes, draws the plots at the end, and feeds any sinks."""

    def __init__(
        self, out_dir: Path, total_rounds: int, sinks: list[Sink] | None = None, started: float | None = None
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.total_rounds = total_rounds
        self.sinks = sinks or []
        self.started = started or process_start_time()
        self.metrics = _CsvLog(self.out_dir / "metrics.csv", METRIC_COLUMNS)
        self.clients = _CsvLog(self.out_dir / "clients.csv", CLIENT_COLUMNS)
        self.rows: list[dict] = []
        self.client_rows: list[dict] = []
        self.progress = _Progress(total_rounds, enabled=sys.stderr.isatty())

    def wall_s(self) -> float:
        return time.time() - self.started

    def restore(self, rows: list[dict], client_rows: list[dict]) -> None:
        """Carry a resumed run's earlier rounds over, so its CSV files and plots cover the whole run."""
        self.rows.extend(rows)
        self.client_rows.extend(client_rows)
        self.metrics.write(rows)
        self.clients.write(client_rows)
        self.progress.advance(len(rows))

    def log_round(self, row: dict, client_rows: list[dict], ended: float | None = None) -> None:
        """Record a finished round; `ended` (epoch seconds) if it ended before now (default: now)."""
        row = {**row, "wall_s": round((ended or time.time()) - self.started, 3)}
        self.rows.append(row)
        self.client_rows.extend(client_rows)
        self.metrics.write([row])
        self.clients.write(client_rows)
        for sink in self.sinks:
            sink.log_round(row, client_rows)
        acc = "  n/a " if row["test_acc"] == "" else f"{100 * row['test_acc']:6.2f}%"
        loss = "  n/a " if row["test_loss"] == "" else f"{row['test_loss']:.4f}"
        faults = "".join(f" | {row[k]} {k}" for k in ("rejected", "late", "failed", "retries") if row.get(k))
        log.info(
            "round %*d/%d | test acc %s | test loss %s | train loss %.4f | %d clients%s"
            " | %.2f s | wall %.1f s",
            len(str(self.total_rounds)),
            row["round"],
            self.total_rounds,
            acc,
            loss,
            row["train_loss"],
            row["clients"],
            faults,
            row["round_s"],
            row["wall_s"],
        )
        self.progress.update(f"acc {acc.strip()}")

    def close(self) -> None:
        """Stop the live progress bar (also when the run fails)."""
        self.progress.close()

    def finish(self, model_path: Path | None = None) -> None:
        """Draw the plots and close the sinks (matplotlib is imported here, after Ray is gone: ~26 MB less
        at the run's peak)."""
        from raypfl.tracking import plots

        if self.rows:
            plots.plot_metrics(self.rows, self.out_dir / "metrics.png")
            plots.plot_time_breakdown(self.rows, self.out_dir / "time.png")
        if self.client_rows:
            plots.plot_client_losses(self.client_rows, self.out_dir / "clients.png")
        if any(r.get("rtt_s") not in (None, "") for r in self.client_rows):
            plots.plot_client_timing(self.client_rows, self.out_dir / "balance.png")
        for sink in self.sinks:
            sink.finish(self.out_dir, model_path)
