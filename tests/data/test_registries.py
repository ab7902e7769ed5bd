"""Models, datasets and partitions of the user's own (`GROUP._target_`), and `partition=natural`: each end to
end in a tiny run, the same model on every runtime, and every bad input one ConfigError line naming the key,
before any runtime (Ray) starts. The user code these tests name lives in tests/data/registry_targets.py and
examples/."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from examples import writers
from raypfl.cli import check_key_overrides
from raypfl.data.custom import FederatedArrays, to_dataset
from raypfl.data.load import load_data
from raypfl.data.partitions import PARTITIONERS, build_partition
from raypfl.driver.experiment import build_setup, run_experiment
from raypfl.errors import ConfigError
from raypfl.models.io import initial_weights
from raypfl.models.zoo import ModelSpec, build_model, count_parameters, model_spec
from raypfl.validation import validate
from tests.conftest import SMALL_RUN, make_config, run_cli
from tests.data import registry_targets as targets

T = "tests.data.registry_targets"
MY_NET = ["model._target_=examples.my_model.make_net", "+model.width=4", "+model.hidden=16"]
#: A tiny federation from a dataset function (Gaussian blobs, 4 users): no MNIST to read, well under 1 s.
BLOBS = [
    f"dataset._target_={T}.blobs",
    "model=logreg",
    "partition=natural",
    "clients.num=4",
    "clients.per_round=2",
    "runtime=sequential",
    "train.rounds=1",
]


def prepare(*overrides: str):
    """What a run does before any runtime starts: validate, load the data, build the setup."""
    cfg = make_config(*overrides)
    validate(cfg)
    return build_setup(cfg, load_data(cfg))


def error_of(*overrides: str) -> str:
    """The ConfigError `prepare` raises: one line."""
    with pytest.raises(ConfigError) as err:
        prepare(*overrides)
    message = str(err.value)
    assert "\n" not in message, message
    return message


# --- model._target_ ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def my_net_run(tmp_path_factory, data_root):
    cfg = make_config(*SMALL_RUN, *MY_NET, "train.rounds=1")
    validate(cfg)
    return cfg, run_experiment(cfg, tmp_path_factory.mktemp("my_net"))


def test_custom_model_trains_saves_and_is_seeded(my_net_run):
    cfg, run = my_net_run
    spec = model_spec(cfg.model)
    assert spec == ModelSpec("mlp", "examples.my_model.make_net", {"width": 4, "hidden": 16})  # name: a label
    assert pickle.loads(pickle.dumps(spec)) == spec  # what Ray actors and MPI ranks receive
    model = build_model(spec)  # model.pt loads into the model the spec builds
    model.load_state_dict(torch.load(run.out_dir / "model.pt", weights_only=True))
    assert count_parameters(model) == run.weights.size == 4 * 9 + 4 + 4 * 14 * 14 * 16 + 16 + 16 * 10 + 10
    assert run.rounds[-1]["test_acc"] > 0.15  # it learned something in one round
    data = load_data(cfg)
    first, again, other = (initial_weights(spec, data, seed) for seed in (0, 0, 1))
    assert np.array_equal(first, again) and not np.array_equal(first, other)


def test_shipped_model_takes_keyword_arguments_too():
    spec = model_spec(make_config("model=mlp", "+model.hidden=[16]").model)
    assert spec == ModelSpec("mlp", None, {"hidden": [16]})
    assert count_parameters(build_model(spec)) == 784 * 16 + 16 + 16 * 10 + 10


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["model._target_=nowhere.nets.make"],
            "model._target_=nowhere.nets.make: cannot import it (no module",
        ),
        (["model._target_=examples.my_model.nope"], "cannot import it (examples.my_model has no 'nope')"),
        (
            ["model._target_=examples.my_model"],
            "model._target_=examples.my_model is a module, not a function",
        ),
        (
            [f"model._target_={T}.raising_factory"],
            "building it failed (ValueError: no layer fits this input)",
        ),
        (
            [f"model._target_={T}.not_a_module"],
            f"model._target_={T}.not_a_module returned a int, not a torch",
        ),
        ([f"model._target_={T}.five_outputs"], "returns shape (2, 5) for a batch shaped (2, 4); expected"),
        ([f"model._target_={T}.no_parameters"], "has no parameters to train"),
        ([f"model._target_={T}.needs_depth"], "needs depth: set +model.depth=VALUE"),
        (
            [*MY_NET, "+model.depht=2"],
            "unknown key model.depht for model._target_=examples.my_model.make_net",
        ),
        ([*MY_NET, "+model.num_classes=3"], "model.num_classes: raypfl passes num_classes to model._target_"),
        (["+model.depth=2"], "unknown key model.depth for model=logreg (its arguments: none)"),
        (["model.name=resnet999"], "unknown model=resnet999 (choose from: mlp, cnn"),
        (
            [*MY_NET],
            "model._target_=examples.my_model.make_net: building it failed (ValueError: make_net needs",
        ),
    ],
)
def test_bad_model_is_one_line_naming_the_key(overrides, expected):
    assert expected in error_of(*BLOBS, *overrides)


def test_custom_model_needs_the_federated_paradigm():
    with pytest.raises(
        ConfigError, match=r"^model._target_=examples.my_model.make_net needs paradigm=federated"
    ):
        validate(make_config("+experiment=ps_sync", *MY_NET))


# --- dataset._target_ and partition=natural ----------------------------------------------------------------


@pytest.mark.parametrize("form", ["dict", "tuple", "dataclass", "torch"])
def test_every_return_form_becomes_the_same_dataset(form):
    data = to_dataset(targets.blobs_as(form))
    reference = targets.blobs()
    assert data.train_x.dtype == np.float32 and data.train_y.dtype == np.int64
    assert data.in_shape == (4,) and data.num_classes == 3
    assert np.allclose(data.train_x, reference["train_x"]) and np.array_equal(
        data.test_y, reference["test_y"]
    )
    if form == "tuple":
        assert data.client_ids is None
    else:  # "u0".."u3" (or their codes): client k is the k-th in sorted order
        assert np.array_equal(data.client_ids, np.arange(120) % 4)


def test_natural_partition_gives_each_user_its_samples():
    setup = prepare(*BLOBS)
    assert setup.dataset.name == f"{T}.blobs"
    for client in range(4):  # blobs: sample i belongs to user u{i % 4}
        assert np.array_equal(setup.partition.indices(client), np.arange(client, 120, 4))
    assert "natural" in PARTITIONERS
    part = build_partition(
        "natural", {}, np.zeros(6), 2, 0, client_ids=np.array(["b", "a", "b", "a", "a", "b"])
    )
    assert [list(part.indices(c)) for c in (0, 1)] == [[1, 3, 4], [0, 2, 5]]  # "a" sorts first


def test_writers_example_runs_with_natural_clients(tmp_path, data_root):
    """examples/writers.py: MNIST digits by writer, writer k = client k; train_limit keeps its client ids."""
    cfg = make_config(
        "dataset._target_=examples.writers.load",
        "+dataset.writers=3",
        "+dataset.per_writer=40",
        "+dataset.test_size=200",
        "dataset.train_limit=100",
        "partition=natural",
        "clients.num=3",
        "clients.per_round=3",
        "model=mlp",
        "runtime=sequential",
        "train.rounds=1",
    )
    validate(cfg)
    data = load_data(cfg)
    assert data.train_x.shape == (100, 1, 28, 28) and data.test_x.shape == (200, 1, 28, 28)
    ids = writers.load(data_root, writers=3, per_writer=40, test_size=200)["client_ids"][:100]
    assert np.array_equal(data.client_ids, np.unique(ids, return_inverse=True)[1])
    run = run_experiment(cfg, tmp_path)
    assert run.rounds[-1]["clients"] == 3 and run.train_samples == 100


@pytest.mark.parametrize(
    ("problem", "expected"),
    [
        ("short_labels", "train_x has 120 samples but train_y has 119 labels"),
        ("test_shape", "train samples are shaped (4,) but test samples (5,)"),
        ("float_labels", "train_y has dtype float32; expected integer class indices"),
        ("label_range", "is outside 0..1 (num_classes=2)"),
        ("negative_label", "label -1 (at test index 3; 1 such) is negative"),
        ("nan_feature", "train_x has NaN/Inf features (at train index 7; 1 such)"),
        ("client_ids", "client_ids is shaped (100,) but the training set has 120 samples"),
        ("three_items", "returned a tuple of 3 items; expected (train_x, train_y, test_x, test_y)"),
        ("missing_key", "returned a dict with no 'test_y'"),
        ("empty_test", "the test set is empty"),
    ],
)
def test_bad_dataset_is_one_line_naming_the_key(problem, expected):
    message = error_of(*BLOBS, f"dataset._target_={T}.blobs_with", f"+dataset.problem={problem}")
    assert message.startswith(f"dataset._target_={T}.blobs_with: ") or message.startswith(
        f"dataset._target_={T}.blobs_with returned"
    )
    assert expected in message


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            [f"dataset._target_={T}.raising_dataset"],
            "raising_dataset: it raised ConnectionError: the data server",
        ),
        (["dataset._target_=nowhere.data.load"], "dataset._target_=nowhere.data.load: cannot import it"),
        (["+dataset.users=3"], "partition=natural: the dataset has 3 clients (distinct client ids): set "),
        (
            ["+dataset.user=3"],
            f"unknown key dataset.user for dataset._target_={T}.blobs (its arguments: n, test",
        ),
        (["dataset.train_limit=0"], "dataset.train_limit=0 must be an integer >= 1"),
        (
            ["dataset._target_=null"],
            "partition=natural needs a dataset with client ids: dataset=mnist has none",
        ),
    ],
)
def test_bad_dataset_setting_is_one_line_naming_the_key(overrides, expected):
    assert expected in error_of(*BLOBS, *overrides)


def test_torch_datasets_are_read_once_and_truncated_by_the_limits():
    data = to_dataset(targets.blobs_as("torch"), train_limit=10, test_limit=5)
    assert data.train_x.shape == (10, 4) and data.test_y.shape == (5,)
    assert np.array_equal(data.client_ids, np.arange(10) % 4)
    arrays = FederatedArrays(np.ones((3, 2)), np.array([0, 1, 0]), np.ones((1, 2)), np.array([1]))
    assert to_dataset(arrays).num_classes == 2  # the largest label + 1


# --- partition._target_ ----------------------------------------------------------------------------------


def test_custom_partition_runs(tmp_path):
    cfg = make_config(*BLOBS, f"partition._target_={T}.round_robin", "+partition.skip=8")
    validate(cfg)
    run = run_experiment(cfg, tmp_path)
    setup = build_setup(cfg, load_data(cfg))
    assert [setup.partition.size(c) for c in range(4)] == [28] * 4  # (120 - 8) / 4
    assert np.array_equal(setup.partition.indices(1), np.arange(9, 120, 4))
    assert run.rounds[-1]["clients"] == 2


@pytest.mark.parametrize(
    ("problem", "expected"),
    [
        ("overlap", "index 1 is given more than once (clients 1 and 2 both have it)"),
        ("outside", "client 1 has index 120, outside the training set [0, 120)"),
        ("empty", "client 3 has no samples"),
        ("count", "returned 3 index arrays for clients.num=4"),
        ("floats", "client 0's indices have dtype float64; expected integers"),
        ("raise", "it raised IndexError: ran out of samples"),
        ("not_a_list", "returned a int; expected a list of index arrays"),
    ],
)
def test_bad_partition_is_one_line_naming_the_key(problem, expected):
    message = error_of(*BLOBS, f"partition._target_={T}.bad_partition", f"+partition.problem={problem}")
    assert message.startswith(f"partition._target_={T}.bad_partition")
    assert expected in message


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            [f"partition._target_={T}.two_arguments"],
            "cannot be called as (labels, num_clients, seed, **kwargs)",
        ),
        (
            [f"partition._target_={T}.round_robin", "+partition.skp=1"],
            "unknown key partition.skp for partition",
        ),
        (
            [f"partition._target_={T}.nope"],
            f"partition._target_={T}.nope: cannot import it ({T} has no 'nope')",
        ),
    ],
)
def test_bad_partition_setting_fails_validation(overrides, expected):
    with pytest.raises(ConfigError) as err:
        validate(make_config(*BLOBS, *overrides))
    assert expected in str(err.value) and "\n" not in str(err.value)


# --- the command line --------------------------------------------------------------------------------------


def test_key_check_lets_targets_and_their_arguments_through():
    args = [
        *MY_NET,
        "dataset._target_=examples.writers.load",
        "+dataset.writers=4",
        "partition=natural",
        "partition._target_=my.split",
        "clients.num=4",
    ]
    assert check_key_overrides(args) is None


@pytest.mark.slow
def test_command_line_exits_2_before_ray_starts(tmp_path):
    """The last check before a runtime starts (the model, built once in build_setup, after the data loaded)
    still stops the command line with one line and exit code 2, and Ray never starts. (Every other bad input
    above raises the same ConfigError earlier on the same path; one subprocess costs seconds.)"""
    target = f"model._target_={T}.raising_factory"
    expected = f"error: {target}: building it failed (ValueError: no layer fits this input)"
    proc = run_cli(*BLOBS, target, "runtime=ray", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith(expected), proc.stderr
    assert (
        "Started a local Ray" not in proc.stderr + proc.stdout
        and "ray runtime" not in proc.stderr + proc.stdout
    )
    assert not (tmp_path / "metrics.csv").exists()
