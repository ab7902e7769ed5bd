"""Per-node pre-aggregation (`runtime.node_aggregation`, issue 18 item 5): which shares are summed on their
node, the server's inbound bytes, and a run with node sums equal to one without (to float64 rounding)."""

from __future__ import annotations

import csv
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from raypfl.algorithms.aggregate import MODEL, Aggregate, ClientUpdate, Stacked
from raypfl.config import RuntimeSpec
from raypfl.driver.experiment import run_experiment
from raypfl.runtime.node_aggregation import MODES, node_groups, sum_partials
from raypfl.runtime.parameter_server import ParameterServer
from raypfl.runtime.ray_runtime import RayRuntime
from raypfl.runtime.recovery import Share
from tests.conftest import REPO, TINY, make_config
from tests.runtime.kept_actors import use_kept

D = 40

#: The bound of a run with node sums vs one without, as tests/runtime/test_runtimes.py's CROSS_RUNTIME and
#: for the same reason: every client's float32 update is the same bits (same actor, kernels, seeds); only the
#: float64 sum of the partials is grouped differently ((a+b)+(c+d) vs ((a+b)+c)+d). IEEE 754 double addition
#: is correctly rounded on every x86-64 CPU (Intel and AMD alike: SSE2, no x87), so each grouping errs by
#: at most (pushes-1) * 2^-53 * sum|terms| ~ 1e-16 relative, which moves a float32 weight (rounded from the
#: float64 mean) by at most one float32 ulp, and only when the sum lands that close to a rounding boundary.
#: Three rounds of training on top of one-ulp differences stay far below 1e-5; measured: 0.0.
NODE_SUM_BOUND = 1e-5


def test_auto_sums_the_nodes_with_two_busy_actors_except_the_servers():
    nodes = ["a", "b", "a", "s", "c", "s", "b", "a"]
    assert node_groups(nodes, "s", "auto") == [[0, 2, 7], [1, 6], [3], [4], [5]]
    assert node_groups(nodes, "s", "always") == [[0, 2, 7], [1, 6], [3, 5], [4]]
    assert node_groups(nodes, "s", "never") == [[k] for k in range(8)]


def test_unknown_nodes_and_lone_actors_push_on_their_own():
    assert node_groups([None, None, "a"], "s", "always") == [[0], [1], [2]]
    assert node_groups(["a"], None, "auto") == [[0]]
    assert node_groups([], "s", "auto") == []
    with pytest.raises(ValueError, match="node_aggregation"):
        node_groups(["a"], "s", "on")


def test_the_knob_is_checked_with_the_config():
    from raypfl.errors import ConfigError
    from raypfl.validation import validate

    validate(make_config("runtime.node_aggregation=never"))
    with pytest.raises(ConfigError, match="node_aggregation=on must be one of auto, always, never"):
        validate(make_config("runtime.node_aggregation=on"))


def fake_runtime(mode: str, stacks: bool, nodes: list[str], server: str = "s") -> RayRuntime:
    runtime = RayRuntime(RuntimeSpec(node_aggregation=mode))
    runtime.setup = SimpleNamespace(stacks=stacks)
    runtime.placement = [{"actor": k, "node_id": node} for k, node in enumerate(nodes)]
    runtime.server_location = {"node_id": server}
    return runtime


def shares_of(actors: list[int]) -> list[Share]:
    return [Share(slot, actor, None, [actor]) for slot, actor in enumerate(actors)]


def test_the_runtime_groups_busy_actors_by_their_placement():
    runtime = fake_runtime("auto", False, ["a", "a", "s", "s", "b", "a"])
    groups = runtime.push_groups(shares_of([0, 2, 3, 4, 5]))  # actor 1 idle this round
    assert [[share.actor for share in group] for group in groups] == [[0, 5], [2], [3], [4]]


@pytest.mark.parametrize("mode", ["auto", "always"])
def test_stacked_updates_are_never_summed_on_a_node(mode):
    """A robust aggregator needs every client's update: its stacks go to the server one per actor."""
    runtime = fake_runtime(mode, True, ["a", "a", "a", "a"])
    groups = runtime.push_groups(shares_of([0, 1, 2, 3]))
    assert [[share.actor for share in group] for group in groups] == [[0], [1], [2], [3]]


def partials(groups: list[list[int]], stacked: bool = False) -> list[Aggregate]:
    rng = np.random.default_rng(1)
    updates = [
        ClientUpdate(c, {MODEL: rng.normal(size=D).astype(np.float32)}, {MODEL: float(c + 1)})
        for c in range(7)
    ]
    parts = []
    for group in groups:
        part = Stacked() if stacked else Aggregate()
        for c in group:
            part.add(updates[c])
        parts.append(part)
    return parts


def server() -> ParameterServer:
    step = lambda broadcast, state, agg: ({MODEL: agg.mean(MODEL).astype(np.float32)}, state)  # noqa: E731
    return ParameterServer({MODEL: np.zeros(D, np.float32)}, step)


def test_a_node_sum_is_one_push_of_one_partials_bytes_and_the_same_mean_to_rounding():
    parts = partials([[0, 1], [2, 3, 4], [5], [6]])
    plain, summed = server(), server()
    plain.expect(0, 4)
    for slot, part in enumerate(parts):
        plain.push(0, part, slot)
    summed.expect(0, 2)
    summed.push(0, sum_partials(parts[0], parts[1]), 0)
    summed.push(0, sum_partials(parts[2], parts[3]), 1)
    for ps, pushes in ((plain, 4), (summed, 2)):
        summary = ps.round_summary()
        assert (summary["pushes_in"], summary["bytes_in"]) == (pushes, pushes * D * 8)  # float64 sums
        assert sorted(summary["clients"]) == list(range(7))
        assert summary["weights"] == {MODEL: 28.0}  # integer weights: summed exactly in any order
    np.testing.assert_array_max_ulp(plain.pull(1)[MODEL], summed.pull(1)[MODEL], maxulp=1)


def test_reopen_starts_an_open_round_over_and_leaves_a_closed_one():
    ps = server()
    ps.expect(0, 2)
    ps.push(0, sum_partials(*partials([[0, 1], [2]])), 0)
    assert ps.reopen(0, 3)  # the node sum is dropped: three single pushes now
    for slot, part in enumerate(partials([[0], [1], [2]])):
        ps.push(0, part, slot)
    assert (ps.latest, sorted(ps.round_summary()["clients"])) == (1, [0, 1, 2])
    assert ps.round_summary()["pushes_in"] == 3
    assert not ps.reopen(0, 3)


def ray_config(mode: str):
    """TINY on two kept actors of half a CPU each (the session's Ray has 2), every round on the actors."""
    return make_config(
        *TINY,
        "runtime=ray",
        "runtime.num_actors=2",
        "runtime.cpus_per_actor=0.5",
        "runtime.warm_start=false",
        f"runtime.node_aggregation={mode}",
    )


@pytest.fixture(scope="module")
def runs(ray_session, kept, tmp_path_factory):
    """One undisturbed run per mode, on the module's kept actors."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_kept(monkeypatch, kept)
        return {mode: run_experiment(ray_config(mode), tmp_path_factory.mktemp(mode)) for mode in MODES}


def test_a_run_with_node_sums_equals_one_without(runs):
    """Two actors on the session's one node: `always` sums them into one push, `never` pushes two; the
    server receives half the bytes, the clients train the same, the model is the same to NODE_SUM_BOUND."""
    model_bytes = runs["never"].weights.size * 8  # one float64 partial
    assert [r["server_bytes_in"] for r in runs["never"].rounds] == [2 * model_bytes] * 3
    assert [r["server_bytes_in"] for r in runs["always"].rounds] == [model_bytes] * 3
    assert [r["server_bytes_in"] for r in runs["auto"].rounds] == [2 * model_bytes] * 3  # the server's node
    diff = np.abs(runs["always"].weights - runs["never"].weights).max()
    assert diff <= NODE_SUM_BOUND, f"max abs difference {diff}"
    assert runs["always"].rounds[0]["train_loss"] == runs["never"].rounds[0]["train_loss"]
    for a, b in zip(runs["always"].rounds, runs["never"].rounds):
        assert (a["clients"], a["bytes_up"]) == (b["clients"], b["bytes_up"])
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-4)


@pytest.mark.parametrize("victim", [0, 1])  # the actor that sums the node, and the other one
def test_an_actor_killed_in_a_round_with_a_node_sum_is_recovered(
    runs, kept, monkeypatch, tmp_path, caplog, victim
):
    """SIGKILL a client actor while round 2's node sum is on its way: the server starts round 2 over, the
    lost share is trained again and every share is pushed on its own (only that round: the next ones sum
    on the node again); the model is the undisturbed one's to NODE_SUM_BOUND."""
    from tests.runtime.test_actor_death import sigkill_during

    use_kept(monkeypatch, kept)
    killed = sigkill_during(monkeypatch, 2, victim)
    with caplog.at_level("WARNING"):
        hit = run_experiment(ray_config("always"), tmp_path)
    assert killed and "lost a node sum: its partials are pushed one by one" in caplog.text
    reference = runs["always"]
    model_bytes = reference.weights.size * 8
    assert [r["server_bytes_in"] for r in hit.rounds] == [model_bytes, 2 * model_bytes, model_bytes]
    assert [r["clients"] for r in hit.rounds] == [r["clients"] for r in reference.rounds]
    assert np.abs(hit.weights - reference.weights).max() <= NODE_SUM_BOUND


SCRIPT = REPO / "benchmarks" / "node_aggregation.py"


@pytest.mark.slow
def test_on_a_multi_node_cluster_auto_pushes_once_per_node_but_the_servers(tmp_path, data_root):
    """2 worker nodes x 2 actors (benchmarks/node_aggregation.py in a subprocess: the session's Ray owns
    this process's `ray.init`): `never` pushes 4 partials, `always` 2, `auto` 2 (server on the head) or 3
    (server on a worker node: its two actors push their own); the same model to NODE_SUM_BOUND."""
    table = tmp_path / "na.csv"
    command = [sys.executable, str(SCRIPT), "--nodes", "2", "--rounds", "2", "--no-report"]
    command += ["--csv", str(table), "--out", str(tmp_path / "runs")]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True, timeout=600)
    with open(table) as f:
        rows = {row["mode"]: row for row in csv.DictReader(f)}
    pushes = {mode: int(row["pushes"]) for mode, row in rows.items()}
    auto = 3 if rows["auto"]["server_node"] == "a worker's" else 2
    assert pushes == {"never": 4, "auto": auto, "always": 2}
    per_push = int(rows["never"]["server_bytes_in"]) // 4
    assert all(int(row["server_bytes_in"]) == pushes[mode] * per_push for mode, row in rows.items())
    assert all(float(row["max_abs_diff"]) <= NODE_SUM_BOUND for row in rows.values())
