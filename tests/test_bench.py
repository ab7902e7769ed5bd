"""The round-speed benchmark: runs implementations in fresh processes and compares them fairly."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import round_speed  # noqa: E402


@pytest.mark.slow
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


def test_ray_steady_state_skips_the_warm_start_driver_rounds():
    """On Ray the first rounds may train in the driver (warm start): they are not Ray's rounds to time. A run
    whose pool never took over (a fast machine) has no Ray round at all: round_speed then re-times Ray with
    runtime.warm_start=false instead of reporting the driver's speed as Ray's."""
    took_over = "actor pool ready after 6.1 s; the driver trained the first 3 round(s) meanwhile"
    assert round_speed.driver_rounds("ray", took_over) == 3
    assert round_speed.driver_rounds("ray_vec", "ray runtime: 2 client actors") == 0  # warm_start=false
    assert round_speed.driver_rounds("sequential", "") == 0
    assert round_speed.driver_rounds("ray", "round 12/12 | test acc") is None  # the pool never took over
    ends = [5.0, 6.0, 7.0, 12.0, 13.0, 14.5]  # rounds 1-3 in the driver, 4 the hand-over (first pool calls)
    assert round_speed.steady_gaps(ends, 3) == [1.0, 1.5]  # rounds 5 and 6
    assert round_speed.steady_gaps(ends, 0) == [1.0, 1.0, 5.0, 1.0, 1.5]  # rounds 2..6
    assert round_speed.steady_gaps(ends, 6) == round_speed.steady_gaps(ends, 5) == []  # nothing on the pool
