"""FedNova (Wang et al. 2020) and q-FFL / q-FedAvg (Li et al. 2020, Algorithm 2): their halves against the
papers' equations by hand, their reductions to FedAvg, their bad input, and one small run each.

Tolerances: the hand computations are float64 and elementwise, stored as float32 (rtol 1e-6). The
reductions to FedAvg compare two paths that train identically (same model, data and generator: the same
float32 local models, bit for bit, on any one machine) and then differ only by a multiply and a divide in
float64 (FedNova: by ||a_i||_1 and back; q-FFL with q = 0: by L and back) around one float32 rounding of
each client's statistic (<= 6e-8 relative), and the new model's own float32 rounding (one ulp, <= 6e-8
for |w| <= 1). Whatever the CPU's kernels (Intel or AMD) did in training, both sides see the same trained
weights, so atol 1e-6 holds on either.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raypfl.algorithms import ALGORITHMS, Algorithm, build_algorithm
from raypfl.algorithms.aggregate import MODEL, Aggregate, ClientUpdate
from raypfl.algorithms.base import ClientContext, Setting
from raypfl.algorithms.fednova import TAU, FedNova, normaliser
from raypfl.algorithms.qffl import QFFL, H
from raypfl.config import OptimSpec, TrainSpec
from raypfl.errors import ConfigError
from raypfl.models.weights import get_flat, set_flat
from tests.conftest import make_config

SIZES = (24, 40, 64)  # clients' data sizes: unequal sample weights


def bound(name: str, optim: OptimSpec | None = None, train: TrainSpec | None = None, **knobs) -> Algorithm:
    setting = Setting(
        optim or OptimSpec(lr=0.05),
        train or TrainSpec(batch_size=8, local_steps=5),
        num_clients=10,
        per_round=len(SIZES),
    )
    return ALGORITHMS[name](**knobs).bind(setting)


def tiny_model() -> nn.Module:
    """A 4-16-3 net: no dropout, no buffers (lock-step can train it too)."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))


def context(x0: np.ndarray, client: int, n: int, work: dict | None = None) -> ClientContext:
    """Client `client` with `n` fixed random samples, its model holding the global weights `x0`."""
    model = tiny_model()
    set_flat(model, x0)
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(10 + client))
    y = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(20 + client))
    generator = torch.Generator().manual_seed(client)
    return ClientContext(client, 1, model, x, y, np.arange(n), generator, None, work or {})


def one_round(algo: Algorithm, x0: np.ndarray, sizes=SIZES) -> tuple[np.ndarray, list[ClientUpdate]]:
    """Every client's half from x0, aggregated, then the server half: (the new model, the updates)."""
    broadcast, state = algo.server_init(x0)
    agg = Aggregate()
    updates = []
    for client, n in enumerate(sizes):
        update, _ = algo.client_update(context(x0, client, n), broadcast)
        assert agg.add(update)
        updates.append(update)
    new, _ = algo.server_update(broadcast, state, agg)
    return new["model"], updates


# --- FedNova ---------------------------------------------------------------------------------------------


def test_fednova_with_equal_steps_and_no_momentum_is_fedavg():
    x0 = get_flat(tiny_model())
    fedavg, _ = one_round(bound("fedavg"), x0)
    nova, updates = one_round(bound("fednova"), x0)
    # local_steps=5 for every client (whatever its size): tau_i = 5 = ||a_i||_1, tau_eff = 5
    assert [u.statistics[TAU][0] for u in updates] == [5.0] * len(SIZES)
    assert [u.weights[TAU] for u in updates] == [float(n) for n in SIZES]  # p_i: samples, as FedAvg
    assert np.abs(fedavg - x0).max() > 1e-3  # the round moved the model
    # both sides train the same float32 local models; they differ only by (y - x) / 5 * 5 in float64 and
    # float32 roundings (module docstring), which no CPU's training kernels (Intel, AMD) change
    np.testing.assert_allclose(nova, fedavg, rtol=0, atol=1e-6)


def test_fednova_server_step_with_unequal_steps_and_momentum_by_hand():
    """rho = 0.5; client A: 2 steps, y - x = (1, -2), 100 samples; client B: 4 steps, (3, 0.5), 300."""
    nova = bound("fednova", optim=OptimSpec(lr=0.05, momentum=0.5), server_lr=0.8)
    # ||a||_1 = [tau - rho (1 - rho^tau) / (1 - rho)] / (1 - rho)
    a_a = (2 - 0.5 * (1 - 0.5**2) / 0.5) / 0.5  # 2.5
    a_b = (4 - 0.5 * (1 - 0.5**4) / 0.5) / 0.5  # 6.125
    assert (a_a, a_b) == (2.5, 6.125)
    raw = [(np.array([1.0, -2.0]), 2, 100.0), (np.array([3.0, 0.5]), 4, 300.0)]
    agg = Aggregate()
    for client, (delta, steps, n) in enumerate(raw):
        update = nova.normalise(
            ClientUpdate(client, {MODEL: delta.astype(np.float32)}, {MODEL: n}, {"steps": steps})
        )
        assert update.weights == {MODEL: n, TAU: n}
        agg.add(update)
    x0 = np.array([0.1, 0.2], np.float32)
    broadcast, state = nova.server_init(x0)
    new, _ = nova.server_update(broadcast, state, agg)
    p = np.array([0.25, 0.75])  # 100 / 400, 300 / 400
    tau_eff = 0.25 * 2.5 + 0.75 * 6.125  # 5.21875
    d = p[0] * np.array([1.0, -2.0]) / 2.5 + p[1] * np.array([3.0, 0.5]) / 6.125
    expected = np.array([0.1, 0.2]) + 0.8 * tau_eff * d
    np.testing.assert_allclose(new["model"], expected.astype(np.float32), rtol=1e-6)
    # FedAvg would have moved by the sample-weighted mean of y - x instead: (2.5, -0.125)
    assert not np.allclose(expected - [0.1, 0.2], 0.8 * (p[0] * raw[0][0] + p[1] * raw[1][0]))


def test_fednova_normaliser_is_the_momentum_sgd_coefficient_sum():
    """A client that runs tau steps with momentum rho sends ||a||_1 (the formula), and the formula is what
    torch's SGD does: with a constant gradient g, tau steps move the weights by -lr ||a||_1 g."""
    rho, tau, lr = 0.9, 7, 0.05
    formula = (tau - rho * (1 - rho**tau) / (1 - rho)) / (1 - rho)
    assert normaliser(tau, rho) == pytest.approx(formula, rel=1e-12)
    assert normaliser(tau, 0.0) == tau and normaliser(0, rho) == 0.0
    p = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    sgd = torch.optim.SGD([p], lr=lr, momentum=rho)
    for _ in range(tau):
        p.grad = torch.ones(1, dtype=torch.float64)
        sgd.step()
    assert float(-p.detach()[0] / lr) == pytest.approx(formula, rel=1e-12)

    optim = OptimSpec(lr=lr, momentum=rho)
    train = TrainSpec(batch_size=8, local_steps=tau)
    x0 = get_flat(tiny_model())
    nova, _ = bound("fednova", optim, train).client_update(context(x0, 0, 40), {MODEL: x0})
    plain, _ = bound("fedavg", optim, train).client_update(context(x0, 0, 40), {MODEL: x0})
    assert nova.metrics["steps"] == tau
    assert nova.statistics[TAU][0] == pytest.approx(formula, rel=1e-12)
    np.testing.assert_allclose(
        nova.statistics[MODEL] * formula, plain.statistics[MODEL], rtol=1e-6, atol=1e-9
    )


def test_fednova_lockstep_half_normalises_like_the_plain_half():
    """runtime.vectorize=true: FedAvg's lock-step updates, each divided by its own ||a_i||_1 (clients given
    2, 5 and 9 steps by their work)."""
    optim = OptimSpec(lr=0.05, momentum=0.5)
    nova, fedavg = bound("fednova", optim), bound("fedavg", optim)
    assert nova.lockstep and not nova.stateful_clients
    x0 = get_flat(tiny_model())
    works = [{"local_steps": s} for s in (2, 5, 9)]

    def contexts():  # lock-step contexts share one model holding the global weights
        cs = [context(x0, c, n, w) for c, (n, w) in enumerate(zip(SIZES, works))]
        for c in cs[1:]:
            c.model = cs[0].model
        return cs

    ours = nova.client_updates(contexts(), {MODEL: x0})
    peer = fedavg.client_updates(contexts(), {MODEL: x0})
    for (update, _), (plain, _), work in zip(ours, peer, works):
        norm = normaliser(work["local_steps"], 0.5)
        assert update.metrics["steps"] == work["local_steps"]
        assert update.statistics[TAU][0] == norm
        np.testing.assert_allclose(
            update.statistics[MODEL] * norm, plain.statistics[MODEL], rtol=1e-6, atol=1e-9
        )


# --- q-FFL -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lipschitz", [None, 3.0])
def test_qffl_with_q_zero_is_fedavg_with_uniform_weights(lipschitz):
    x0 = get_flat(tiny_model())
    fedavg, _ = one_round(bound("fedavg", weighting="uniform"), x0)
    qffl, updates = one_round(bound("qffl", q=0.0, lipschitz=lipschitz), x0)
    lip = lipschitz or 1 / 0.05
    assert [u.statistics[H][0] for u in updates] == pytest.approx([lip] * len(SIZES), rel=1e-12)  # h_k = L
    assert np.abs(fedavg - x0).max() > 1e-3
    # the same local models on both sides; q-FFL multiplies by L and divides by sum h = m L in float64
    np.testing.assert_allclose(qffl, fedavg, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "q, deltas, hs",
    [
        # A: F = 2, dw = (1, -2), ||dw||^2 = 5; B: F = 0.5, dw = (0.5, 0.5), ||dw||^2 = 0.5; L = 10
        # q = 1: Delta = F dw, h = 1 * F^0 * ||dw||^2 + L F
        (1.0, [(2.0, -4.0), (0.25, 0.25)], [5.0 + 20.0, 0.5 + 5.0]),
        # q = 5: Delta = F^5 dw, h = 5 F^4 ||dw||^2 + L F^5 (2^5 = 32, 2^4 = 16; 0.5^5 = 1/32, 0.5^4 = 1/16)
        (5.0, [(32.0, -64.0), (1 / 64, 1 / 64)], [5 * 16 * 5 + 10 * 32, 5 / 16 * 0.5 + 10 / 32]),
    ],
)
def test_qffl_client_statistics_and_server_step_by_hand(q, deltas, hs):
    qffl = bound("qffl", q=q, lipschitz=10.0)
    agg = Aggregate()
    for client, (loss, dw) in enumerate([(2.0, [1.0, -2.0]), (0.5, [0.5, 0.5])]):
        delta, h = qffl.fair_step(loss, np.array(dw))
        np.testing.assert_allclose(delta, deltas[client], rtol=1e-12)
        assert h == pytest.approx(hs[client], rel=1e-12)
        agg.add(
            ClientUpdate(client, {MODEL: delta.astype(np.float32), H: np.array([h])}, {MODEL: 1.0, H: 1.0})
        )
    x0 = np.array([0.1, 0.2], np.float32)
    broadcast, state = qffl.server_init(x0)
    new, _ = qffl.server_update(broadcast, state, agg)
    expected = np.array([0.1, 0.2]) - np.add(*map(np.array, deltas)) / sum(hs)  # w - sum Delta / sum h
    np.testing.assert_allclose(new["model"], expected.astype(np.float32), rtol=1e-6)


def test_qffl_client_half_uses_the_loss_before_training():
    """F_k is the received model's mean cross-entropy on the client's data (eval mode, before any step);
    dw = L (w - w_bar) with w_bar the same local training as FedAvg's, L = 1/optim.lr by default."""
    x0 = get_flat(tiny_model())
    ctx = context(x0, 1, 40)
    with torch.no_grad():
        before = float(F.cross_entropy(ctx.model(ctx.x), ctx.y))
    qffl = bound("qffl", q=2.0)
    update, state = qffl.client_update(ctx, {MODEL: x0})
    plain, _ = bound("fedavg").client_update(context(x0, 1, 40), {MODEL: x0})
    assert state is None and update.weights == {MODEL: 1.0, H: 1.0}
    assert update.metrics["loss_before"] == pytest.approx(before, rel=1e-6)
    assert update.metrics["steps"] == plain.metrics["steps"] == 5
    dw = -plain.statistics[MODEL].astype(np.float64) / 0.05  # L (w - w_bar), w_bar - w = FedAvg's delta
    np.testing.assert_allclose(update.statistics[MODEL], before**2 * dw, rtol=1e-5, atol=1e-7)
    h = 2 * before * float(dw @ dw) + before**2 / 0.05
    assert update.statistics[H][0] == pytest.approx(h, rel=1e-5)


def test_qffl_a_zero_loss_gives_finite_statistics():
    """F_k = 0 is floored (raypfl.algorithms.qffl.LOSS_FLOOR): no 0^(q-1) = inf for 0 < q < 1."""
    for q in (0.5, 1.0, 3.0):
        delta, h = bound("qffl", q=q).fair_step(0.0, np.array([1.0, -1.0]))
        assert np.isfinite(delta).all() and np.isfinite(h) and h > 0


# --- bad input and runs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algorithm=qffl", "algorithm.q=-1"], "algorithm.q=-1 must be >= 0"),
        (["algorithm=qffl", "algorithm.lipschitz=0"], "algorithm.lipschitz=0 must be > 0"),
        (["algorithm=qffl", "+algorithm.weighting=samples"], "unknown key algorithm.weighting"),
        (["algorithm=fednova", "optim.name=adam"], "algorithm=fednova needs optim.name=sgd"),
    ],
)
def test_bad_fednova_and_qffl_config_is_one_clear_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        build_algorithm(make_config(*overrides))
    assert "\n" not in str(err.value)


def test_defaults_build_from_their_config_files():
    assert isinstance(build_algorithm(make_config("algorithm=fednova")), FedNova)
    qffl = build_algorithm(make_config("algorithm=qffl", "optim.lr=0.1"))
    assert isinstance(qffl, QFFL) and (qffl.q, qffl.lipschitz) == (1.0, None)
    assert qffl.lipschitz_constant == pytest.approx(10.0)
    assert not qffl.lockstep  # runtime.vectorize=true is refused for it (no lock-step half)
