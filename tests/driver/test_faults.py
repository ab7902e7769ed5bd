"""Fault tolerance: injected faults, retries, quorum, load balancing, membership, checkpoints and resume."""

from __future__ import annotations

import csv
import signal

import numpy as np
import pytest
import torch

from raypfl.config import ClientsSpec, FaultsSpec
from raypfl.driver.balancing import WorkloadBalancer
from raypfl.driver.experiment import run_experiment
from raypfl.driver.membership import Membership
from raypfl.driver.selection import CohortSampler
from raypfl.errors import ConfigError, RunStopped
from raypfl.jobs.checkpoint import FILENAME, load_checkpoint, save_checkpoint
from tests.conftest import TINY, make_config
from tests.runtime.kept_actors import use_kept
from tests.test_cli import run_cli

SEQ = [*TINY, "runtime=sequential"]


def client_rows(run_dir) -> list[dict]:
    with (run_dir / "clients.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, data_root):
    """The fault-free reference, 3 rounds on TINY, sequential."""
    return run_experiment(make_config(*SEQ), tmp_path_factory.mktemp("plain"))


# --- client-side injection (every runtime) --------------------------------------------------------------


def test_transient_errors_are_retried_and_change_nothing(plain_run, tmp_path):
    run = run_experiment(make_config(*SEQ, "faults.error_prob=0.4", "faults.max_retries=6"), tmp_path)
    assert sum(r["retries"] for r in run.rounds) > 0
    assert all(r["status"] == "ok" for r in client_rows(tmp_path))
    # a retry re-runs the client from the same (round, client) seed: the same model comes out
    np.testing.assert_array_equal(run.weights, plain_run.weights)


def test_nan_updates_are_rejected_and_never_averaged(plain_run, tmp_path):
    run = run_experiment(make_config(*SEQ, "faults.corrupt_prob=0.3", "train.rounds=4"), tmp_path)
    rows = client_rows(tmp_path)
    rejected = [r for r in rows if r["status"] == "rejected"]
    assert rejected and sum(r["rejected"] for r in run.rounds) == len(rejected)
    assert all(r["accepted"] == "False" for r in rejected)
    assert np.isfinite(run.weights).all()
    assert run.final_accuracy > plain_run.final_accuracy - 0.05


def test_no_quorum_stops_with_a_checkpoint_or_skips(tmp_path):
    cfg = make_config(*SEQ, "faults.drop_prob=0.5", "train.rounds=4")
    with pytest.raises(RunStopped, match="below faults.quorum=1.0") as err:
        run_experiment(cfg, tmp_path / "fail")
    assert f"resume={tmp_path / 'fail'}" in str(err.value)
    state = load_checkpoint(tmp_path / "fail")
    assert state["round"] == 1 and len(state["rows"]) == 1
    run = run_experiment(
        make_config(*SEQ, "faults.drop_prob=0.5", "faults.on_no_quorum=skip"), tmp_path / "skip"
    )
    assert [r["quorum"] for r in run.rounds] == [0, 0, 0]
    assert all(r["clients"] == 0 for r in run.rounds)
    rows = client_rows(tmp_path / "skip")
    assert {r["status"] for r in rows} == {"ok", "dropped"}
    assert all((r["rtt_s"] == "") == (r["status"] == "dropped") for r in rows)  # answers only have a rtt


@pytest.mark.slow
def test_no_quorum_exits_with_code_3(tmp_path, data_root):
    proc = run_cli(*SEQ, "faults.drop_prob=0.5", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "error: round 1: only" in proc.stderr and f"resume={tmp_path}" in proc.stderr
    assert (tmp_path / FILENAME).exists()


def test_lognormal_speeds_slow_clients_for_real(tmp_path):
    run_experiment(
        make_config(*SEQ, "clients.speed=lognormal", "clients.speed_sigma=1.5", "train.rounds=1"), tmp_path
    )
    rows = client_rows(tmp_path)
    seconds = sorted(float(r["seconds"]) for r in rows)
    assert seconds[-1] > 2 * seconds[0]  # the slowest client took much longer than the fastest


# --- load balancing and membership (driver side) --------------------------------------------------------


def test_aimd_adds_an_epoch_on_time_and_halves_when_late():
    balancer = WorkloadBalancer(FaultsSpec(balance="aimd", start_epochs=4, max_epochs=6))
    assert balancer.work([1, 2]) == {c: {"local_epochs": 4, "local_steps": None} for c in (1, 2)}
    balancer.observe([{"client": 1, "status": "ok"}, {"client": 2, "status": "late"}])
    assert balancer.work([1, 2])[1]["local_epochs"] == 5 and balancer.work([2])[2]["local_epochs"] == 2
    for _ in range(3):
        balancer.observe([{"client": 1, "status": "ok"}, {"client": 2, "status": "dropped"}])
    assert balancer.epochs == {1: 6, 2: 1}  # capped at max_epochs, floored at 1
    restored = WorkloadBalancer(FaultsSpec(balance="aimd"))
    restored.load_state_dict(balancer.state_dict())
    assert restored.epochs == balancer.epochs


def test_steps_rule_gives_slow_clients_fewer_steps():
    balancer = WorkloadBalancer(FaultsSpec(balance="steps", target_round_s=1.0), parallelism=2)
    assert balancer.work([0, 1]) == {}  # nothing measured yet: the configured work
    balancer.observe(
        [
            {"client": 0, "status": "ok", "steps": 10, "seconds": 0.1},
            {"client": 1, "status": "ok", "steps": 10, "seconds": 1.0},
        ]
    )
    work = balancer.work([0, 1])  # each client's share: 1.0 s x 2 workers / 2 clients = 1 s
    assert work[0]["local_steps"] == 100 and work[1]["local_steps"] == 10


def test_membership_joins_on_schedule_and_evicts_repeat_failures():
    members = Membership(ClientsSpec(num=10, per_round=4, join_schedule={1: 4, 3: 4}), evict_after=2)
    assert members.eligible(1) == [0, 1, 2, 3] and members.eligible(2) == [0, 1, 2, 3]
    assert members.eligible(3) == list(range(8))
    members.observe(3, [{"client": 2, "status": "dropped"}, {"client": 5, "status": "failed"}])
    members.observe(4, [{"client": 2, "status": "failed"}, {"client": 5, "status": "ok"}])
    assert 2 not in members.eligible(5) and 5 in members.eligible(5)  # only consecutive failures count
    sampler = CohortSampler(ClientsSpec(num=10, per_round=4), seed=0)
    assert set(sampler.cohort(5, members.eligible(5))) <= set(members.eligible(5))
    assert sampler.cohort(1, [0, 1]) == [0, 1]  # fewer eligible than per_round: all of them
    # without membership changes, the draw is the one it always was
    assert sampler.cohort(4) == sampler.cohort(4, list(range(10)))


def test_clients_join_between_rounds(tmp_path):
    cfg = make_config(*SEQ, "clients.per_round=8", "clients.join_schedule={1: 2, 2: 3, 3: 3}")
    run = run_experiment(cfg, tmp_path)
    assert [r["clients"] for r in run.rounds] == [2, 5, 8]


# --- checkpoints and resume -------------------------------------------------------------------------------


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / FILENAME
    save_checkpoint(path, {"round": 1})

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(path, {"round": 2})
    assert load_checkpoint(tmp_path)["round"] == 1  # the last good checkpoint survived


def test_resume_refuses_a_different_experiment(tmp_path):
    run_experiment(make_config(*SEQ, "train.rounds=1"), tmp_path)
    with pytest.raises(ConfigError, match="model.name=mlp"):
        run_experiment(make_config(*SEQ, "model=tiny_cnn", f"resume={tmp_path}"), tmp_path / "b")
    with pytest.raises(ConfigError, match="no checkpoint"):
        run_experiment(make_config(*SEQ, f"resume={tmp_path / 'nowhere'}"), tmp_path / "c")
    with pytest.raises(ConfigError, match="train.rounds=1 leaves nothing to do"):
        run_experiment(make_config(*SEQ, "train.rounds=1", f"resume={tmp_path}"), tmp_path / "d")
    stateful_mpi = ["runtime=mpi", "optim.persistent_state=true", f"resume={tmp_path}"]
    with pytest.raises(ConfigError, match="MPI ranks keep their clients' state"):
        run_experiment(make_config(*SEQ, *stateful_mpi), tmp_path / "e")


@pytest.mark.slow
def test_sigkill_after_round_3_and_resume_gives_the_uninterrupted_model(tmp_path, data_root):
    args = [*SEQ, "train.rounds=6", "optim.persistent_state=true", "optim.momentum=0.5"]
    killed = tmp_path / "killed"
    proc = run_cli(*args, "faults.crash_after_round=3", f"hydra.run.dir={killed}")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert load_checkpoint(killed)["round"] == 3 and not (killed / "model.pt").exists()
    resumed = run_experiment(make_config(*args, f"resume={killed}"), tmp_path / "resumed")
    whole = run_experiment(make_config(*args), tmp_path / "whole")
    np.testing.assert_array_equal(resumed.weights, whole.weights)
    assert [r["round"] for r in resumed.rounds] == [1, 2, 3, 4, 5, 6]
    assert [r["test_acc"] for r in resumed.rounds] == [r["test_acc"] for r in whole.rounds]
    # the persistent optimizer state came back too (it is part of the checkpoint)
    state = load_checkpoint(tmp_path / "resumed")
    states = state["planner"]["client_states"]
    assert states and all("state" in s for s in states.values())


# --- Ray: quorum, deadlines, killed actors -----------------------------------------------------------------


def test_killing_an_actor_mid_round_loses_no_client_state(ray_session, kept, tmp_path, caplog):
    kept.kill(ray_session)  # this run starts its own actors (kept ones would hold the CPUs)
    args = [*TINY, "optim.persistent_state=true", "optim.momentum=0.9", "train.rounds=3"]
    # the undisturbed reference: the same run on the sequential runtime (the reference runtime: the same
    # seeds give the same model as an undisturbed Ray run, see test_runtimes; and it starts no actors)
    calm = run_experiment(make_config(*args, "runtime=sequential"), tmp_path / "calm")
    with caplog.at_level("WARNING", logger="raypfl"):
        hit = run_experiment(
            make_config(
                *args,
                "runtime.num_actors=2",
                "faults.kill_at_round=2",
                "faults.kill_count=1",
                "faults.retry_backoff_s=0",
            ),
            tmp_path / "hit",
        )
    log = caplog.text
    assert "fault injection killed client actors" in log and "restarted by Ray" in log
    assert sum(r["retries"] for r in hit.rounds) > 0 and all(r["quorum"] == 1 for r in hit.rounds)
    # the lost clients were retried from the driver's copy of their state: nothing was reset
    np.testing.assert_array_equal(hit.weights, calm.weights)


def test_dead_actor_clients_move_to_the_living(ray_session, kept, tmp_path, caplog):
    kept.kill(ray_session)  # this run starts its own actors (kept ones would hold the CPUs)
    args = [*TINY, "runtime.num_actors=2", "train.rounds=3", "faults.kill_at_round=1", "faults.kill_count=1"]
    with caplog.at_level("WARNING", logger="raypfl"):
        run = run_experiment(make_config(*args, "faults.kill_restart=false"), tmp_path)
    assert "is gone" in caplog.text and "move to actors" in caplog.text
    assert [r["clients"] for r in run.rounds] == [4, 4, 4]
    later = [r for r in client_rows(tmp_path) if r["round"] != "1"]
    assert {r["actor"] for r in later} == {"0"} or {r["actor"] for r in later} == {"1"}


def test_quorum_closes_the_round_without_stragglers(ray_session, kept, monkeypatch, tmp_path):
    use_kept(monkeypatch, kept)
    cfg = make_config(
        *TINY,
        "runtime.num_actors=2",
        "clients.per_round=6",
        "train.rounds=2",
        "faults.quorum=0.5",
        "clients.speed=lognormal",
        "clients.speed_sigma=2.0",
        "faults.balance=aimd",
        "faults.start_epochs=2",
    )
    run = run_experiment(cfg, tmp_path)
    rows = client_rows(tmp_path)
    assert all(r["clients"] + r["rejected"] >= 3 and r["quorum"] == 1 for r in run.rounds)
    assert sum(r["late"] for r in run.rounds) > 0
    late = [r for r in rows if r["status"] == "late"]
    assert all(r["rtt_s"] == "" for r in late) and all(
        float(r["rtt_s"]) > 0 for r in rows if r["status"] == "ok"
    )
    # aimd: late clients of round 1 that come back in round 2 got fewer epochs, on-time ones more
    work = {(r["round"], r["client"]): int(r["work"]) for r in rows}
    for r in rows:
        if r["round"] == "1" and ("2", r["client"]) in work:
            assert work[("2", r["client"])] == (3 if r["status"] == "ok" else 1)
    assert (tmp_path / "balance.png").stat().st_size > 10_000
    assert all(torch.isfinite(t).all() for t in torch.load(tmp_path / "model.pt").values())


def test_deadline_closes_the_round_and_cancels_stragglers(ray_session, kept, monkeypatch, tmp_path):
    use_kept(monkeypatch, kept)
    cfg_args = [
        *TINY,
        "runtime.num_actors=2",
        "train.rounds=1",
        "clients.speed=lognormal",
        # slowdowns are sleeps in proportion to compute: seed 0 slows client 4 of round 1's cohort ~26,000x,
        # late for the 2 s deadline on any machine (at 4.0: 162x, on time where its 19 steps take < 12 ms)
        "clients.speed_sigma=8.0",
        "faults.round_timeout_s=2.0",
        "faults.on_no_quorum=skip",
    ]
    run = run_experiment(make_config(*cfg_args), tmp_path)
    [row] = run.rounds
    assert row["late"] > 0 and row["quorum"] == 0 and row["clients"] == 0  # quorum 1.0 missed at the deadline
    # the round ended at the deadline, not when the slowest client would have finished
    assert 2.0 <= row["train_s"] < 6.0
    late = [r for r in client_rows(tmp_path) if r["status"] == "late"]
    assert late and all(r["rtt_s"] == "" for r in late)
    # faults.deadline_quorum: at the deadline the update applies with whoever answered in time (round 2:
    # round 1's 2 s also pay the actors' first training step, ~2-5 s of torch imports)
    more = ["train.rounds=2", "faults.deadline_quorum=0.25"]
    second = run_experiment(make_config(*cfg_args, *more), tmp_path / "kept").rounds[1]
    assert second["late"] > 0 and second["quorum"] == 1 and second["clients"] == second["answered"] >= 1
