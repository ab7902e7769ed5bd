"""Dead actors under the DEFAULT config (plain rounds, no `faults.*`): SIGKILL a client actor or the
parameter-server actor mid-run, and the run still ends with the model of an undisturbed run.

Why the weights are compared bit for bit (`assert_array_equal`), not within a tolerance: a lost share of the
cohort is trained again from the same global weights, work, client states (the driver's copies) and
(round, client) seeds, so its float64 partial sum is the same; the parameter server merges partials in slot
order (`ParameterServer.push(..., slot)`), whatever order they arrive in, so the sum, the server update and
the next float32 version are the same too (`test_slotted_pushes_...` checks the order on sums where it
matters). A new parameter server starts from the driver's reference to the round's weights and gets the
same partials in the same order. Test accuracy is that of the same weights. (On a cluster whose nodes
compute differently, e.g. other CPU kernels, a share trained on another node could differ in rounding, as
any placement could; on one machine nothing differs.)

The undisturbed reference is the sequential runtime (no actors to start, so it is cheap): with 2 clients
per round its float64 sum of the two clients' weighted updates is the same as the Ray runtime's sum of two
one-client partials (a + b == b + a), so an undisturbed Ray run gives the very same weights. The test loss
is compared to 1e-6 only: Ray evaluates the test set in two halves and adds their loss sums, the sequential
runtime in one piece.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from raypfl.algorithms.aggregate import Aggregate
from raypfl.driver.experiment import run_experiment
from raypfl.errors import RunStopped
from raypfl.jobs.checkpoint import FILENAME
from raypfl.runtime import recovery
from raypfl.runtime.base import notify
from raypfl.runtime.parameter_server import ParameterServer
from raypfl.runtime.ray_runtime import RayRuntime
from tests.conftest import make_config

#: The issue's run (default faults, plain rounds), without its runtime.
RUN = [
    "model=mlp",
    "dataset.train_limit=2000",
    "dataset.test_limit=500",
    "clients.num=10",
    "clients.per_round=2",
    "train.rounds=3",
]
#: On the session's Ray with 2 client actors.
RAY = ["runtime=ray", "runtime.num_actors=2"]
#: Client state kept by the driver: Ditto's personal models, tested every round on each client's held-out
#: data (per-client evaluation runs on the actors too, after the central one).
STATEFUL = ["algorithm=ditto", "partition.client_test_fraction=0.2", "train.eval_clients_every=1"]


@pytest.fixture(scope="module")
def calm(data_root, tmp_path_factory):
    """Undisturbed runs (sequential runtime, see the module docstring), by extra overrides: the references."""
    runs = {}

    def run(*extra: str):
        if extra not in runs:
            cfg = make_config(*RUN, *extra, "runtime=sequential")
            runs[extra] = run_experiment(cfg, tmp_path_factory.mktemp("calm"))
        return runs[extra]

    return run


def total_update(broadcast: dict, state: dict, agg: Aggregate) -> tuple[dict, dict]:
    return {"model": agg.totals["model"].astype(np.float32)}, state


def test_slotted_pushes_merge_in_slot_order_whatever_the_arrival_order():
    """Three partials whose float64 sum depends on the order: a re-sent (late) slot lands in its place."""
    values = [1e16, 1.0, -1e16]  # (1e16 + 1) - 1e16 == 0, but (1e16 - 1e16) + 1 == 1

    def partial(slot: int) -> Aggregate:
        part = Aggregate()
        part.totals, part.weights, part.clients = {"model": np.array([values[slot]])}, {"model": 1.0}, [slot]
        return part

    def published(order: list[int]) -> float:
        server = ParameterServer({"model": np.zeros(1, np.float32)}, total_update)
        server.expect(0, 3)
        assert [server.push(0, partial(slot), slot) for slot in order] == [False, False, True]
        assert server.round_summary()["clients"] == [0, 1, 2]
        return float(server.pull(1)["model"][0])

    assert published([0, 1, 2]) == published([0, 2, 1]) == published([2, 1, 0]) == 0.0
    # unslotted pushes merge in arrival order: the late partial would have changed the sum
    server = ParameterServer({"model": np.zeros(1, np.float32)}, total_update)
    server.expect(0, 3)
    for slot in (0, 2, 1):
        server.push(0, partial(slot))
    assert float(server.pull(1)["model"][0]) == 1.0


def sigkill_during(monkeypatch, round_idx: int, target: int | str, before_settle: bool = False) -> list[int]:
    """SIGKILL actor `target` (a pool index, or "server") when round `round_idx` calls `on_submitted`
    (plain rounds: once its work is sent; fault-tolerant rounds: as the round starts).

    `before_settle`: before the previous round's evaluation is collected (it may still run on the actor),
    else right after (a client actor is then training this round's clients). Returns the killed pids.
    """
    killed: list[int] = []
    original = RayRuntime.run_round

    def run_round(self, plan, on_submitted=None):
        if plan.round_idx != round_idx:
            return original(self, plan, on_submitted)

        def kill() -> None:
            pid = self.server_location["pid"] if target == "server" else self.placement[target]["pid"]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

        def submitted() -> None:
            if before_settle:
                kill()
            notify(on_submitted)
            if not before_settle:
                kill()

        return original(self, plan, submitted)

    monkeypatch.setattr(RayRuntime, "run_round", run_round)
    return killed


def assert_same_run(hit, ref) -> None:
    np.testing.assert_array_equal(hit.weights, ref.weights)  # bit for bit: see the module docstring
    assert [r["test_acc"] for r in hit.rounds] == [r["test_acc"] for r in ref.rounds]
    losses = [r["test_loss"] for r in ref.rounds]
    assert [r["test_loss"] for r in hit.rounds] == pytest.approx(losses, abs=1e-6)
    assert [r["clients"] for r in hit.rounds] == [r["clients"] for r in ref.rounds] == [2, 2, 2]
    for key in ("client_acc_mean", "personal_acc_mean"):  # the same weights and personal models
        assert [r.get(key) for r in hit.rounds] == [r.get(key) for r in ref.rounds]


@pytest.mark.slow
def test_killed_parameter_server_and_client_actor_are_replaced_and_the_model_is_unchanged(
    ray_session, calm, monkeypatch, tmp_path, caplog
):
    """One run, two deaths (one Ray run instead of two: each starts three actor processes).

    The parameter-server actor, killed once round 2's work is sent, is rebuilt from the driver's weights of
    version 1, and round 3 runs on the new one. Client actor 0, killed as round 3 is handed out, before
    round 2's evaluation is collected: the evaluation part and the round's training on that actor are both
    redone on its replacement, from the driver's copies of the clients' personal models (Ditto), and every
    client's held-out score matches too."""
    extra = tuple(STATEFUL)
    reference = calm(*extra)
    killed_server = sigkill_during(monkeypatch, 2, "server")
    killed_client = sigkill_during(monkeypatch, 3, 0, before_settle=True)
    with caplog.at_level("WARNING", logger="raypfl"):
        hit = run_experiment(make_config(*RUN, *RAY, *extra), tmp_path)
    assert killed_server and killed_client
    assert "round 2: the parameter-server actor died; a new one starts from version 1" in caplog.text
    assert "client actor 0 died; a new actor takes its place" in caplog.text
    assert "training them again on actor" in caplog.text
    assert hit.rounds[2]["retries"] >= 1 and all(r["quorum"] == 1 for r in hit.rounds)
    assert_same_run(hit, reference)


@pytest.mark.slow
def test_a_killed_parameter_server_is_rebuilt_in_fault_tolerant_rounds(
    ray_session, calm, monkeypatch, tmp_path, caplog
):
    """As above, in fault-tolerant rounds (any faults.* set), which push one partial per client, in answer
    order; with 2 clients per round that is the same float64 sum again (a + b == b + a): the plain
    reference. (Plain rounds: the test above.)"""
    reference = calm()
    killed = sigkill_during(monkeypatch, 2, "server")
    with caplog.at_level("WARNING", logger="raypfl"):
        hit = run_experiment(make_config(*RUN, *RAY, "faults.max_retries=3"), tmp_path)
    assert killed
    assert "the parameter-server actor died; a new one starts from version 1" in caplog.text
    assert_same_run(hit, reference)


@pytest.mark.slow
def test_actors_that_keep_dying_stop_the_run_with_a_checkpoint_to_resume(
    ray_session, calm, monkeypatch, tmp_path
):
    monkeypatch.setattr(recovery, "MAX_REPLACEMENTS", 0)  # the first death is one too many
    sigkill_during(monkeypatch, 2, 1)
    with pytest.raises(RunStopped, match="client actor 1 died") as stopped:
        run_experiment(make_config(*RUN, *RAY), tmp_path / "stopped")
    message = str(stopped.value)
    assert (tmp_path / "stopped" / FILENAME).is_file()
    assert f"Checkpoint after round 1: {tmp_path / 'stopped' / FILENAME}" in message
    assert f"resume={tmp_path / 'stopped'}" in message
    monkeypatch.undo()
    resumed = run_experiment(  # sequential: nothing of the stopped run's Ray is needed to continue it
        make_config(*RUN, "runtime=sequential", f"resume={tmp_path / 'stopped'}"), tmp_path / "resumed"
    )
    np.testing.assert_array_equal(resumed.weights, calm().weights)
