"""Each algorithm's halves against its paper's equations, or against a peer implementation of them.

Peers: PyTorch's optimizers implement the same server steps when fed the pseudo-gradient -Delta:
`torch.optim.SGD(momentum)` is FedAvgM's step (Hsu et al. 2019), `torch.optim.Adagrad` with
`initial_accumulator_value=tau^2, eps=tau` is FedAdagrad with beta1=0, and `torch.optim.Adam` is FedAdam
with bias correction once tau is negligible (Reddi et al. 2021, Algorithm 2). Both sides compute in float64
and elementwise only (no reductions whose order a CPU's kernels could change), so what holds on one CPU holds
on Intel and AMD alike; the one difference is that raypfl stores the model as float32 after each round
(<= 6e-8 per round for |x| <= 1, hence atol 1e-6 over 6 rounds), and FedAdam's tau 1e-9 sits where Adam's
eps does (a ~1e-8 relative effect).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from raypfl.algorithms import ALGORITHMS, Algorithm, build_algorithm
from raypfl.algorithms.aggregate import Aggregate, ClientUpdate
from raypfl.algorithms.base import ClientContext, Setting
from raypfl.algorithms.scaffold import CONTROL
from raypfl.config import OptimSpec, TrainSpec
from raypfl.driver.experiment import run_experiment
from raypfl.errors import ConfigError
from raypfl.models.weights import get_flat, set_flat
from raypfl.models.zoo import build_model
from tests.conftest import make_config, run_cli

HERE = "tests.algorithms.test_algorithms"  # the user classes below, as a `_target_` names them
SETTING = Setting(OptimSpec(lr=0.05), TrainSpec(batch_size=16, local_steps=5), num_clients=10, per_round=4)


def bound(name: str, **knobs) -> Algorithm:
    return ALGORITHMS[name](**knobs).bind(SETTING)


def mean_of(delta: np.ndarray) -> Aggregate:
    """An aggregate whose weighted mean update is `delta`."""
    agg = Aggregate()
    agg.add(ClientUpdate(0, {"model": delta.astype(np.float32)}, {"model": 1.0}))
    return agg


def server_rounds(algo: Algorithm, x0: np.ndarray, deltas: list[np.ndarray]) -> tuple[np.ndarray, dict]:
    broadcast, state = algo.server_init(x0.astype(np.float32))
    for delta in deltas:
        broadcast, state = algo.server_update(broadcast, state, mean_of(delta))
    return broadcast["model"], state


def torch_rounds(optimizer_cls, x0: np.ndarray, deltas: list[np.ndarray], **options) -> np.ndarray:
    """A torch optimizer stepping on the pseudo-gradient -Delta each round, in float64."""
    p = torch.nn.Parameter(torch.tensor(x0, dtype=torch.float64))
    opt = optimizer_cls([p], **options)
    for delta in deltas:
        p.grad = -torch.tensor(delta.astype(np.float32), dtype=torch.float64)
        opt.step()
    return p.detach().numpy()


@pytest.fixture
def deltas() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.normal(0, 0.05, 64) for _ in range(6)]


def test_fedavgm_is_server_sgd_with_momentum(deltas):
    x0 = np.linspace(-1, 1, 64)
    ours, state = server_rounds(bound("fedavgm", server_lr=0.7, server_momentum=0.9), x0, deltas)
    peer = torch_rounds(torch.optim.SGD, x0.astype(np.float32), deltas, lr=0.7, momentum=0.9)
    np.testing.assert_allclose(ours, peer, rtol=0, atol=1e-6)  # float32 model each round
    assert np.abs(state["momentum"]).max() > 0


def test_fedadagrad_with_beta1_zero_is_server_adagrad(deltas):
    x0 = np.linspace(-1, 1, 64)
    ours, state = server_rounds(bound("fedadagrad", server_lr=0.1, beta1=0.0, tau=1e-3), x0, deltas)
    peer = torch_rounds(
        torch.optim.Adagrad, x0.astype(np.float32), deltas, lr=0.1, initial_accumulator_value=1e-6, eps=1e-3
    )
    np.testing.assert_allclose(ours, peer, rtol=0, atol=1e-6)
    assert state["t"] == len(deltas)


def test_fedadam_with_bias_correction_is_server_adam(deltas):
    x0 = np.linspace(-1, 1, 64)
    algo = bound("fedadam", server_lr=0.01, beta1=0.9, beta2=0.99, tau=1e-9, bias_correction=True)
    ours, _ = server_rounds(algo, x0, deltas)
    peer = torch_rounds(torch.optim.Adam, x0.astype(np.float32), deltas, lr=0.01, betas=(0.9, 0.99), eps=1e-9)
    np.testing.assert_allclose(ours, peer, rtol=0, atol=1e-6)


def test_fedadam_and_fedyogi_follow_algorithm_2_without_bias_correction():
    """One step by hand: m1 = (1-b1) D, v1 from v0 = tau^2, x1 = x0 + eta m1 / (sqrt(v1) + tau)."""
    delta = np.array([0.2, -0.1, 0.0, 0.05])
    eta, b1, b2, tau = 0.01, 0.9, 0.99, 1e-3
    m1 = (1 - b1) * delta
    v_adam = b2 * tau**2 + (1 - b2) * delta**2
    v_yogi = tau**2 - (1 - b2) * delta**2 * np.sign(tau**2 - delta**2)
    for name, v1 in (("fedadam", v_adam), ("fedyogi", v_yogi)):
        ours, state = server_rounds(
            bound(name, server_lr=eta, beta1=b1, beta2=b2, tau=tau), np.zeros(4), [delta]
        )
        expected = (eta * m1 / (np.sqrt(v1) + tau)).astype(np.float32)
        np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(state["v"], v1, rtol=1e-6, atol=1e-12)
    # Yogi's v moves towards D^2 additively: where v > D^2 it shrinks by (1-b2) D^2
    yogi = bound("fedyogi", beta2=b2)
    big = np.full(4, 1.0)
    assert np.allclose(yogi.second_moment(big, delta**2), big - (1 - b2) * delta**2)


def _client(algo: Algorithm, broadcast: dict, state=None, client: int = 0, n: int = 64):
    """One client's update on fixed random data, from `broadcast`'s model (restored afterwards)."""
    torch.manual_seed(0)
    model = build_model("mlp")
    set_flat(model, broadcast["model"])
    x = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(3 + client))
    y = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(4 + client))
    ctx = ClientContext(client, 1, model, x, y, np.arange(n), torch.Generator().manual_seed(client), state)
    return algo.client_update(ctx, broadcast)


def _start() -> np.ndarray:
    torch.manual_seed(1)
    return get_flat(build_model("mlp"))


def test_fedprox_mu_zero_is_fedavg_and_mu_pulls_towards_the_global_model():
    x = _start()
    plain, _ = _client(bound("fedavg"), {"model": x})
    zero, _ = _client(bound("fedprox", mu=0.0), {"model": x})
    np.testing.assert_array_equal(plain.statistics["model"], zero.statistics["model"])
    pulled, _ = _client(bound("fedprox", mu=5.0), {"model": x})
    assert np.linalg.norm(pulled.statistics["model"]) < 0.9 * np.linalg.norm(plain.statistics["model"])


def test_scaffold_first_round_is_fedavg_and_control_variates_follow_option_2():
    x = _start()
    scaffold = bound("scaffold", weighting="uniform")
    broadcast, _ = scaffold.server_init(x)
    assert not broadcast[CONTROL].any()
    update, c_i = _client(scaffold, broadcast)
    fedavg, _ = _client(bound("fedavg", weighting="uniform"), {"model": x})
    # c = c_i = 0: the corrected gradient is the plain one, the same update as FedAvg
    np.testing.assert_array_equal(update.statistics["model"], fedavg.statistics["model"])
    steps = update.metrics["steps"]
    expected = (x.astype(np.float64) - (x + update.statistics["model"])) / (steps * SETTING.optim.lr)
    np.testing.assert_allclose(c_i, expected, rtol=1e-4, atol=1e-6)  # c_i+ = c_i - c + (x - y) / (K lr)
    np.testing.assert_array_equal(update.statistics[CONTROL], c_i)  # delta c_i = c_i+ - 0
    assert update.weights == {"model": 1.0, CONTROL: 1.0}
    # with c != c_i the correction changes the local steps
    shifted = {**broadcast, CONTROL: np.full_like(x, 0.01)}
    corrected, _ = _client(scaffold, shifted, state=np.zeros_like(x))
    assert np.abs(corrected.statistics["model"] - update.statistics["model"]).max() > 1e-4


def test_scaffold_server_moves_c_by_cohort_over_federation_of_the_mean_control_delta():
    scaffold = bound("scaffold", server_lr=1.0)
    broadcast, state = scaffold.server_init(np.zeros(3, np.float32))
    agg = Aggregate()
    for client, (dy, dc) in enumerate([(1.0, 2.0), (3.0, 4.0), (5.0, 6.0), (7.0, 8.0)]):
        stats = {"model": np.full(3, dy, np.float32), CONTROL: np.full(3, dc, np.float32)}
        agg.add(ClientUpdate(client, stats, {"model": 1.0, CONTROL: 1.0}))
    new, _ = scaffold.server_update(broadcast, state, agg)
    np.testing.assert_allclose(new["model"], 4.0)  # x + mean(dy)
    np.testing.assert_allclose(new[CONTROL], (4 / SETTING.num_clients) * 5.0)  # c + |S|/N mean(dc)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algorithm=fedadam", "algorithm.beta1=1.0"], "algorithm.beta1=1.0 must be in [0, 1)"),
        (["algorithm=fedadam", "+algorithm.momentum=0.9"], "unknown key algorithm.momentum"),
        (["algorithm=scaffold", "optim.momentum=0.9"], "algorithm=scaffold needs plain SGD"),
        (["algorithm.name=fedsomething"], "unknown algorithm=fedsomething"),
        (["+algorithm._target_=tests.nowhere.Algo"], "algorithm._target_=tests.nowhere.Algo: cannot import"),
        ([f"+algorithm._target_={HERE}.NoServerHalf"], "does not implement server_update"),
        (
            ["+algorithm._target_=tests.algorithms.test_algorithms.NotAnAlgorithm"],
            "is not a raypfl.algorithms.Algorithm",
        ),
    ],
)
def test_bad_algorithm_config_is_one_clear_line(overrides, message):
    with pytest.raises(
        ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
    ):
        build_algorithm(make_config(*overrides))


@dataclass
class NoServerHalf(Algorithm):
    """A user's algorithm that forgot its server half."""

    def client_update(self, ctx, broadcast):
        raise NotImplementedError


class NotAnAlgorithm:
    pass


def test_an_algorithm_missing_a_half_exits_2_before_ray_starts(tmp_path):
    done = run_cli(
        "+algorithm._target_=tests.algorithms.test_algorithms.NoServerHalf",
        "~algorithm.weighting",
        "~algorithm.server_lr",
        "runtime=ray",
        f"hydra.run.dir={tmp_path}",
    )
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and "does not implement server_update" in lines[0]
    assert "Started a local Ray" not in done.stdout + done.stderr


def test_bytes_count_the_named_arrays(tmp_path, data_root):
    """SCAFFOLD broadcasts the model and c, and each client sends two statistics: twice FedAvg's bytes."""
    args = ["model=mlp", "dataset.train_limit=600", "dataset.test_limit=100", "clients.num=6"]
    args += ["clients.per_round=3", "train.rounds=1", "train.local_steps=2", "runtime=sequential"]
    rows = {
        name: run_experiment(make_config(*args, f"algorithm={name}"), tmp_path / name).rounds[0]
        for name in ("fedavg", "scaffold")
    }
    model_bytes = 199_210 * 4  # mlp's float32 weights
    assert (rows["fedavg"]["bytes_down"], rows["fedavg"]["bytes_up"]) == (3 * model_bytes, 3 * model_bytes)
    assert (rows["scaffold"]["bytes_down"], rows["scaffold"]["bytes_up"]) == (
        6 * model_bytes,
        6 * model_bytes,
    )
