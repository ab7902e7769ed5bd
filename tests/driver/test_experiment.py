"""End to end through the command line: a run leaves config, metrics.csv, a plot and the final model."""

from __future__ import annotations

import csv

import pytest
import torch

from raypfl.driver.experiment import run_experiment
from raypfl.models.zoo import build_model
from raypfl.validation import validate
from tests.conftest import TINY, make_config
from tests.test_cli import run_cli

METRIC_COLUMNS = {"round", "test_acc", "test_loss", "train_loss", "clients", "round_s", "wall_s"}


def read_metrics(run_dir) -> list[dict]:
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_fedavg_on_ray_leaves_its_outputs(tmp_path, data_root, ray_address):
    # joins the session's Ray: a Ray of its own costs ~10 s more (tests/jobs/test_signals.py and
    # tests/runtime/test_ray_start.py start their own)
    address = f"runtime.address={ray_address}"
    proc = run_cli("+experiment=fedavg", *TINY, address, f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "round 1/3 | test acc" in log and "round 3/3" in log
    rows = read_metrics(tmp_path)
    assert set(rows[0]) >= METRIC_COLUMNS and [int(r["round"]) for r in rows] == [1, 2, 3]
    assert all(int(r["clients"]) == 4 for r in rows)
    walls = [float(r["wall_s"]) for r in rows]
    assert walls == sorted(walls) and walls[0] > float(rows[0]["round_s"]) > 0  # wall counts start-up too
    for before, row in zip(rows, rows[1:]):  # no second counted twice: a round starts after the last ended
        assert float(row["round_s"]) <= float(row["wall_s"]) - float(before["wall_s"]) + 0.02
    assert float(rows[-1]["test_acc"]) > 0.75
    with (tmp_path / "clients.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 12  # 3 rounds x 4 clients
    for plot in ("metrics.png", "clients.png", "time.png"):
        assert (tmp_path / plot).stat().st_size > 10_000, plot
    for row in rows:  # the time breakdown adds up to the training time
        parts = float(row["compute_s"]) + float(row["comm_s"]) + float(row["aggregate_s"])
        assert abs(parts - float(row["train_s"])) < 0.01 and float(row["compute_s"]) > 0
        assert int(row["bytes_down"]) == 4 * 199_210 * 4  # 4 clients x mlp's float32 weights
    assert "per_round: 4" in (tmp_path / "config.yaml").read_text()
    assert "${" not in (tmp_path / "config.yaml").read_text()  # resolved
    model = build_model("mlp")
    model.load_state_dict(torch.load(tmp_path / "model.pt"))


def test_centralized_baseline_runs_and_learns(tmp_path, data_root):
    # in-process: the run writes the same outputs (the command line is tested above)
    cfg = make_config(
        "+experiment=baseline",
        "dataset.train_limit=3000",
        "dataset.test_limit=1000",
        "model=mlp",
        "train.rounds=2",
    )
    validate(cfg)
    threads = torch.get_num_threads()
    try:
        run_experiment(cfg, tmp_path)
    finally:
        torch.set_num_threads(threads)  # the baseline uses both cores (runtime.torch_threads=2)
    rows = read_metrics(tmp_path)
    assert len(rows) == 2 and all(r["clients"] == "1" for r in rows)
    assert float(rows[-1]["test_acc"]) > 0.85
    with (tmp_path / "clients.csv").open() as f:
        client_rows = list(csv.DictReader(f))
    assert [int(r["samples"]) for r in client_rows] == [3000, 3000]  # all the training data, every epoch
    assert (tmp_path / "model.pt").exists() and (tmp_path / "metrics.png").exists()


def test_a_round_submitted_during_the_last_evaluation_starts_when_it_is_done():
    """Ray queues round r's evaluation before round r+1's training: r+1's time starts at that evaluation's
    end, never before (its comm_s would count the evaluation again) nor after its own training."""
    from raypfl.driver.experiment import PendingRound

    previous = PendingRound(None, None, started=0.0, trained=5.0, evaluation=None, broadcast_bytes=0)
    previous.done = 7.0
    during = PendingRound(None, None, started=5.1, trained=11.0, evaluation=None, broadcast_bytes=0)
    during.follow(previous)
    assert during.started == 7.0
    after = PendingRound(None, None, started=8.0, trained=12.0, evaluation=None, broadcast_bytes=0)
    after.follow(previous)  # sequential: the evaluation was done before the round began
    assert after.started == 8.0
    first = PendingRound(None, None, started=1.0, trained=2.0, evaluation=None, broadcast_bytes=0)
    first.follow(None)
    assert first.started == 1.0
