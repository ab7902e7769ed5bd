"""Device profiles, traces and the virtual round's close (raypfl.clock): unit tests, no training."""

from __future__ import annotations

import numpy as np
import pytest

from raypfl.clock import build_profiles, close_round, read_trace, upload_bytes
from raypfl.clock.profiles import MBIT
from raypfl.config import ClockSpec
from raypfl.errors import ConfigError
from raypfl.postprocess import ClientPipeline
from raypfl.postprocess.topk import TopK


def test_profiles_are_seeded_lognormal_around_the_medians():
    spec = ClockSpec(name="virtual", compute_sps=40.0, compute_sigma=1.0, down_mbps=8.0, up_mbps=2.0)
    a, b = build_profiles(spec, 5000, seed=3), build_profiles(spec, 5000, seed=3)
    assert np.array_equal(a.compute_sps, b.compute_sps)
    assert not np.array_equal(a.compute_sps, build_profiles(spec, 5000, seed=4).compute_sps)
    assert np.median(a.compute_sps) == pytest.approx(40.0, rel=0.1)
    assert np.std(np.log(a.compute_sps)) == pytest.approx(1.0, rel=0.1)
    assert np.median(a.up_bps) == pytest.approx(2.0 * MBIT, rel=0.1)
    flat = build_profiles(ClockSpec(compute_sigma=0.0, bandwidth_sigma=0.0), 10, seed=3)
    assert np.all(flat.compute_sps == 50.0) and np.all(flat.down_bps == 20.0 * MBIT)


def test_duration_is_download_compute_upload():
    spec = ClockSpec(compute_sps=100.0, compute_sigma=0.0, down_mbps=8.0, up_mbps=1.0, bandwidth_sigma=0.0)
    profiles = build_profiles(spec, 3, seed=0)
    # 1 MB down at 1 MB/s, 500 samples at 100/s, 0.25 MB up at 0.125 MB/s, 0.1 s latency each way
    assert profiles.duration(1, 500, 1_000_000, 250_000) == pytest.approx(1.1 + 5.0 + 2.1)


def _trace(tmp_path, text: str):
    path = tmp_path / "devices.csv"
    path.write_text(text)
    return path


def test_trace_rows_are_clients_reused_cyclically(tmp_path):
    path = _trace(tmp_path, "compute_sps,down_mbps,up_mbps,latency_s,model\n10,8,1,0,a\n20,16,2,0.5,b\n")
    profiles = read_trace(path, 5)
    assert profiles.compute_sps.tolist() == [10, 20, 10, 20, 10]
    assert profiles.up_bps[1] == 2 * MBIT and profiles.latency_s[3] == 0.5


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("compute_sps,down_mbps,latency_s\n1,1,0\n", "missing column(s) up_mbps"),
        ("compute_sps,down_mbps,up_mbps,latency_s\n-5,1,1,0\n", "line 2: compute_sps=-5 must be > 0"),
        ("compute_sps,down_mbps,up_mbps,latency_s\n5,1,0,0\n", "line 2: up_mbps=0 must be > 0"),
        ("compute_sps,down_mbps,up_mbps,latency_s\n5,1,1,-1\n", "line 2: latency_s=-1 must be >= 0"),
        ("compute_sps,down_mbps,up_mbps,latency_s\n5,fast,1,0\n", "down_mbps='fast' is not a number"),
        ("compute_sps,down_mbps,up_mbps,latency_s\n", "no rows"),
    ],
)
def test_a_bad_trace_is_one_line_naming_the_key(tmp_path, text, expected):
    path = _trace(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        read_trace(path, 4)
    message = str(err.value)
    assert message.startswith(f"clock.trace={path}: ") and expected in message and "\n" not in message


def test_round_closes_at_the_needed_answer():
    durations = {1: 5.0, 2: 1.0, 3: 3.0, 4: 9.0, 5: 3.0}
    closed = close_round(durations, need=3, deadline_s=None)  # over-selection: the first 3 of 5
    assert closed.kept == [2, 3, 5] and closed.late == [1, 4] and closed.round_s == 3.0
    everyone = close_round(durations, need=5, deadline_s=None)  # synchronous: waits for the slowest
    assert everyone.kept == [1, 2, 3, 4, 5] and everyone.late == [] and everyone.round_s == 9.0


def test_deadline_and_silent_clients():
    durations = {1: 5.0, 2: 1.0, 3: 3.0, 4: 9.0}
    closed = close_round(durations, need=4, deadline_s=6.0)
    assert closed.kept == [1, 2, 3] and closed.late == [4] and closed.round_s == 6.0
    # a silent (dropped) client is waited for until the deadline, as a slow one would be
    silent = close_round({1: 1.0, 2: 2.0}, need=2, deadline_s=7.0, silent={2})
    assert silent.kept == [1] and silent.late == [] and silent.round_s == 7.0
    # without a deadline the round ends with the last answer that can come
    assert close_round({1: 1.0, 2: 2.0}, need=2, deadline_s=None, silent={2}).round_s == 1.0


def test_upload_bytes_follow_the_client_steps():
    assert upload_bytes({"model": 1000}, None, 0) == 4000
    assert upload_bytes({"model": 1000, "tau": 1}, None, 0) == 4004
    pipeline = ClientPipeline([TopK(fraction=0.1, error_feedback=False)])
    assert upload_bytes({"model": 1000}, pipeline, 0) < 1000


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["clients.over_select=1.3"], "clients.over_select=1.3 keeps the first clients.per_round to finish"),
        (
            ["clock.name=virtual", "clients.speed=lognormal"],
            "clients.speed=lognormal slows clients with real sleeps; with clock.name=virtual",
        ),
        (["algorithm=fedbuff", "runtime=mpi"], "algorithm=fedbuff is asynchronous: runtime=mpi"),
        (["algorithm=fedbuff", "faults.drop_prob=0.1"], "algorithm=fedbuff is asynchronous: faults.*"),
        (["algorithm=fedbuff", "aggregator=median"], "algorithm=fedbuff is asynchronous: aggregator=median"),
        (["faults.deadline_quorum=0.1"], "faults.deadline_quorum=0.1 is what a round needs at its deadline"),
        (
            ["clock.name=virtual", "clients.over_select=1.3", "postprocess=[clip,central_dp]"]
            + ["clients.selection=poisson", "privacy.noise_multiplier=1", "algorithm.weighting=uniform"],
            "clients.over_select=1.3: central_dp's accountant assumes the sampling",
        ),
        (
            [
                "clock.name=virtual",
                "faults.round_timeout_s=9",
                "faults.quorum=0.5",
                "faults.deadline_quorum=0.8",
            ],
            "faults.deadline_quorum=0.8 must be <= faults.quorum=0.5",
        ),
    ],
)
def test_what_the_clock_and_streams_do_not_combine_with(overrides, expected):
    from raypfl.validation import validate
    from tests.conftest import SMALL_RUN, make_config

    with pytest.raises(ConfigError) as err:
        validate(make_config(*SMALL_RUN, *overrides))
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)


def test_virtual_clock_lets_deadlines_and_quorum_run_on_every_runtime():
    from raypfl.validation import validate
    from tests.conftest import SMALL_RUN, make_config

    virtual = ["clock.name=virtual", "faults.round_timeout_s=30", "faults.quorum=0.5"]
    validate(make_config(*SMALL_RUN, *virtual))  # runtime=sequential: decided by the driver
    with pytest.raises(ConfigError, match="^faults.quorum needs runtime=ray"):
        validate(make_config(*SMALL_RUN, "faults.quorum=0.5"))  # the real clock: only Ray has it


def test_deadline_quorum_is_the_floor_at_the_close():
    from raypfl.config import FaultsSpec

    faults = FaultsSpec(quorum=1.0, round_timeout_s=10.0, deadline_quorum=0.25)
    assert faults.quorum_size(8) == 8 and faults.floor_size(8) == 2 and faults.floor_size(0) == 0
    assert FaultsSpec(quorum=0.5).floor_size(8) == 4  # null: the quorum
