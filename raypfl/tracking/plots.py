"""Plots of a run (accuracy/loss, per-client loss, time breakdown) and of a sweep (final accuracy, curves)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

TIME_PARTS = [
    ("compute_s", "client compute"),
    ("comm_s", "communication + waiting"),
    ("aggregate_s", "aggregation"),
    ("eval_s", "evaluation"),
]


def save_figure(fig, path: Path) -> Path:
    for ax in fig.axes:
        if ax.get_xlabel() == "round":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_metrics(rows: list[dict], path: Path) -> Path:
    """Test accuracy (against virtual hours on the virtual clock, else rounds), and test and mean client
    training loss, per round."""
    evaluated = [r for r in rows if r["test_acc"] != ""]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    virtual = bool(evaluated) and all(r.get("virtual_s") not in (None, "") for r in evaluated)
    x = [float(r["virtual_s"]) / 3600 for r in evaluated] if virtual else [r["round"] for r in evaluated]
    ax_acc.plot(x, [100 * r["test_acc"] for r in evaluated], marker="o", ms=3)
    xlabel = "virtual hours (clock=virtual)" if virtual else "round"
    ax_acc.set(xlabel=xlabel, ylabel="test accuracy (%)", title="Global model accuracy")
    ax_loss.plot(
        [r["round"] for r in evaluated], [r["test_loss"] for r in evaluated], marker="o", ms=3, label="test"
    )
    ax_loss.plot(
        [r["round"] for r in rows], [r["train_loss"] for r in rows], label="train (mean over clients)"
    )
    ax_loss.set(xlabel="round", ylabel="cross-entropy", title="Loss")
    ax_loss.legend()
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_client_losses(client_rows: list[dict], path: Path, max_clients: int = 50) -> Path:
    """Each client's local training loss over the rounds it took part in (first `max_clients` clients)."""
    curves: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for row in client_rows:
        if row.get("train_loss") not in (None, ""):  # late, dropped and failed clients report no loss
            curves[int(row["client"])].append((int(row["round"]), float(row["train_loss"])))
    fig, ax = plt.subplots(figsize=(7, 4))
    for client in sorted(curves)[:max_clients]:
        points = sorted(curves[client])
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", lw=0.8, alpha=0.6)
    shown = min(len(curves), max_clients)
    ax.set(xlabel="round", ylabel="local training loss", title=f"Per-client training loss ({shown} clients)")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_time_breakdown(rows: list[dict], path: Path) -> Path:
    """Stacked bars per round: client compute, communication, aggregation, evaluation."""
    fig, ax = plt.subplots(figsize=(8, 4))
    rounds = [r["round"] for r in rows]
    bottom = [0.0] * len(rows)
    for key, label in TIME_PARTS:
        values = [float(r[key]) for r in rows]
        ax.bar(rounds, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set(xlabel="round", ylabel="seconds", title="Where each round's time goes")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def _sort_key(value: object) -> tuple:
    """Numbers in numeric order (10 < 50 < 100), before anything else in text order."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def plot_sweep(rows: list[dict], x_key: str, line_keys: list[str], path: Path) -> Path:
    """Final test accuracy against `x_key`, one line per combination of `line_keys` (failed jobs left out)."""
    lines: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for row in rows:
        if row["status"] != "ok" or row["final_acc"] == "":
            continue
        lines[tuple(row[k] for k in line_keys)].append((float(row[x_key]), 100 * float(row["final_acc"])))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, points in sorted(lines.items(), key=lambda kv: [_sort_key(v) for v in kv[0]]):
        points.sort()
        label = ", ".join(f"{k}={v}" for k, v in zip(line_keys, key)) or None
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    xs = [float(r[x_key]) for r in rows if r["status"] == "ok"]
    if xs and min(xs) > 0 and max(xs) / min(xs) >= 10:
        ax.set_xscale("log")
    ax.set(xlabel=x_key, ylabel="final test accuracy (%)", title="Sweep: final accuracy")
    if line_keys:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_sweep_bars(rows: list[dict], labels: list[str], path: Path) -> Path:
    """Final and best test accuracy per job, one pair of bars each (a sweep of non-numeric values)."""
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) + 2), 4.5))
    xs = range(len(rows))
    final = [100 * float(r["final_acc"]) if r["final_acc"] != "" else 0.0 for r in rows]
    best = [100 * float(r["best_acc"]) if r["best_acc"] != "" else 0.0 for r in rows]
    ax.bar([x - 0.2 for x in xs], final, width=0.4, label="final")
    ax.bar([x + 0.2 for x in xs], best, width=0.4, label="best")
    for x, value in zip(xs, final):
        ax.text(x - 0.2, value + 0.5, f"{value:.1f}", ha="center", va="bottom", fontsize=7)
    ticks = [label.replace(", ", "\n") for label in labels]
    ax.set_xticks(list(xs), ticks, fontsize=7, rotation=20, ha="right")
    shown = [v for v in final + best if v > 0]
    ax.set_ylim(max(0.0, min(shown, default=0.0) - 10), 101)
    ax.set(ylabel="test accuracy (%)", title="Sweep: final and best accuracy per job")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)


def plot_round_curves(
    curves: list[tuple[str, list[tuple[int, float]]]], path: Path, target: float | None = None
) -> Path:
    """Test accuracy per round, one line per (label, [(round, accuracy), ...]); with a `target` some line
    reaches, also a panel zoomed on the target (dashed line) and above, where the jobs differ late on."""
    top = max((p[1] for _, points in curves for p in points), default=0.0)
    zoom = target is not None and top >= target
    fig, axes = plt.subplots(1, 2 if zoom else 1, figsize=(13 if zoom else 8, 5), squeeze=False)
    cycle = ["-", "--", ":", "-."]
    for ax in axes[0]:
        for i, (label, points) in enumerate(curves):
            style = cycle[(i // 10) % len(cycle)]  # past matplotlib's 10 colours, change the line style
            ax.plot([p[0] for p in points], [100 * p[1] for p in points], style, lw=1.3, label=label)
        if target is not None:
            ax.axhline(100 * target, color="grey", ls="--", lw=0.8, label=f"target {100 * target:g}%")
        ax.set(xlabel="round", ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
    ax = axes[0][0]
    low = min((100 * p[1] for _, points in curves for p in points), default=0.0)
    ax.set_ylim(max(0.0, low - 2), 100)
    ax.set_title("Test accuracy per round")
    ax.legend(fontsize=7, loc="lower right")
    if zoom:
        axes[0][1].set_ylim(100 * target - 5, min(100.0, 100 * top + 1))
        axes[0][1].set_title(f"Zoom: {100 * target - 5:g}% and above")
    return save_figure(fig, path)


def plot_client_timing(client_rows: list[dict], path: Path, max_clients: int = 30) -> Path:
    """Per client and round: its work (assigned by the balancer, else the local steps it ran) and its
    round-trip time (x: late or missing)."""
    balanced = any(r.get("work") not in (None, "") for r in client_rows)
    work_key = "work" if balanced else "steps"
    by_client: dict[int, list[dict]] = defaultdict(list)
    for row in client_rows:
        by_client[int(row["client"])].append(row)
    fig, (ax_work, ax_rtt) = plt.subplots(1, 2, figsize=(11, 4))
    for client in sorted(by_client)[:max_clients]:
        rows = sorted(by_client[client], key=lambda r: int(r["round"]))
        color = ax_work.plot([], [])[0].get_color()
        worked = [r for r in rows if r.get(work_key) not in (None, "")]
        ax_work.plot(
            [int(r["round"]) for r in worked], [float(r[work_key]) for r in worked], ".-", c=color, lw=0.8
        )
        answered = [r for r in rows if r.get("rtt_s") not in (None, "")]
        missing = [r for r in rows if r.get("rtt_s") in (None, "")]
        ax_rtt.plot(
            [int(r["round"]) for r in answered], [float(r["rtt_s"]) for r in answered], ".-", c=color, lw=0.8
        )
        ax_rtt.plot([int(r["round"]) for r in missing], [0.0] * len(missing), "x", c=color)
    if balanced:
        ax_work.set(
            xlabel="round", ylabel="assigned local epochs / steps", title="Workload per client (balancer)"
        )
    else:
        ax_work.set(xlabel="round", ylabel="local steps run", title="Local steps per client (no balancing)")
    ax_rtt.set(xlabel="round", ylabel="round trip (s)", title="Round-trip time per client (x: late/missing)")
    for ax in (ax_work, ax_rtt):
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


BREAKDOWN_PARTS = [
    ("compute_s", "compute"),
    ("comm_s", "communication + waiting"),
    ("apply_s", "apply / aggregate"),
]


def plot_curves(runs: dict[str, list[dict]], path: Path) -> Path:
    """Test accuracy against samples processed (epochs) and against wall time, one line per run."""
    fig, (ax_s, ax_t) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in runs.items():
        rows = [r for r in rows if r.get("test_acc") not in (None, "")]
        acc = [100 * float(r["test_acc"]) for r in rows]
        ax_s.plot([float(r["epoch"]) for r in rows], acc, marker=".", label=name)
        ax_t.plot([float(r["wall_s"]) for r in rows], acc, marker=".", label=name)
    ax_s.set(xlabel="epochs of samples processed", ylabel="test accuracy (%)", title="Accuracy per sample")
    ax_t.set(xlabel="wall time (s)", ylabel="test accuracy (%)", title="Accuracy per second")
    for ax in (ax_s, ax_t):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        low = min((line.get_ydata().min() for line in ax.get_lines() if len(line.get_ydata())), default=0)
        ax.set_ylim(max(low, 80) - 1, 100)
    return save_figure(fig, path)


def plot_breakdown(means: dict[str, dict[str, float]], path: Path, shares: bool = False) -> Path:
    """Stacked bars of the mean time per iteration: compute, communication, apply.

    `shares=True` stacks percentages instead (iterations of different paradigms differ by orders of
    magnitude: a FedAvg round against one gradient step) and writes each bar's ms per iteration on top.
    """
    fig, ax = plt.subplots(figsize=(1.3 * len(means) + 3, 4.5))
    names = list(means)
    totals = [sum(means[n].get(k, 0.0) for k, _ in BREAKDOWN_PARTS) for n in names]
    bottom = [0.0] * len(names)
    for key, label in BREAKDOWN_PARTS:
        values = [
            100 * means[n].get(key, 0.0) / t if shares and t > 0 else 1000 * means[n].get(key, 0.0)
            for n, t in zip(names, totals)
        ]
        ax.bar(names, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values)]
    if shares:
        for x, total in enumerate(totals):
            ms = 1000 * total
            ax.text(
                x, 101, f"{ms:,.0f} ms" if ms >= 100 else f"{ms:.3g} ms", ha="center", va="bottom", fontsize=7
            )
        ax.set_ylim(0, 112)
        ax.set(
            ylabel="share of an iteration's time (%)",
            title="Where an iteration's time goes (ms per iteration on top)",
        )
    else:
        ax.set(ylabel="ms per iteration (mean over workers)", title="Where an iteration's time goes")
    ax.tick_params(axis="x", labelsize=8)
    ax.legend(fontsize=8, loc="lower right")
    return save_figure(fig, path)
