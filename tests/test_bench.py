"""The round-speed benchmark: runs implementations in fresh processes and compares them fairly."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import round_speed  # noqa: E402


def test_floor_and_raypfl_agree_and_are_timed(data_root, tmp_path):
    rows = round_speed.main(
        [
            "--models", "mlp",
            "--rounds", "3",
            "--impls", "floor", "sequential",
            "--train-limit", "2000",
            "--test-limit", "500",
            "--results", str(tmp_path),
        ]
    )  # fmt: skip
    by_impl = {r["impl"]: r for r in rows}
    assert set(by_impl) == {"floor", "sequential"}
    # same data, partition, initial weights, cohorts and shuffles: the same model, the same accuracy
    assert by_impl["sequential"]["final_acc"] == by_impl["floor"]["final_acc"] > 0.3
    assert by_impl["floor"]["vs_floor"] == 1.0
    for row in rows:
        assert row["round1_s"] > 0 and 0 < row["min_s"] <= row["median_s"] <= row["max_s"]
        assert row["peak_mb"] > 100  # a python process with torch and MNIST is well over 100 MB
    with open(tmp_path / "round_speed.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    assert "Accuracy disagrees" not in (tmp_path / "round_speed.md").read_text()


def test_a_disagreeing_implementation_is_flagged():
    rows = [
        {"model": "mlp", "impl": "floor", "final_acc": 0.94},
        {"model": "mlp", "impl": "other", "final_acc": 0.90},
        {"model": "mlp", "impl": "close", "final_acc": 0.945},
    ]
    problems = round_speed.agreement(rows)
    assert len(problems) == 1 and problems[0].startswith("other")
