"""Per-client evaluation (`train.eval_clients_every` on `partition.client_test_fraction`)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from raypfl.data.load import load_data
from raypfl.driver import client_eval
from raypfl.driver.experiment import build_setup, run_experiment
from raypfl.errors import ConfigError
from raypfl.models.weights import set_flat
from raypfl.models.zoo import build_model
from raypfl.training.local import evaluate
from raypfl.validation import validate
from tests.conftest import SMALL_RUN, make_config

HELD_OUT = ["partition.client_test_fraction=0.2", "train.eval_clients_every=2"]


def test_summary_is_mean_worst_tenth_and_std():
    rows = [{"client": c, "eval_acc": a} for c, a in enumerate([0.1, 0.2, *[0.9] * 18])]
    rows[5]["personal_acc"] = 0.5  # only some rows: personal figures come from those
    summary = client_eval.summarize(rows)
    accs = np.array([0.1, 0.2, *[0.9] * 18])
    assert summary["client_acc_mean"] == round(accs.mean(), 6)
    assert summary["client_acc_worst10"] == pytest.approx(0.15)  # the lowest 2 of 20
    assert summary["client_acc_std"] == round(accs.std(), 6)
    assert summary["personal_acc_mean"] == 0.5 and summary["personal_acc_worst10"] == 0.5
    assert client_eval.summarize([]) == {}
    assert [client_eval.due(r, 2, 5) for r in range(1, 6)] == [False, True, False, True, True]
    assert not client_eval.due(4, 0, 5)


def test_every_client_is_tested_on_its_held_out_samples(tmp_path, data_root):
    cfg = make_config(*SMALL_RUN, "train.rounds=3", *HELD_OUT)
    result = run_experiment(cfg, tmp_path)
    with open(tmp_path / "clients.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["status"] == "eval"]
    assert sorted({int(r["round"]) for r in rows}) == [2, 3]  # every 2 rounds and after the last
    last = [r for r in rows if r["round"] == "3"]
    assert sorted(int(r["client"]) for r in last) == list(range(10))
    assert ["client_acc_mean" in r for r in result.rounds] == [False, True, True]
    accs = [float(r["eval_acc"]) for r in last]
    assert result.rounds[-1]["client_acc_mean"] == pytest.approx(np.mean(accs), abs=1e-6)
    # an independent check: the final model on each client's held-out samples (which never trained)
    setup = build_setup(cfg, load_data(cfg))
    model = build_model("mlp")
    set_flat(model, result.weights)
    x, y = torch.as_tensor(setup.dataset.train_x), torch.as_tensor(setup.dataset.train_y)
    for row in last:
        held = setup.partition.test_indices(int(row["client"]))
        assert not set(held) & set(setup.partition.indices(int(row["client"])))
        _, correct, count = evaluate(model, x[held], y[held])
        assert int(row["eval_samples"]) == count == 40  # 20% of 200
        # the same weights and samples in this process (same kernels); clients.csv rounds to 6 decimals
        assert float(row["eval_acc"]) == pytest.approx(correct / count, abs=1e-6)
    assert "personal_acc" not in {k for r in last for k, v in r.items() if v != ""}  # FedAvg has none


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.eval_clients_every=1"], "set partition.client_test_fraction"),
        (["partition=fresh_slices", "partition.client_test_fraction=0.2"], "partition=fresh_slices"),
        (["+experiment=ps_sync", "partition.client_test_fraction=0.2"], "needs paradigm=federated"),
    ],
)
def test_client_tests_need_held_out_data_in_a_federation(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(make_config(*SMALL_RUN, *overrides))
    assert message in str(err.value) and "\n" not in str(err.value)
