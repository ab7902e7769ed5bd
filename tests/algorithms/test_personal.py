"""Personalization algorithms: Ditto (Li et al. 2021, Algorithm 1) and FedPer (Arivazhagan et al. 2019).

Ditto's global half is FedAvg bit for bit (the personal update runs after it on the same generator), and its
personal model is a hand-run of SGD on F_k(v) + lam/2 ||v - w^t||^2 anchored at the received w^t. FedPer
federates the shared coordinates only: its statistic has exactly their size and the global model's personal
coordinates never move.
"""

from __future__ import annotations

import csv
import pickle

import numpy as np
import pytest
import torch

from raypfl.algorithms import ALGORITHMS, Algorithm, build_algorithm
from raypfl.algorithms.aggregate import Aggregate, ClientUpdate
from raypfl.algorithms.base import ClientContext, Setting
from raypfl.algorithms.ditto import Ditto
from raypfl.algorithms.fedavg import FedAvg
from raypfl.algorithms.fedper import FedPer
from raypfl.config import OptimSpec, TrainSpec
from raypfl.data.load import load_data
from raypfl.driver.experiment import build_setup, run_experiment
from raypfl.errors import ConfigError
from raypfl.models.weights import get_flat, parameter_views, set_flat
from raypfl.models.zoo import build_model
from raypfl.training.local import make_optimizer, train_local
from tests.conftest import make_config

SETTING = Setting(OptimSpec(lr=0.05), TrainSpec(batch_size=16, local_steps=5), num_clients=10, per_round=4)
N = 64  # samples per client
MLP_SIZE = 199_210
HEAD = ("net.5.weight", "net.5.bias")
HEAD_SIZE = 200 * 10 + 10


def bound(cls: type[Algorithm], **knobs) -> Algorithm:
    return cls(**knobs).bind(SETTING)


def _data(client: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(N, 1, 28, 28, generator=torch.Generator().manual_seed(3 + client))
    y = torch.randint(0, 10, (N,), generator=torch.Generator().manual_seed(4 + client))
    return x, y


def _ctx(broadcast: dict, state=None, client: int = 0) -> ClientContext:
    """A client's round as a worker prepares it: the global model loaded, a generator seeded per client."""
    model = build_model("mlp")
    set_flat(model, broadcast["model"])
    x, y = _data(client)
    return ClientContext(client, 1, model, x, y, np.arange(N), torch.Generator().manual_seed(client), state)


def _client(algo: Algorithm, broadcast: dict, state=None, client: int = 0):
    return algo.client_update(_ctx(broadcast, state, client), broadcast)


def _start(seed: int = 1) -> np.ndarray:
    torch.manual_seed(seed)
    return get_flat(build_model("mlp"))


def _hand_ditto(
    w: np.ndarray, v0: np.ndarray, lam: float, lr: float, client: int = 0, spec: TrainSpec | None = None
) -> np.ndarray:
    """Algorithm 1 by hand: FedAvg's local training of w (to advance the generator as the client does), then
    plain SGD from v0 on the loss plus lam (v - w) added to each gradient."""
    x, y = _data(client)
    gen = torch.Generator().manual_seed(client)
    model = build_model("mlp")
    set_flat(model, w)
    train_local(
        model, make_optimizer(model.parameters(), SETTING.optim), x, y, np.arange(N), SETTING.train, gen
    )
    set_flat(model, v0)
    params = list(model.parameters())
    anchor = [t.clone() for t in parameter_views(model, torch.from_numpy(w.copy()))]

    def pull() -> None:
        for p, a in zip(params, anchor):
            p.grad.add_(p.detach() - a, alpha=lam)

    sgd = torch.optim.SGD(params, lr=lr)
    train_local(model, sgd, x, y, np.arange(N), spec or SETTING.train, gen, pull if lam else None)
    return get_flat(model)


# --- Ditto ------------------------------------------------------------------------------------------------


def test_ditto_global_half_is_fedavg_bit_for_bit():
    w = _start()
    ditto, _ = _client(bound(Ditto, lam=0.5), {"model": w})
    fedavg, fedavg_state = _client(bound(FedAvg), {"model": w})
    np.testing.assert_array_equal(ditto.statistics["model"], fedavg.statistics["model"])
    assert ditto.weights == fedavg.weights == {"model": float(N)}
    assert fedavg_state is None
    for key in ("samples", "train_loss", "train_acc", "steps"):
        assert ditto.metrics[key] == fedavg.metrics[key]
    assert {"personal_train_loss", "personal_train_acc"} <= set(ditto.metrics)


def test_ditto_personal_model_is_sgd_on_the_proximal_objective_from_the_global_model():
    w = _start()
    update, v = _client(bound(Ditto, lam=0.5), {"model": w})
    assert v.dtype == np.float32 and v.shape == w.shape
    np.testing.assert_array_equal(v, _hand_ditto(w, w, lam=0.5, lr=SETTING.optim.lr))  # v_k starts as w^t
    assert 0 < update.metrics["personal_train_loss"] < 10 and 0 <= update.metrics["personal_train_acc"] <= 1


def test_ditto_later_round_starts_from_v_and_is_anchored_at_the_received_global_model():
    w1, w2 = _start(1), _start(2)
    _, v1 = _client(bound(Ditto, lam=2.0, personal_lr=0.1), {"model": w1})
    _, v2 = _client(bound(Ditto, lam=2.0, personal_lr=0.1), {"model": w2}, state=v1)
    np.testing.assert_array_equal(v2, _hand_ditto(w2, v1, lam=2.0, lr=0.1))


def test_ditto_lambda_pulls_the_personal_model_towards_the_global_model():
    w = _start()
    dist = {}
    for lam in (0.0, 1.0, 10.0):
        _, v = _client(bound(Ditto, lam=lam), {"model": w})
        dist[lam] = float(np.linalg.norm(v - w))
    assert dist[0.0] > dist[1.0] > dist[10.0] > 0
    _, v0 = _client(bound(Ditto, lam=0.0), {"model": w})  # lam = 0: pure local training from w^t
    np.testing.assert_array_equal(v0, _hand_ditto(w, w, lam=0.0, lr=SETTING.optim.lr))


def test_ditto_personal_epochs_and_lr():
    w = _start()
    _, v = _client(bound(Ditto, lam=0.1, personal_epochs=1, personal_lr=0.02), {"model": w})
    one_epoch = TrainSpec(batch_size=16, local_epochs=1)  # 64 samples: 4 steps instead of train's 5
    np.testing.assert_array_equal(v, _hand_ditto(w, w, lam=0.1, lr=0.02, spec=one_epoch))


def test_ditto_personal_model_and_contract():
    w = _start()
    ditto = bound(Ditto)
    assert ditto.personalized and ditto.stateful_clients and not ditto.lockstep
    assert ditto.personal_model(None, {"model": w}) is not None
    np.testing.assert_array_equal(ditto.personal_model(None, {"model": w}), w)
    v = np.arange(5, dtype=np.float32)
    np.testing.assert_array_equal(ditto.personal_model(v, {"model": w}), v)
    with pytest.raises(ConfigError, match="optim.persistent_state=true is not supported"):
        Ditto().bind(Setting(OptimSpec(persistent_state=True), SETTING.train, 10, 4))


# --- FedPer -----------------------------------------------------------------------------------------------


def fedper(**knobs) -> FedPer:
    algo = bound(FedPer, **knobs)
    algo.check_model(build_model("mlp"))
    return algo


def test_fedper_default_is_the_last_layer():
    algo = fedper()
    assert algo.personal_index.dtype == algo.shared_index.dtype == np.int64
    np.testing.assert_array_equal(algo.personal_index, np.arange(MLP_SIZE - HEAD_SIZE, MLP_SIZE))
    np.testing.assert_array_equal(algo.shared_index, np.arange(MLP_SIZE - HEAD_SIZE))
    # several layers, by prefix; a name matches whole components only ("net.1" is not "net.1x")
    two = fedper(personal_layers=["net.1", "net.5"])
    assert two.personal_index.size == 784 * 200 + 200 + HEAD_SIZE
    assert two.shared_index.size == 200 * 200 + 200


@pytest.mark.parametrize(
    "layers, message",
    [
        (["nope"], r"algorithm.personal_layers=\[nope\]: nope names no layer .*net.1, net.3, net.5"),
        (["net.5.w"], "names no layer"),
        (["net"], "makes every layer personal"),
        (["net.1", "net.3", "net.5"], "makes every layer personal"),
    ],
)
def test_fedper_bad_layers_are_one_config_error(layers, message):
    with pytest.raises(ConfigError, match=message) as err:
        fedper(personal_layers=layers)
    assert "\n" not in str(err.value)


def test_fedper_needs_its_indices_before_use():
    algo = bound(FedPer)
    with pytest.raises(RuntimeError, match="check_model"):
        _client(algo, {"model": _start()})
    with pytest.raises(RuntimeError, match="check_model"):
        algo.server_update({"model": _start()}, {}, Aggregate())


def test_fedper_indices_travel_with_the_algorithm():
    algo = pickle.loads(pickle.dumps(fedper(personal_layers=["net.3"])))
    assert algo.personal_index.size == 200 * 200 + 200
    assert algo.shared_index.size == MLP_SIZE - algo.personal_index.size
    assert algo == fedper(personal_layers=["net.3"])  # the derived fields do not take part in equality


def test_fedper_client_sends_the_shared_layers_only_and_keeps_its_own():
    x = _start()
    algo = fedper()
    shared, personal = algo.shared_index, algo.personal_index
    first, state = _client(algo, {"model": x})
    assert first.statistics["model"].shape == (shared.size,)  # the personal layers never leave
    assert state.shape == (personal.size,) and state.dtype == np.float32
    # from its first round on, a client's own layers replace the global model's: it trains what FedAvg
    # would train from the personal model
    own = algo.personal_model(state, {"model": x})
    update, new_state = _client(algo, {"model": x}, state=state)
    peer, _ = _client(bound(FedAvg), {"model": own})
    np.testing.assert_array_equal(update.statistics["model"], peer.statistics["model"][shared])
    # the same trained weights on both sides (same kernels, same process); FedAvg's side is rebuilt as
    # own + (y - own) in float32, one rounding (<= 6e-8 of |y| <= ~1) away from y: on any CPU
    np.testing.assert_allclose(new_state, (own + peer.statistics["model"])[personal], rtol=0, atol=1e-6)
    assert update.weights == peer.weights
    assert np.abs(update.statistics["model"] - first.statistics["model"]).max() > 0


def test_fedper_server_moves_the_shared_layers_by_the_mean_only():
    algo = fedper(server_lr=0.5)
    shared, personal = algo.shared_index, algo.personal_index
    x = _start()
    agg = Aggregate()
    for client, (value, weight) in enumerate([(1.0, 1.0), (4.0, 3.0)]):
        agg.add(ClientUpdate(client, {"model": np.full(shared.size, value, np.float32)}, {"model": weight}))
    new, _ = algo.server_update({"model": x}, {}, agg)
    np.testing.assert_array_equal(new["model"][personal], x[personal])
    expected = (x[shared].astype(np.float64) + 0.5 * 3.25).astype(np.float32)  # mean (1 + 12) / 4
    np.testing.assert_array_equal(new["model"][shared], expected)


def test_fedper_personal_model_combines_the_global_model_and_the_client_layers():
    algo = fedper()
    x = _start()
    assert algo.personalized and algo.stateful_clients and not algo.lockstep
    np.testing.assert_array_equal(algo.personal_model(None, {"model": x}), x)
    state = np.full(HEAD_SIZE, 7.0, np.float32)
    combined = algo.personal_model(state, {"model": x})
    np.testing.assert_array_equal(combined[algo.personal_index], state)
    np.testing.assert_array_equal(combined[algo.shared_index], x[algo.shared_index])
    assert not (x == 7.0).any()  # the broadcast was not written


# --- through the config -----------------------------------------------------------------------------------

SMALL = [
    "model=mlp",
    "dataset.train_limit=400",
    "dataset.test_limit=100",
    "clients.num=4",
    "clients.per_round=2",
    "train.rounds=3",
    "train.local_steps=3",
    "runtime=sequential",
]


def test_fedper_bad_layer_fails_in_build_setup_before_any_runtime(data_root):
    cfg = make_config(*SMALL, "algorithm=fedper", "algorithm.personal_layers=[nope]")
    algorithm = build_algorithm(cfg)  # the knob's type is fine: the model decides
    with pytest.raises(ConfigError, match=r"algorithm.personal_layers=\[nope\]") as err:
        build_setup(cfg, load_data(cfg), algorithm=algorithm)
    assert "\n" not in str(err.value) and "net.5" in str(err.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algorithm=ditto", "algorithm.lam=-1"], "algorithm.lam=-1 must be >= 0"),
        (
            ["algorithm=ditto", "algorithm.personal_epochs=0"],
            "algorithm.personal_epochs=0 must be an integer",
        ),
        (
            ["algorithm=fedper", "algorithm.personal_layers=net.5"],
            "algorithm.personal_layers=net.5 must be a list",
        ),
        (
            ["algorithm=fedper", "algorithm.personal_layers=[]"],
            r"algorithm.personal_layers=\[\] names no layer",
        ),
        (["algorithm=fedper", "optim.persistent_state=true"], "optim.persistent_state=true is not supported"),
    ],
)
def test_bad_personal_knobs_are_one_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        build_algorithm(make_config(*overrides))
    assert "\n" not in str(err.value)


def test_vectorize_is_refused():
    setup_cfg = make_config(*SMALL, "algorithm=ditto", "runtime.vectorize=true")
    with pytest.raises(ConfigError, match="no lock-step client half"):
        build_setup(setup_cfg, load_data(setup_cfg))


def test_registered_with_their_config():
    assert ALGORITHMS["ditto"] is Ditto and ALGORITHMS["fedper"] is FedPer
    assert build_algorithm(make_config("algorithm=ditto")) == Ditto()
    assert build_algorithm(make_config("algorithm=fedper")) == FedPer()


@pytest.mark.parametrize("name, state_size", [("ditto", MLP_SIZE), ("fedper", HEAD_SIZE)])
def test_runs_end_to_end_and_keeps_the_personal_states(tmp_path, data_root, name, state_size):
    result = run_experiment(make_config(*SMALL, f"algorithm={name}"), tmp_path)
    assert len(result.rounds) == 3 and np.isfinite(result.weights).all()
    with (tmp_path / "clients.csv").open() as f:
        trained = {int(r["client"]) for r in csv.DictReader(f) if r["status"] == "ok"}
    assert trained and set(result.client_states) == trained
    for state in result.client_states.values():
        assert state.shape == (state_size,) and state.dtype == np.float32 and np.isfinite(state).all()
    algorithm = build_algorithm(make_config(*SMALL, f"algorithm={name}"))
    algorithm.check_model(build_model("mlp"))
    for client, state in result.client_states.items():
        personal = algorithm.personal_model(state, {"model": result.weights})
        assert personal.shape == result.weights.shape
        assert np.abs(personal - result.weights).max() > 0, client


def test_a_round_ships_only_its_cohorts_personal_models():
    """The driver keeps every client's personal model; a round's plan carries the cohort's only (what the
    runtimes send to the workers), never the others'."""
    from raypfl.config import ClientsSpec, FaultsSpec
    from raypfl.driver.planning import RoundPlanner

    planner = RoundPlanner(ClientsSpec(num=20, per_round=4), FaultsSpec(), 0, 2)
    planner.client_states = {c: np.full(3, c, np.float32) for c in range(20)}
    for round_idx in range(1, 6):
        plan = planner.plan(round_idx)
        assert sorted(plan.states) == sorted(plan.cohort) and len(plan.cohort) == 4
        assert all(np.array_equal(plan.states[c], np.full(3, c, np.float32)) for c in plan.cohort)
