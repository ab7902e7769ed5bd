"""The sweep report's curves.png (test accuracy per round, a line per job) and summary.png of a sweep of
non-numeric values, built from fake job folders (no training)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from raypfl.tracking import plots
from raypfl.tracking.report import build_report

COLUMNS = ["round", "test_acc", "test_loss", "train_loss"]


def fake_job(job_dir: Path, overrides: list[str], accs: list[float | None], status: str = "ok") -> Path:
    """A job folder as a sweep leaves it: .hydra/overrides.yaml, metrics.csv, result.json."""
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    with (job_dir / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        for i, acc in enumerate(accs, 1):  # None: a round that was not evaluated (train.eval_every)
            writer.writerow(
                {"round": i, "test_acc": "" if acc is None else acc, "test_loss": 1.0, "train_loss": 1}
            )
    result = {"status": status, "error": "" if status == "ok" else "boom", "total_s": 12.5}
    (job_dir / "result.json").write_text(json.dumps(result))
    return job_dir


@pytest.fixture
def spy(monkeypatch):
    """The curves each report draws, as (label, [(round, accuracy), ...]); the real plot is still written."""
    calls = []
    real = plots.plot_round_curves

    def record(curves, path, target=None):
        calls.append((curves, target))
        return real(curves, path, target)

    monkeypatch.setattr(plots, "plot_round_curves", record)
    return calls


def test_curves_png_has_a_line_per_job_labelled_by_swept_values(tmp_path, spy):
    common = ["+experiment=compare_algorithms", "train.rounds=3"]
    fake_job(tmp_path / "0", [*common, "algorithm=fedavg"], [0.5, 0.7, 0.8])
    fake_job(tmp_path / "1", [*common, "algorithm=fedadam"], [0.6, None, 0.95])
    fake_job(tmp_path / "2", [*common, "algorithm=scaffold"], [0.4], status="failed")
    fake_job(tmp_path / "3", [*common, "algorithm=fedyogi"], [], status="failed")  # failed before round 1

    csv_path, png_path, rows = build_report(tmp_path, target=0.9)

    [(curves, target)] = spy
    assert target == 0.9
    assert curves == [
        ("algorithm=fedavg", [(1, 0.5), (2, 0.7), (3, 0.8)]),
        ("algorithm=fedadam", [(1, 0.6), (3, 0.95)]),  # the round without evaluation is left out
        ("algorithm=scaffold (failed)", [(1, 0.4)]),
    ]
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    # only a non-numeric key was swept: summary.png has a bar per job (before: no summary.png at all)
    assert png_path == tmp_path / "summary.png" and png_path.stat().st_size > 10_000
    assert [(r["algorithm"], r["final_acc"], r["rounds_to_target"]) for r in rows] == [
        ("fedavg", 0.8, ""),
        ("fedadam", 0.95, 3),
        ("scaffold", 0.4, ""),
        ("fedyogi", "", ""),
    ]
    with csv_path.open() as f:
        assert [r["job"] for r in csv.DictReader(f)] == ["0", "1", "2", "3"]


def test_one_report_over_several_multirun_folders(tmp_path, spy):
    """Knobs that differ per algorithm: a multirun folder each, one report (and one plot) of them all."""
    fake_job(tmp_path / "fedprox" / "0", ["algorithm=fedprox", "algorithm.mu=0.01"], [0.5, 0.6])
    fake_job(tmp_path / "fedadam" / "1", ["algorithm=fedadam", "algorithm.server_lr=0.03"], [0.7, 0.9])
    fake_job(tmp_path / "fedadam" / "0", ["algorithm=fedadam", "algorithm.server_lr=0.01"], [0.6, 0.8])
    (tmp_path / "fedadam" / "summary.csv").write_text("a sub-sweep's own report is not a job\n")

    _, _, rows = build_report(tmp_path, target=0.9)

    assert [r["job"] for r in rows] == ["fedadam/0", "fedadam/1", "fedprox/0"]
    [(curves, _)] = spy
    assert [label for label, _ in curves] == [  # keys a job does not have are left out of its label
        "algorithm=fedadam, algorithm.server_lr=0.01",
        "algorithm=fedadam, algorithm.server_lr=0.03",
        "algorithm=fedprox, algorithm.mu=0.01",
    ]
    assert [r["algorithm.mu"] for r in rows] == ["", "", 0.01]
    assert (tmp_path / "curves.png").exists() and (tmp_path / "summary.png").exists()


def test_no_curves_without_evaluated_rounds(tmp_path, spy):
    fake_job(tmp_path / "0", ["optim.lr=0.1"], [], status="failed")
    fake_job(tmp_path / "1", ["optim.lr=-1"], [], status="failed")
    (tmp_path / "curves.png").write_bytes(b"stale")

    build_report(tmp_path)

    assert spy == [] and not (tmp_path / "curves.png").exists()


def test_a_single_run_folder_gets_its_curve(tmp_path, spy):
    run = fake_job(tmp_path / "run", ["+experiment=fedavg"], [0.9, 0.95])

    _, png_path, _ = build_report(run, target=0.97)

    assert png_path is None  # nothing swept: no summary.png
    [(curves, _)] = spy
    assert curves == [("experiment=fedavg", [(1, 0.9), (2, 0.95)])]  # a single job's label: all its overrides
    assert (run / "curves.png").exists()
