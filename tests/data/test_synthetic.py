"""dataset=synthetic: Synthetic(alpha, beta) clients generated from the seed, cheap at 100k clients."""

from __future__ import annotations

import copy
import logging
import pickle
import tracemalloc

import numpy as np
import pytest
import torch
from omegaconf import open_dict

from raypfl.data.load import load_data
from raypfl.data.synthetic import SyntheticPartition, SyntheticSpec, synthetic_dataset, synthetic_spec
from raypfl.driver.experiment import build_setup, run_experiment
from raypfl.errors import ConfigError
from raypfl.models.io import initial_weights
from raypfl.models.weights import set_flat
from raypfl.models.zoo import build_model, count_parameters
from raypfl.training.local import evaluate
from raypfl.validation import validate
from tests.conftest import make_config

SPEC = SyntheticSpec()


def test_a_client_data_depends_on_seed_and_id_only():
    small, large = SyntheticPartition(SPEC, 1000, seed=3), SyntheticPartition(SPEC, 100_000, seed=3)
    x, y = small.client_data(7, round_idx=1)
    x2, y2 = large.client_data(7, round_idx=5)  # another federation size, another round: the same data
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert np.array_equal(small.sizes(), large.sizes()[:1000])
    neighbour, _ = small.client_data(8)
    reseeded, _ = SyntheticPartition(SPEC, 1000, seed=4).client_data(7)
    assert not np.allclose(x[0], neighbour[0]) and not np.allclose(x[0], reseeded[0])
    assert not np.array_equal(small._gen.model(7)[0], small._gen.model(8)[0])  # each client its own W_k


def test_shapes_sizes_and_the_generating_model():
    part = SyntheticPartition(SyntheticSpec(max_size=300), 2000, seed=0)
    sizes = part.sizes()
    assert sizes.dtype == np.int32 and sizes.shape == (2000,) and not sizes.flags.writeable
    assert sizes.min() >= 50 and sizes.max() == 300  # FedProx: int(LogNormal(4, 2)) + 50, here capped
    assert 80 < np.median(sizes) < 130  # median of the uncapped law: 50 + e^4 ~ 104.6
    x, y = part.client_data(11)
    assert x.dtype == np.float32 and x.shape == (part.size(11), 60) and y.dtype == np.int64
    assert np.array_equal(part.indices(11, 3), np.arange(part.size(11)))
    big = int(np.argmax(sizes))
    x, y = part.client_data(big)
    w, b, v = part._gen.model(big)
    assert np.array_equal(y, np.argmax(x @ w + b, axis=1))  # labels of the float32 inputs the model sees
    var = x.var(axis=0)  # Sigma_jj = j^-1.2
    expected = np.arange(1, 61) ** -1.2
    assert np.all(np.abs(var / expected - 1) < 0.35)
    with pytest.raises(IndexError):
        part.size(2000)


def test_iid_clients_share_one_model():
    part = SyntheticPartition(SyntheticSpec(iid=True), 10, seed=0)
    (w0, b0, _), (w1, b1, _) = part._gen.model(0), part._gen.model(1)
    assert np.array_equal(w0, w1) and np.array_equal(b0, b1)


def test_100k_clients_cost_only_their_sizes():
    tracemalloc.start()
    part = SyntheticPartition(SPEC, 100_000, seed=0)
    _, peak_build = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    part.client_data(99_999)
    part.size(50_000)
    _, peak_client = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak_build < 1_300_000  # the int32 sizes (400 KB) plus the float64 draws they come from
    assert peak_client < 4 * part.size(99_999) * 60 * 8 + 100_000  # O(client's size), not O(num_clients)
    assert len(pickle.dumps(part)) < 450_000  # what Ray ships to every actor


def test_the_test_set_does_not_depend_on_the_federation_size():
    a = load_data(make_config("dataset=synthetic", "clients.num=1000"))
    b = load_data(make_config("dataset=synthetic", "clients.num=100000", "clients.per_round=100"))
    assert a.test_x.shape == (100 * 100, 60) and a.in_shape == (60,) and a.num_classes == 10
    assert np.array_equal(a.test_x, b.test_x) and np.array_equal(a.test_y, b.test_y)
    assert a.train_x.shape == (0, 60) and len(a.train_y) == 0
    held_out = synthetic_dataset(SyntheticSpec(test_clients=1, test_samples=5), seed=0).test_x
    train_x, _ = SyntheticPartition(SPEC, 1, seed=0).client_data(0)
    assert not np.isin(held_out, train_x).all(axis=1).any()  # held-out samples are new draws


def test_build_setup_uses_the_generator_and_says_partition_is_ignored(caplog):
    cfg = make_config("dataset=synthetic", "model=logreg", "partition=dirichlet", "clients.num=500")
    validate(cfg)
    with caplog.at_level(logging.INFO, logger="raypfl"):
        setup = build_setup(cfg, load_data(cfg))
    assert isinstance(setup.partition, SyntheticPartition) and setup.partition.num_clients == 500
    assert "partition=dirichlet (partition.*) is ignored" in caplog.text


@pytest.fixture(scope="module")
def synthetic_cfg():
    return make_config("dataset=synthetic")


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("alpha", -1, "dataset.alpha=-1 must be >= 0"),
        ("beta", float("nan"), "dataset.beta=nan must be a finite number >= 0"),
        ("max_size", 10, "dataset.max_size=10 must be an integer >= 50"),
        ("num_classes", 1, "dataset.num_classes=1 must be an integer >= 2"),
        ("test_clients", 0, "dataset.test_clients=0 must be an integer >= 1"),
        ("gamma", 1, "unknown key dataset.gamma for dataset=synthetic"),
    ],
)
def test_bad_synthetic_knobs_name_the_key(synthetic_cfg, key, value, expected):
    cfg = copy.deepcopy(synthetic_cfg)
    with open_dict(cfg):
        cfg.dataset[key] = value
    with pytest.raises(ConfigError, match="^" + expected.replace(".", r"\.")):
        validate(cfg)


def test_synthetic_knobs_on_a_loaded_dataset_are_an_error():
    with pytest.raises(ConfigError, match=r"unknown key dataset\.alpha for dataset=mnist"):
        validate(make_config("+dataset.alpha=1"))
    assert synthetic_spec({"name": "synthetic", "alpha": 0}).alpha == 0


@pytest.mark.parametrize(("name", "params"), [("logreg", 610), ("mlp", 54_410)])
def test_flat_models_take_synthetic_inputs(name, params):
    model = build_model(name, (60,), 10)
    assert count_parameters(model) == params and model(torch.zeros(3, 60)).shape == (3, 10)


def test_a_short_sequential_run_learns(tmp_path):
    cfg = make_config(
        "dataset=synthetic",
        "dataset.iid=true",  # Synthetic-IID: one shared model, so a global model can learn it
        "dataset.max_size=200",
        "model=logreg",
        "runtime=sequential",
        "clients.num=1000",
        "clients.per_round=10",
        "train.rounds=2",
        "optim.lr=0.05",
        "train.checkpoint_every=0",
    )
    validate(cfg)
    result = run_experiment(cfg, tmp_path)
    data = load_data(cfg)
    model = build_model("logreg", data.in_shape, data.num_classes)
    set_flat(model, initial_weights("logreg", data, cfg.seed))
    _, correct, count = evaluate(model, torch.from_numpy(data.test_x), torch.from_numpy(data.test_y))
    assert [r["clients"] for r in result.rounds] == [10, 10]
    assert result.final_accuracy > correct / count + 0.3  # from ~chance to > 0.5
