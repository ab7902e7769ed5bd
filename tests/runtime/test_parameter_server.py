"""The parameter server: versioned push/pull, bounded history, the server update applied once per round."""

from __future__ import annotations

import numpy as np
import pytest

from raypfl.algorithms.aggregate import Aggregate, ClientUpdate
from raypfl.runtime.parameter_server import ParameterServer, VersionEvicted


def mean_update(broadcast: dict, state: dict, aggregate: Aggregate) -> tuple[dict, dict]:
    """Adds the mean update to the model; counts rounds in the server state."""
    model = (broadcast["model"] + aggregate.mean()).astype(np.float32)
    return {"model": model}, {"rounds": state.get("rounds", 0) + 1}


def server(weights: np.ndarray, keep_versions: int = 2) -> ParameterServer:
    return ParameterServer({"model": weights}, mean_update, keep_versions=keep_versions)


def partial(*updates: tuple[int, float, float]) -> Aggregate:
    agg = Aggregate()
    for client, value, weight in updates:
        agg.add(ClientUpdate(client, {"model": np.full(3, value, np.float32)}, {"model": weight}))
    return agg


def test_round_closes_after_expected_pushes_with_weighted_mean():
    ps = server(np.zeros(3, np.float32), keep_versions=3)
    ps.expect(0, 2)
    assert ps.push(0, partial((0, 1.0, 1.0), (1, 2.0, 1.0))) is False
    assert ps.pull(1) is None  # not published yet
    assert ps.push(0, partial((2, 4.0, 2.0))) is True
    version, weights = ps.pull_latest()
    assert version == 1
    np.testing.assert_allclose(weights["model"], (1 + 2 + 2 * 4) / 4)
    assert ps.round_summary()["clients"] == [0, 1, 2]


def test_versions_are_bounded_and_evicted_versions_say_so():
    ps = server(np.zeros(3, np.float32), keep_versions=2)
    for v in range(3):
        ps.expect(v, 1)
        ps.push(v, partial((0, 1.0, 1.0)))
    assert ps.latest == 3 and list(ps.versions) == [2, 3]
    np.testing.assert_allclose(ps.pull(2)["model"], 2.0)
    with pytest.raises(VersionEvicted, match="version 1 was evicted"):
        ps.pull(1)
    assert ps.pull(4) is None


def test_stale_push_is_discarded_and_counted():
    ps = server(np.zeros(3, np.float32))
    ps.expect(0, 1)
    ps.push(0, partial((0, 1.0, 1.0)))
    assert ps.push(0, partial((1, 5.0, 1.0))) is False
    assert ps.stale_pushes == 1
    np.testing.assert_allclose(ps.pull_latest()[1]["model"], 1.0)


def test_round_of_only_rejected_updates_keeps_the_model():
    ps = server(np.ones(3, np.float32))
    ps.expect(0, 1)
    ps.push(0, partial((0, float("nan"), 1.0)))
    version, weights = ps.pull_latest()
    assert version == 1
    np.testing.assert_array_equal(weights["model"], np.ones(3))
    assert ps.round_summary()["rejected"] == [0]


def test_cannot_open_a_round_on_an_old_version():
    ps = server(np.zeros(3, np.float32))
    ps.expect(0, 1)
    ps.push(0, partial((0, 1.0, 1.0)))
    with pytest.raises(ValueError, match="latest is 1"):
        ps.expect(0, 1)


def test_quorum_close_publishes_what_arrived_and_discards_late_pushes():
    ps = server(np.zeros(3, np.float32))
    ps.expect(0, 3, quorum=2)
    ps.push(0, partial((0, 1.0, 1.0)))
    ps.push(0, partial((1, 3.0, 1.0)))
    summary = ps.close(0)  # the driver closes the round once 2 of 3 answered
    assert summary["quorum_met"] and summary["clients"] == [0, 1]
    np.testing.assert_allclose(ps.pull_latest()[1]["model"], 2.0)
    assert ps.push(0, partial((2, 100.0, 1.0))) is False  # the straggler's update arrives too late
    assert ps.stale_pushes == 1 and ps.latest == 1
    np.testing.assert_allclose(ps.pull_latest()[1]["model"], 2.0)


def test_round_without_quorum_keeps_the_model():
    ps = server(np.ones(3, np.float32))
    ps.expect(0, 3, quorum=3)
    ps.push(0, partial((0, 5.0, 1.0)))
    summary = ps.close(0)
    assert summary["quorum_met"] is False and ps.latest == 1
    np.testing.assert_allclose(ps.pull_latest()[1]["model"], 1.0)  # unchanged


def test_rejected_updates_count_as_answers_but_are_never_averaged():
    ps = server(np.zeros(3, np.float32))
    ps.expect(0, 2, quorum=2)
    bad = Aggregate()
    assert (
        bad.add(ClientUpdate(7, {"model": np.array([np.nan, 1.0, np.inf], np.float32)}, {"model": 1.0}))
        is False
    )
    ps.push(0, bad)
    ps.push(0, partial((1, 2.0, 1.0)))
    summary = ps.round_summary()
    assert summary["quorum_met"] and summary["rejected"] == [7] and summary["clients"] == [1]
    assert np.isfinite(ps.pull_latest()[1]["model"]).all()
    np.testing.assert_allclose(ps.pull_latest()[1]["model"], 2.0)


def test_server_state_is_versioned_with_the_broadcast_and_kept_when_no_update_is_applied():
    ps = server(np.zeros(3, np.float32), keep_versions=2)
    assert ps.server_state() == {}
    for v in range(2):
        ps.expect(v, 1)
        ps.push(v, partial((0, 1.0, 1.0)))
    assert ps.server_state() == {"rounds": 2} and ps.server_state(1) == {"rounds": 1}
    ps.expect(2, 1)
    ps.push(2, partial((0, float("nan"), 1.0)))  # rejected: the model and the state stay
    assert ps.server_state() == {"rounds": 2} and 1 not in ps.states  # evicted with its version
    ps.reset({"model": np.ones(3, np.float32)}, 7, {"rounds": 9})
    assert ps.latest == 7 and ps.server_state(7) == {"rounds": 9}
    with pytest.raises(TypeError, match="dicts of named numpy arrays"):
        ParameterServer(np.zeros(3, np.float32), mean_update)
