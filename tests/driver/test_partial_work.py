"""FedProx's systems heterogeneity (`clients.partial_work_fraction`, raypfl.driver.partial_work)."""

from __future__ import annotations

import csv

import pytest

from raypfl.config import ClientsSpec, FaultsSpec, TrainSpec
from raypfl.driver.experiment import run_experiment
from raypfl.driver.partial_work import stragglers
from raypfl.driver.planning import RoundPlanner
from raypfl.errors import ConfigError
from raypfl.validation import validate
from tests.conftest import SMALL_RUN, make_config


def test_stragglers_are_a_seeded_fraction_doing_one_to_e_minus_one_epochs():
    clients = ClientsSpec(num=100, per_round=10, partial_work_fraction=0.9, partial_work_policy="keep")
    cohort = list(range(0, 100, 10))
    seen = set()
    for round_idx in range(1, 40):
        chosen = stragglers(clients, TrainSpec(local_epochs=20), 0, round_idx, cohort)
        assert len(chosen) == 9 and set(chosen) <= set(cohort)
        assert all(list(work) == ["local_epochs"] for work in chosen.values())
        seen |= {work["local_epochs"] for work in chosen.values()}
        assert chosen == stragglers(clients, TrainSpec(local_epochs=20), 0, round_idx, cohort[::-1])
    assert seen == set(range(1, 20))  # 1 .. E-1, never E
    steps = stragglers(clients, TrainSpec(local_steps=3), 0, 1, cohort)
    assert {w["local_steps"] for w in steps.values()} <= {1, 2}
    assert stragglers(ClientsSpec(partial_work_fraction=0.0), TrainSpec(local_epochs=5), 0, 1, cohort) == {}


def test_drop_leaves_stragglers_out_of_the_cohort_and_keep_gives_them_less_work():
    def plan(policy: str):
        clients = ClientsSpec(num=20, per_round=10, partial_work_fraction=0.5, partial_work_policy=policy)
        planner = RoundPlanner(clients, FaultsSpec(), 0, 2, TrainSpec(local_epochs=4))
        return planner.plan(3)

    kept, dropped = plan("keep"), plan("drop")
    assert len(kept.cohort) == 10 and len(kept.work) == 5 and kept.partial == 5 and not kept.dropped
    assert sorted(dropped.dropped) == sorted(kept.work) and dropped.partial == 5
    assert sorted(dropped.cohort + list(dropped.dropped)) == sorted(kept.cohort)
    everyone = ClientsSpec(num=20, per_round=10, partial_work_fraction=1.0, partial_work_policy="drop")
    assert len(RoundPlanner(everyone, FaultsSpec(), 0, 2, TrainSpec(local_epochs=4)).plan(1).cohort) == 1


def test_partial_work_in_a_run_drop_vs_keep(tmp_path, data_root):
    base = [*SMALL_RUN, "clients.per_round=4", "train.rounds=2", "train.local_epochs=3"]
    base += ["clients.partial_work_fraction=0.5"]
    rows = {}
    for policy in ("drop", "keep"):
        cfg = make_config(*base, f"clients.partial_work_policy={policy}")
        result = run_experiment(cfg, tmp_path / policy)
        assert [r["partial_work"] for r in result.rounds] == [2, 2]
        assert [r["clients"] for r in result.rounds] == ([2, 2] if policy == "drop" else [4, 4])
        with open(tmp_path / policy / "clients.csv") as f:
            rows[policy] = list(csv.DictReader(f))
    dropped = [r for r in rows["drop"] if r["status"] == "straggler"]
    kept = [r for r in rows["keep"] if r["work"] != ""]
    assert len(dropped) == len(kept) == 4
    assert [(r["round"], r["client"], r["work"]) for r in dropped] == [
        (r["round"], r["client"], r["work"]) for r in kept
    ]
    assert all(int(r["work"]) in (1, 2) and r["status"] == "ok" for r in kept)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["clients.partial_work_fraction=0.5", "train.local_epochs=1"], "set E >= 2"),
        (["clients.partial_work_fraction=0.5", "train.local_steps=1"], "train.local_steps=1"),
        (
            ["clients.partial_work_fraction=0.5", "train.local_epochs=2", "faults.balance=aimd"],
            "does not combine with faults.balance=aimd",
        ),
    ],
)
def test_partial_work_needs_room_for_less_work(overrides, message):
    with pytest.raises(ConfigError, match=r"^clients\.partial_work_fraction=0\.5[: ]") as err:
        validate(make_config(*SMALL_RUN, *overrides))
    assert message in str(err.value) and "\n" not in str(err.value)
