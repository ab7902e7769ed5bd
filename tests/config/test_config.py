"""Bad input fails fast, naming the key; unknown group choices fail before Hydra composes."""

from __future__ import annotations

import pytest

from raypfl.cli import check_group_overrides
from raypfl.errors import ConfigError
from raypfl.validation import validate
from tests.conftest import make_config


def test_shipped_default_config_is_valid():
    cfg = make_config("+experiment=fedavg")
    validate(cfg)
    assert cfg.model.name == "cnn" and cfg.clients.num == 100 and cfg.clients.per_round == 10
    assert cfg.train.local_epochs == 1 and cfg.train.batch_size == 10 and cfg.runtime.name == "ray"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["clients.per_round=120", "clients.num=100"], "clients.per_round=120 > clients.num=100"),
        (["optim.lr=-0.1"], "optim.lr=-0.1 must be > 0"),
        (["optim.lr=0"], "optim.lr=0 must be > 0"),
        (["partition=dirichlet", "partition.alpha=0"], "partition.alpha=0 must be > 0"),
        (["partition=dirichlet", "partition.alpha=-1"], "partition.alpha=-1 must be > 0"),
        (["model.name=resnet999"], "unknown model=resnet999"),
        (["partition.name=zipf"], "unknown partition=zipf"),
        (["optim.name=lbfgs"], "optim.name=lbfgs"),
        (["train.rounds=0"], "train.rounds=0"),
        (["clients.selection=greedy"], "clients.selection=greedy"),
        (["+optim.lrr=0.1"], "unknown key optim.lrr"),
        (["algorithm.weighting=median"], "algorithm.weighting=median"),
        (["faults.quorum=0"], "faults.quorum=0 must be in (0, 1]"),
        (["faults.quorum=0.5", "runtime=sequential"], "faults.quorum needs runtime=ray"),
        (["faults.round_timeout_s=5", "runtime=sequential"], "faults.round_timeout_s needs runtime=ray"),
        (["faults.balance=fastest"], "faults.balance=fastest must be one of none, aimd, steps"),
        (["faults.drop_prob=1.5"], "faults.drop_prob=1.5 must be in [0, 1)"),
        (["faults.on_no_quorum=retry"], "faults.on_no_quorum=retry"),
        (["faults.kill_at_round=2", "faults.kill_count=-1"], "faults.kill_count=-1 must be an integer >= 0"),
        (["+faults.quorom=0.5"], "unknown key faults.quorom"),
        (["clients.speed=gamma"], "clients.speed=gamma"),
        (["clients.join_schedule={2: 4}"], "clients.join_schedule must let at least one client join"),
        (["faults.drop_prob=0.1", "runtime=mpi"], "not supported on runtime=mpi"),
    ],
)
def test_bad_config_names_the_key(overrides, expected):
    with pytest.raises(ConfigError) as err:
        validate(make_config(*overrides))
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_group_choice_is_caught_before_hydra():
    assert check_group_overrides(["model=resnet999"]) == (
        "unknown model=resnet999 (choose from: "
        "cnn, deep_mlp, keras_cnn, lenet, logreg, mlp, narrow_cnn, tiny_cnn, torch_example_cnn)"
    )
    assert "unknown partition=zipf" in check_group_overrides(["+experiment=fedavg", "partition=zipf"])
    assert "unknown model=bogus" in check_group_overrides(["-m", "model=mlp,bogus"])
    assert (
        check_group_overrides(["+experiment=fedavg", "model=mlp,cnn", "optim.lr=0.1", "partition=dirichlet"])
        is None
    )
    assert "unknown experiment=nope" in check_group_overrides(["+experiment=nope"])


def test_validate_returns_the_typed_run_spec_the_run_consumes():
    from raypfl.config import FaultsSpec, RunSpec, run_spec

    cfg = make_config(
        "faults.quorum=0.5", "runtime=ray", "optim.lr=0.02", "clients.num=7", "clients.per_round=3"
    )
    spec = validate(cfg)
    assert isinstance(spec, RunSpec) and spec == run_spec(cfg)
    assert spec.faults == FaultsSpec(quorum=0.5) and spec.optim.lr == 0.02 and spec.clients.num == 7
    assert spec.seed == cfg.seed and spec.runtime.name == "ray"
