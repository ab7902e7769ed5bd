"""Experiment configs, sweeps (basic and Ray launchers), sweep reports and W&B tracking."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from raypfl.data.load import load_data
from raypfl.driver.experiment import run_experiment
from raypfl.errors import ConfigError
from raypfl.models.io import initial_weights
from raypfl.validation import validate
from tests.conftest import CONF_DIR, REPO, make_config, sweep

#: ps_sync, ps_async, allreduce and gossip run end to end in tests/paradigms/test_paradigm_runs.py
PARADIGM_EXPERIMENTS = {"ps_sync", "ps_async", "allreduce", "gossip"}
#: fault_dynamic and fault_kill run end to end (on Ray, with their tables) in driver/test_fault_experiments.py
RUN_ELSEWHERE = PARADIGM_EXPERIMENTS | {"fault_dynamic", "fault_kill"}
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml") if p.stem not in RUN_ELSEWHERE)
SMALL = ["dataset.train_limit=1200", "dataset.test_limit=300", "model=mlp", "train.batch_size=20"]


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


#: How the smoke run shrinks the data (generated data has no train/test limits: fewer, smaller clients).
SMALL_DATA = {
    "synthetic_scale": ["dataset.test_clients=20", "dataset.max_size=200"],
    "fedprox_stragglers": ["dataset.test_clients=4", "dataset.max_size=200"],
}


#: Experiments whose cohorts are Poisson draws: a fixed-size cohort for the smoke run (2 clients, as asserted)
FIXED_SIZE = {"dp_fedavg": ["clients.selection=random"]}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_config_composes_and_runs_one_round(name, tmp_path, data_root, ray_session):
    overrides = [
        f"+experiment={name}",
        "train.rounds=1",
        "clients.num=4",
        "clients.per_round=2",
        *SMALL_DATA.get(name, ["dataset.train_limit=600", "dataset.test_limit=100"]),
        *FIXED_SIZE.get(name, []),
    ]
    cfg = make_config(*overrides)
    if cfg.runtime.name == "ray":
        # the sequential runtime where the config allows it, else one client actor (each actor is a process
        # that imports torch: seconds of CPU); Ray runs of these configs are in test_experiment, test_faults
        try:
            cfg = make_config(*overrides, "runtime=sequential")
            validate(cfg)
        except ConfigError:
            cfg = make_config(*overrides, "runtime.num_actors=1")
    validate(cfg)
    result = run_experiment(cfg, tmp_path)
    [row] = result.rounds
    assert 0 <= row["test_acc"] <= 1 and np.isfinite(row["test_loss"]) and row["clients"] == 2
    start = initial_weights(cfg.model.name, load_data(cfg), cfg.seed)
    assert np.abs(result.weights - start).max() > 0  # the round trained and aggregated something
    assert (tmp_path / "metrics.csv").exists()


@pytest.fixture(scope="module")
def broken_sweep(tmp_path_factory, data_root, ray_address):
    """A 2x2 sweep on the Ray launcher, one lr invalid: two jobs fail, two succeed.

    One sweep for three tests: its report, the report rebuilt from its folders, and the Ray launcher (the
    two good jobs, 0 and 1, run at the same time, 2 at a time on the session Ray's 2 CPUs).
    """
    out = tmp_path_factory.mktemp("sweep")
    proc = sweep(
        out,
        "+experiment=fedavg",
        *SMALL,
        "train.rounds=2",
        "clients.num=6",
        "clients.per_round=3",
        "optim.lr=0.1,-1",
        "seed=0,1",
        "hydra/launcher=ray",
        f"hydra.launcher.address={ray_address}",
    )
    return out, proc


def test_sweep_reports_a_failed_job_and_summarises_the_rest(broken_sweep):
    out, proc = broken_sweep
    assert proc.returncode == 1, proc.stderr[-2000:]
    rows = read_csv(out / "summary.csv")
    assert len(rows) == 4
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "failed"]
    assert {r["optim.lr"] for r in rows[:2]} == {"0.1"} and {r["seed"] for r in rows} == {"0", "1"}
    assert all("optim.lr=-1 must be > 0" in r["error"] for r in rows[2:])
    assert all(float(r["final_acc"]) > 0.5 and float(r["total_s"]) > 0 for r in rows[:2])
    assert (out / "summary.png").stat().st_size > 10_000
    assert "2 of 4 jobs failed" in proc.stdout + proc.stderr


def test_ray_launcher_runs_jobs_concurrently(broken_sweep):
    out, proc = broken_sweep
    assert "4 jobs, 2 at a time, 1 client actor(s) each" in proc.stdout + proc.stderr
    rows = read_csv(out / "summary.csv")
    assert [r["status"] for r in rows[:2]] == ["ok", "ok"]  # jobs 2 and 3 fail (test above)
    (a_start, a_end), (b_start, b_end) = [(float(r["started_at"]), float(r["finished_at"])) for r in rows[:2]]
    assert max(a_start, b_start) < min(a_end, b_end), "the two jobs' run times do not overlap"
    for job in ("0", "1"):
        assert "runtime:\n  name: ray" in (out / job / "config.yaml").read_text()
        assert "num_actors: 1" in (out / job / "config.yaml").read_text()


def test_report_rebuilds_summary_from_multirun_and_run_folders(broken_sweep):
    out, _ = broken_sweep
    before = read_csv(out / "summary.csv")
    (out / "summary.csv").unlink()
    (out / "summary.png").unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "raypfl.tracking.report", str(out), "--target", "0.5"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 1  # failed jobs are still failed
    after = read_csv(out / "summary.csv")
    assert [r["final_acc"] for r in after] == [r["final_acc"] for r in before]
    assert all(r["rounds_to_target"] in {"1", "2"} for r in after[:2])  # 0.5 is reached within 2 rounds
    assert (out / "summary.png").exists()
    single = out / "0"
    proc = subprocess.run(
        [sys.executable, "-m", "raypfl.tracking.report", str(single)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0 and len(read_csv(single / "summary.csv")) == 1


def wandb_records(path: Path) -> list[bytes]:
    """Records of a .wandb file: 7-byte header, then LevelDB-log blocks of 32 KiB (FULL/FIRST/MIDDLE/LAST)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B run log"
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            records.append(pending)
            pending = b""
    return records


def _offline_records(run_dir: Path, kind: str, wait_s: float = 60.0) -> list:
    """The records of one kind in an offline run's log, once the log is complete.

    W&B's own service process writes the log and may still be flushing it when `run.finish()` has
    returned (seen on a busy machine): wait, up to `wait_s`, for the run's exit record, written last.
    """
    import time

    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2

    [path] = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    deadline = time.monotonic() + wait_s
    while True:
        records = []
        for data in wandb_records(path):
            record = wandb_internal_pb2.Record()
            try:
                record.ParseFromString(data)
            except DecodeError:  # the last record, half written
                if time.monotonic() < deadline:
                    break
                raise
            records.append(record)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def read_offline_config(run_dir: Path) -> dict:
    """The config an offline W&B run was started with."""
    import json

    [run] = _offline_records(run_dir, "run")
    return {item.key: json.loads(item.value_json) for item in run.config.update}


def read_offline_history(run_dir: Path) -> list[dict]:
    """The history rows of an offline W&B run."""
    import json

    return [
        {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in history.item}
        for history in _offline_records(run_dir, "history")
    ]


def test_wandb_offline_run_has_one_history_row_per_round(tmp_path, data_root, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = make_config(
        *SMALL, "logger=wandb", "runtime=sequential", "train.rounds=3", "clients.num=6",
        "clients.per_round=3", "partition.client_test_fraction=0.2", "train.eval_clients_every=2",
    )  # fmt: skip
    result = run_experiment(cfg, tmp_path, group="sweep-x", name="job0")
    history = read_offline_history(tmp_path)
    assert [row["_step"] for row in history] == [1, 2, 3]
    assert [row["test_acc"] for row in history] == pytest.approx([r["test_acc"] for r in result.rounds])
    assert all("bytes_down" in row and "round_s" in row for row in history)
    # the per-client evaluation's summary in the rounds that had one (2, and 3: the last)
    assert ["client_acc_mean" in row for row in history] == [False, True, True]
    assert history[-1]["client_acc_worst10"] == pytest.approx(result.rounds[-1]["client_acc_worst10"])
    assert history[-1]["client_metrics/_type"] == "table-file"  # the per-client table, with the last round
    # one table (wandb/latest-run links to the run's folder: the same file twice)
    [table] = {t.resolve() for t in Path(tmp_path).glob("wandb/*/files/media/table/client_metrics_*.json")}
    content = json.loads(table.read_text())
    status, acc = content["columns"].index("status"), content["columns"].index("eval_acc")
    evaluated = [row for row in content["data"] if row[status] == "eval"]
    assert len(evaluated) == 12 and all(0 <= row[acc] <= 1 for row in evaluated)  # 6 clients x rounds 2, 3
    config = read_offline_config(tmp_path)
    assert config["clients"]["num"] == 6
    assert config["dataset"]["root"] == os.environ["RAYPFL_DATA"]  # resolved, not ${oc.env:...}


def test_progress_bar_only_on_a_terminal(capsys):
    from raypfl.tracking.tracker import _Progress

    quiet = _Progress(3, enabled=False)
    quiet.update("acc 50%")
    quiet.close()
    assert capsys.readouterr().err == ""
    live = _Progress(3, enabled=True)
    live.update("acc 50%")
    live.close()
    assert "/3 [" in capsys.readouterr().err  # the bar was drawn (and cleared: leave=False)


@pytest.mark.slow
def test_optuna_search_runs_trials_and_reports_the_best(tmp_path, data_root):
    proc = sweep(
        tmp_path,
        "+experiment=tune_fedavg",
        *SMALL,
        "runtime=sequential",
        "train.rounds=1",
        "clients.num=4",
        "clients.per_round=2",
        "hydra.sweeper.n_trials=2",  # a best of two is a best: each trial is a job of ~1.5 s of CPU
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    import yaml

    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"optim.lr", "train.local_epochs"}
    rows = read_csv(tmp_path / "summary.csv")
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    assert best["best_value"] == pytest.approx(max(float(r["final_acc"]) for r in rows))
    assert all(0.005 <= float(r["optim.lr"]) <= 0.3 for r in rows)
