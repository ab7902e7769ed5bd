"""Checkpoints cannot run code when loaded (issue 13, 2.1), and round-trip state bit for bit."""

from __future__ import annotations

import collections
import pickle
import zipfile

import numpy as np
import pytest
import torch

from raypfl.driver.experiment import run_experiment
from raypfl.errors import ConfigError
from raypfl.jobs.checkpoint import FILENAME, OLD_FILENAME, TAG, load_checkpoint, save_checkpoint
from tests.conftest import TINY, make_config

SEQ = [*TINY, "runtime=sequential"]


class Payload:
    """Unpickling this creates `marker`: the stand-in for a command a crafted checkpoint would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def crafted_pickle(path, marker, protocol=pickle.HIGHEST_PROTOCOL) -> None:
    """What a format-1 checkpoint looks like (a pickled dict), with the payload inside."""
    with path.open("wb") as f:
        pickle.dump({"format": 1, "round": 1, "x": Payload(marker)}, f, protocol=protocol)


# --- loading runs no code --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [OLD_FILENAME, FILENAME])
@pytest.mark.parametrize("by_folder", [True, False])
def test_a_crafted_pickle_is_refused_without_unpickling(tmp_path, name, by_folder):
    marker = tmp_path / "pwned"
    crafted_pickle(tmp_path / name, marker)
    location = tmp_path if by_folder else tmp_path / name
    with pytest.raises(ConfigError, match=r"older raypfl \(pickle format\).*unpickling can run code") as err:
        load_checkpoint(location)
    assert not marker.exists()
    assert str(tmp_path / name) in str(err.value) and "\n" not in str(err.value)


def test_resume_from_a_crafted_pickle_is_a_config_error(tmp_path):
    marker = tmp_path / "pwned"
    crafted_pickle(tmp_path / OLD_FILENAME, marker)
    with pytest.raises(ConfigError, match=r"older raypfl \(pickle format\)"):
        run_experiment(make_config(*SEQ, f"resume={tmp_path}"), tmp_path / "out")
    assert not marker.exists()


def test_a_protocol_0_pickle_is_not_unpickled_either(tmp_path):
    marker = tmp_path / "pwned"
    crafted_pickle(tmp_path / FILENAME, marker, protocol=0)  # starts with an opcode, not PROTO
    with pytest.raises(ConfigError, match="is not a raypfl checkpoint"):
        load_checkpoint(tmp_path)
    assert not marker.exists()


def test_a_crafted_torch_file_is_refused_by_the_safe_load(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"format": 2, "state": {"x": Payload(marker)}}, tmp_path / FILENAME)  # a zip, like format 2
    with pytest.raises(ConfigError, match="safe load refuses: .*open") as err:
        load_checkpoint(tmp_path)
    assert not marker.exists()
    assert "\n" not in str(err.value)


#: Format-2 files whose encoded parts are wrong: an object array (pointers out of the file's bytes),
#: an unknown tag, a generator name that is not a numpy bit generator.
BAD_ENCODINGS = {
    "object array": {TAG: "ndarray", "dtype": "|O", "shape": [1], "data": torch.zeros(8, dtype=torch.uint8)},
    "unknown tag": {TAG: "os.system", "items": []},
    "unknown generator": {TAG: "numpy_generator", "state": {"bit_generator": "__import__"}},
}


@pytest.mark.parametrize(
    "content",
    [b"", b"not a checkpoint\n", b"PK\x03\x04 truncated zip", "model.pt", "foreign zip", "wrong format"]
    + list(BAD_ENCODINGS),
)
def test_anything_else_is_a_config_error_naming_the_path(tmp_path, content):
    path = tmp_path / FILENAME
    if content == "model.pt":  # a run's saved model: a real torch file, but no checkpoint
        torch.save(collections.OrderedDict(w=torch.zeros(2)), path)
    elif content == "foreign zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("hello.txt", "hi")
    elif content == "wrong format":
        torch.save({"format": 99, "round": 1}, path)
    elif content in BAD_ENCODINGS:
        torch.save({"format": 2, "state": {"round": 1, "x": BAD_ENCODINGS[content]}}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"resume={tmp_path}: {path} is not a") as err:
        load_checkpoint(tmp_path)
    assert "\n" not in str(err.value)


# --- what a checkpoint holds comes back as it was --------------------------------------------------------


def test_state_round_trips_bit_for_bit(tmp_path):
    rng = np.random.default_rng(3)
    rng.random(5)  # mid-stream, not freshly seeded
    generator = torch.Generator().manual_seed(7)
    torch.rand(3, generator=generator)
    frozen = np.arange(6.0).reshape(2, 3)
    frozen.flags.writeable = False
    state = {
        "round": 3,
        "weights": rng.standard_normal(1000).astype(np.float32),
        "read_only": frozen,
        "transposed": np.arange(12).reshape(3, 4).T,
        "big_endian": np.arange(3, dtype=">i4"),
        "empty": np.zeros((0, 3)),
        "zero_d": np.array(2.5),
        "strings": np.array(["ab", "c"]),
        "scalars": [np.float64(0.1), np.int64(-4), np.bool_(True), np.float32(np.nan)],
        "numpy_generator": rng,
        "pcg64_state": rng.bit_generator.state,  # 128-bit ints
        "mt19937_state": np.random.MT19937(1).state,  # holds a uint32 array
        "bit_generator": np.random.Philox(9),
        "torch_generator": generator,
        "torch_generator_state": generator.get_state(),
        "planner": {
            "client_states": {0: {"state": {0: {"momentum_buffer": torch.randn(4)}}, "param_groups": []}},
            "membership": {"failures": {np.int64(5): 2}, "evicted": [1, 3]},
            "balancer": {"epochs": {}, "step_seconds": {2: 0.25}},
        },
        "rows": [{"round": 1, "test_acc": 0.5, "train_loss": float("nan"), "local_acc": ""}],
        "tuples": (1, (2, 3.5), None, b"raw", 1 + 2j),
        "ordered": collections.OrderedDict(b=1, a=2),
        "sets": [{1, 2}, frozenset({3}), {np.int64(4)}],
        "big": -(2**300),
        "__raypfl_type__": "a key that looks like the encoding's tag",
    }
    save_checkpoint(tmp_path / FILENAME, state)
    expected_draws = (rng.random(4), torch.rand(4, generator=generator))
    out = load_checkpoint(tmp_path)

    assert out.pop("format") == 2
    assert out.keys() == state.keys()
    for key in ("weights", "read_only", "transposed", "big_endian", "empty", "zero_d", "strings"):
        a, b = state[key], out[key]
        assert type(b) is np.ndarray and b.dtype == a.dtype and b.shape == a.shape, key
        assert a.tobytes() == b.tobytes(), key
    assert out["weights"].flags.writeable
    for a, b in zip(state["scalars"], out["scalars"], strict=True):
        assert type(b) is type(a) and a.tobytes() == b.tobytes()
    # the generators continue where the saved ones were
    assert isinstance(out["numpy_generator"], np.random.Generator)
    np.testing.assert_array_equal(out["numpy_generator"].random(4), expected_draws[0])
    assert torch.equal(torch.rand(4, generator=out["torch_generator"]), expected_draws[1])
    np.testing.assert_array_equal(out["bit_generator"].random_raw(3), np.random.Philox(9).random_raw(3))
    assert out["pcg64_state"] == state["pcg64_state"]
    assert out["mt19937_state"]["state"]["pos"] == state["mt19937_state"]["state"]["pos"]
    np.testing.assert_array_equal(
        out["mt19937_state"]["state"]["key"], state["mt19937_state"]["state"]["key"]
    )
    assert torch.equal(out["torch_generator_state"], state["torch_generator_state"])
    momentum = out["planner"]["client_states"][0]["state"][0]["momentum_buffer"]
    assert torch.equal(momentum, state["planner"]["client_states"][0]["state"][0]["momentum_buffer"])
    assert out["planner"]["membership"] == state["planner"]["membership"]
    assert out["planner"]["balancer"] == state["planner"]["balancer"]
    assert out["rows"][0]["train_loss"] != out["rows"][0]["train_loss"]  # nan stays nan
    assert {k: v for k, v in out["rows"][0].items() if k != "train_loss"} == {
        k: v for k, v in state["rows"][0].items() if k != "train_loss"
    }
    for key in ("tuples", "ordered", "sets", "big", "round", "__raypfl_type__"):
        assert out[key] == state[key] and type(out[key]) is type(state[key]), key
    assert [type(s) for s in out["sets"]] == [set, frozenset, set]


def test_saving_something_a_checkpoint_cannot_hold_fails_loudly(tmp_path):
    with pytest.raises(TypeError, match=r"state\['rows'\]\[0\] is a .*Payload"):
        save_checkpoint(tmp_path / FILENAME, {"round": 1, "rows": [Payload(tmp_path / "x")]})
    with pytest.raises(TypeError, match="dtype object"):
        save_checkpoint(tmp_path / FILENAME, {"round": 1, "w": np.array([None, 1])})
    assert not (tmp_path / FILENAME).exists()


@pytest.mark.slow  # ~5 s: three short runs
def test_resume_gives_the_uninterrupted_run_bit_for_bit(tmp_path):
    """In-process (the SIGKILL test in test_faults covers a killed process, on MNIST): 2 rounds, then 2 more
    resumed, equal 4 rounds in one go. Generated data keeps it fast; dropped clients, eviction counts, AIMD
    epochs and per-client momentum put every part of the planner's state into the checkpoint."""
    args = [
        "dataset=synthetic",
        "dataset.max_size=100",
        "model=logreg",
        "runtime=sequential",
        "clients.num=20",
        "clients.per_round=5",
        "optim.lr=0.05",
        "optim.persistent_state=true",
        "optim.momentum=0.5",
        "faults.drop_prob=0.2",
        "faults.on_no_quorum=skip",
        "faults.evict_after=2",
        "faults.balance=aimd",
        "faults.max_epochs=3",
    ]
    first = tmp_path / "first"
    run_experiment(make_config(*args, "train.rounds=2"), first)
    assert (first / FILENAME).is_file() and not (first / OLD_FILENAME).exists()
    resumed = run_experiment(make_config(*args, "train.rounds=4", f"resume={first}"), tmp_path / "resumed")
    whole = run_experiment(make_config(*args, "train.rounds=4"), tmp_path / "whole")
    assert resumed.weights.dtype == whole.weights.dtype
    assert resumed.weights.tobytes() == whole.weights.tobytes()
    timeless = [{k: v for k, v in r.items() if not k.endswith("_s")} for r in whole.rounds]
    assert [{k: v for k, v in r.items() if not k.endswith("_s")} for r in resumed.rounds] == timeless
    saved, again = load_checkpoint(tmp_path / "resumed"), load_checkpoint(tmp_path / "whole")
    assert saved["planner"]["membership"] == again["planner"]["membership"]
    assert saved["planner"]["balancer"] == again["planner"]["balancer"]
    states, expected = saved["planner"]["client_states"], again["planner"]["client_states"]
    assert states and states.keys() == expected.keys()
    for client, state in states.items():
        assert state["param_groups"] == expected[client]["param_groups"]
        for param, buffers in state["state"].items():
            assert torch.equal(
                buffers["momentum_buffer"], expected[client]["state"][param]["momentum_buffer"]
            )


def test_a_checkpoint_from_before_held_out_data_still_resumes_and_new_settings_are_checked():
    """A checkpoint's fingerprint from before `partition.client_test_fraction` existed (no such key) matches a
    run that leaves it at null; holding data out, or changing the partial work, is another run: refused."""
    from omegaconf import OmegaConf

    from raypfl.jobs.checkpoint import check_compatible, fingerprint

    def of(*overrides: str) -> dict:
        return fingerprint(OmegaConf.to_container(make_config(*overrides), resolve=True))

    before = of()
    before["partition"].pop("client_test_fraction", None)
    for key in ("clients.partial_work_fraction", "clients.partial_work_policy"):
        before.pop(key)  # an old checkpoint holds neither key
    check_compatible(before, of(), "old")  # nothing raised
    with pytest.raises(ConfigError, match=r"^resume=old: the checkpoint was made with partition="):
        check_compatible(before, of("partition.client_test_fraction=0.2"), "old")
    with pytest.raises(ConfigError, match=r"clients\.partial_work_fraction=0\.0, this run has .*=0\.5"):
        check_compatible(of(), of("clients.partial_work_fraction=0.5"), "new")
