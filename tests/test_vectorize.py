"""runtime.vectorize=true: lock-step clients give the plain path's model (<= 1e-4 after 3 rounds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY, make_config

from raypfl.config import OptimSpec, TrainSpec
from raypfl.errors import ConfigError
from raypfl.experiment import build_setup, load_data, run_experiment
from raypfl.training import batches
from raypfl.vectorized import ClientJob, train_lockstep

TOLERANCE = 1e-4


def _both(tmp_path, *overrides: str) -> tuple[np.ndarray, np.ndarray]:
    runs = [
        run_experiment(make_config(*TINY, *overrides, f"runtime.vectorize={vec}"), tmp_path / vec).weights
        for vec in ("false", "true")
    ]
    return runs[0], runs[1]


@pytest.mark.parametrize(
    "optim",
    [
        ["optim.momentum=0.9", "optim.weight_decay=0.001"],  # torch.func path (vmap + autograd)
        [],  # plain SGD on a Linear/ReLU stack: the fused path
    ],
    ids=["vmap-momentum", "fused-sgd"],
)
def test_vectorized_mlp_matches_plain(data_root, tmp_path, optim):
    plain, vec = _both(tmp_path, "runtime=sequential", *optim)
    assert np.abs(plain - vec).max() <= TOLERANCE
    assert np.abs(plain).max() > 0.01  # a real model, not zeros


def test_uneven_clients_are_masked_not_rejected(data_root, tmp_path):
    """quantity_skew gives clients different sizes; batch 7 leaves short last batches (fused path; the
    vmap path's masking is checked below)."""
    plain, vec = _both(
        tmp_path,
        "runtime=sequential",
        "partition=quantity_skew",
        "partition.min_size=40",
        "partition.max_size=300",
        "train.batch_size=7",
    )
    assert np.abs(plain - vec).max() <= TOLERANCE


def test_vectorized_cnn_matches_plain(data_root, tmp_path):
    plain, vec = _both(
        tmp_path, "runtime=sequential", "model=tiny_cnn", "dataset.train_limit=800", "train.rounds=3"
    )
    assert np.abs(plain - vec).max() <= TOLERANCE


def test_vectorized_clients_inside_ray_actors_match_sequential(data_root, ray_session, tmp_path):
    plain = run_experiment(make_config(*TINY, "runtime=sequential"), tmp_path / "seq").weights
    ray_vec = run_experiment(
        make_config(*TINY, "runtime=ray", "runtime.num_actors=2", "runtime.vectorize=true"), tmp_path / "ray"
    ).weights
    assert np.abs(plain - ray_vec).max() <= TOLERANCE


def test_a_client_without_batches_at_a_step_is_left_alone():
    """Lock-step with one client of 2 batches and one of 5: the short one equals training it alone."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    x, y = torch.randn(50, 4), torch.randint(0, 3, (50,))
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    spec, optim = TrainSpec(batch_size=4), OptimSpec(lr=0.1, momentum=0.9)
    jobs = [
        ClientJob(x, y, np.arange(8), torch.Generator().manual_seed(1), spec),
        ClientJob(x, y, np.arange(8, 28), torch.Generator().manual_seed(2), spec),
    ]
    together, results = train_lockstep(model, start, jobs, optim)
    alone, _ = train_lockstep(
        model, start, [ClientJob(x, y, np.arange(8), torch.Generator().manual_seed(1), spec)], optim
    )
    assert [r.steps for r in results] == [2, 5]
    for name in start:
        assert torch.allclose(together[name][0], alone[name][0], atol=1e-6)
    assert len(list(batches(np.arange(8), spec, torch.Generator().manual_seed(1)))) == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.name=adam"], "optim.name=sgd"),
        (["optim.persistent_state=true"], "optimizer state"),
        (["faults.drop_prob=0.1"], "lock-step"),
    ],
)
def test_unsupported_combinations_are_clear_errors(data_root, overrides, message):
    from raypfl.config import validate

    cfg = make_config(*TINY, "runtime=sequential", "runtime.vectorize=true", *overrides)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)
        build_setup(cfg, load_data(cfg))
