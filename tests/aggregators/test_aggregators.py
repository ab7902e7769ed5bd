"""Aggregation rules on stacked client statistics (raypfl.aggregators), pure numpy.

References: Flower's strategy tests (Multi-Krum on 0.2/0.5/1.0 with f=1, keep=2 gives 0.35; its trimmed mean
follows scipy's `trim_mean`), Yin et al. 2018 (coordinate-wise median and trimmed mean), Blanchard et al. 2017
(Krum scores, recomputed here from explicit pairwise norms), Pillutla et al. 2022 (geometric median,
recomputed here by plain Weiszfeld iterations to convergence).

Tolerances: every rule computes in float64 with a few reductions over n <= 10 rows or d <= 40 columns of
values of size <= 1e6, so results agree with the references to ~1e-12 relative; translation by c (|c| ~ 10)
costs one rounding of each value (~2e-15), hence atol 1e-9.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from omegaconf import OmegaConf

from raypfl.aggregators import (
    AGGREGATORS,
    RFA,
    Aggregator,
    Krum,
    Mean,
    Median,
    MultiKrum,
    TrimmedMean,
    as_aggregate,
    build_aggregator,
    stack_updates,
)
from raypfl.aggregators import base as aggbase
from raypfl.algorithms.aggregate import Aggregate, ClientUpdate
from raypfl.errors import ConfigError
from tests.conftest import CONF_DIR

#: One instance of every shipped rule, with knobs that make it do something on 9 clients.
RULES = {
    "mean": Mean(),
    "median": Median(),
    "trimmed_mean": TrimmedMean(beta=0.25),
    "krum": Krum(f=2),
    "multikrum": MultiKrum(f=2, keep=4),
    "rfa": RFA(),
}


def single(x: np.ndarray, w: np.ndarray | None = None) -> tuple[dict, dict]:
    """A one-statistic (`model`) stack."""
    return {"model": x}, {"model": np.ones(len(x)) if w is None else np.asarray(w, dtype=np.float64)}


def two_statistics(n: int = 9, seed: int = 0) -> tuple[dict, dict]:
    """`model` (d=40) and `control` (d=7) for n clients, with unequal weights per statistic."""
    rng = np.random.default_rng(seed)
    vectors = {"model": rng.normal(0, 1, (n, 40)), "control": rng.normal(0, 0.1, (n, 7))}
    weights = {"model": rng.integers(5, 50, n).astype(np.float64), "control": np.ones(n)}
    return vectors, weights


def weiszfeld(x: np.ndarray, alpha: np.ndarray, iterations: int = 20_000) -> np.ndarray:
    """The weighted geometric median of the rows of x by plain Weiszfeld iterations (reference)."""
    v = alpha @ x / alpha.sum()
    for _ in range(iterations):
        beta = alpha / np.maximum(1e-15, np.linalg.norm(x - v, axis=1))
        v_next = beta @ x / beta.sum()
        if np.array_equal(v_next, v):
            break
        v = v_next
    return v


# --- the peers' vectors -------------------------------------------------------------------------------------


def test_trimmed_mean_drops_floor_beta_n_per_side():
    # 4 clients, beta = 0.25: one value dropped from each side of every coordinate, the middle two averaged
    x = np.array([[0.1] * 4, [0.4] * 4, [0.6] * 4, [100.0] * 4], dtype=np.float32)
    est, metrics = TrimmedMean(beta=0.25).combine(*single(x))
    np.testing.assert_allclose(est["model"], [0.5] * 4, rtol=1e-7)  # (0.4f + 0.6f) / 2
    assert (est["model"].astype(np.float32) == np.float32(0.5)).all()
    assert metrics == {"trimmed_per_side": 1.0}
    # per coordinate, by hand: [1, 2, 3, 100] -> (2 + 3) / 2; [9, 8, 7, -100] -> (7 + 8) / 2
    x = np.array([[1.0, 9.0], [2.0, 8.0], [3.0, 7.0], [100.0, -100.0]])
    est, _ = TrimmedMean(beta=0.25).combine(*single(x, [1, 1, 1, 50]))  # weights ignored
    assert est["model"].tolist() == [2.5, 7.5]
    # floor(0.1 * 4) = 0: nothing trimmed, the plain mean
    est, metrics = TrimmedMean(beta=0.1).combine(*single(x))
    np.testing.assert_allclose(est["model"], x.mean(axis=0), rtol=1e-15)
    assert metrics == {"trimmed_per_side": 0.0}


def test_trimmed_mean_matches_scipy_semantics():
    # scipy.stats.trim_mean: floor(proportion * n) cut per side, after sorting each column
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (10, 13))
    for beta in (0.0, 0.1, 0.2, 0.35, 0.49):
        cut = int(beta * 10)
        expected = np.sort(x, axis=0)[cut : 10 - cut].mean(axis=0)
        est, _ = TrimmedMean(beta=beta).combine(*single(x))
        np.testing.assert_allclose(est["model"], expected, rtol=1e-14, atol=1e-15)


def test_multikrum_flower_vectors():
    # Flower multikrum_test.py: 0.2 / 0.5 / 1.0 (x4, float32, 5 examples each), f=1, keep=2 -> 0.35.
    # n = 3 <= 2f+2 = 4: one neighbour per score (Flower's max(1, n-f-2)); scores 0.36, 0.36, 1.0
    x = np.array([[0.2] * 4, [0.5] * 4, [1.0] * 4], dtype=np.float32)
    est, metrics = MultiKrum(f=1, keep=2).combine(*single(x, [5, 5, 5]))
    np.testing.assert_allclose(est["model"], [0.35] * 4, rtol=1e-7)
    assert (est["model"].astype(np.float32) == np.float32(0.35)).all()  # Flower's exact float32 check
    assert metrics == {"multikrum_kept": 2.0, "aggregator_degraded": 1.0}
    # the kept clients are averaged with their weights: (1 * 0.2 + 3 * 0.5) / 4
    x = np.array([[0.2] * 4, [0.5] * 4, [1.0] * 4])
    est, _ = MultiKrum(f=1, keep=2).combine(*single(x, [1, 3, 100]))
    np.testing.assert_allclose(est["model"], [(0.2 + 1.5) / 4] * 4, rtol=1e-15)


# --- robustness ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("colluding", [True, False])
def test_krum_picks_an_inlier_against_two_outliers(colluding):
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, (7, 20))
    x[2] = 1e3
    x[5] = 1e3 if colluding else -1e3
    est, metrics = Krum(f=2).combine(*single(x))
    chosen = int(metrics["krum_selected"])
    assert chosen not in (2, 5)
    assert metrics["aggregator_degraded"] == 0.0  # 7 > 2f+2 = 6
    assert np.array_equal(est["model"], x[chosen])
    # Multi-Krum with keep = n - f averages exactly the five inliers
    est, metrics = MultiKrum(f=2).combine(*single(x))
    inliers = np.delete(x, [2, 5], axis=0)
    np.testing.assert_allclose(est["model"], inliers.mean(axis=0), rtol=1e-12, atol=1e-13)
    assert metrics == {"multikrum_kept": 5.0, "aggregator_degraded": 0.0}


def test_krum_scores_match_explicit_distances():
    # Blanchard et al.'s score from explicit pairwise norms (as Flower computes them), over the
    # concatenation of both statistics; the Gram-matrix path must agree
    vectors, _ = two_statistics(n=8)
    flat = np.concatenate([vectors[k] for k in sorted(vectors)], axis=1)
    f = 2
    expected = []
    for i in range(8):
        d = sorted(float(np.linalg.norm(flat[i] - flat[j]) ** 2) for j in range(8) if j != i)
        expected.append(sum(d[: 8 - f - 2]))
    np.testing.assert_allclose(Krum(f=f).scores(vectors), expected, rtol=1e-12)


def test_krum_gram_keeps_precision_next_to_huge_outliers():
    # the inliers' distances (~1e-6 apart) survive an outlier at 1e6 in the same stack
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1e-6, (6, 50)) + 0.3
    x = np.vstack([x, np.full((1, 50), 1e6)])
    dist = aggbase.squared_distances({"model": x})
    exact = ((x[:6, None, :] - x[None, :6, :]) ** 2).sum(axis=2)
    np.testing.assert_allclose(dist[:6, :6], exact, rtol=1e-6, atol=1e-24)


def test_median_ignores_three_of_ten_at_1e6():
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1, (10, 30))
    x[[1, 4, 8]] = 1e6
    est, metrics = Median().combine(*single(x, np.arange(1, 11)))
    inliers = np.delete(x, [1, 4, 8], axis=0)
    assert (est["model"] >= inliers.min(axis=0)).all()
    assert (est["model"] <= inliers.max(axis=0)).all()
    assert metrics == {}
    np.testing.assert_array_equal(est["model"], np.median(x, axis=0))


def test_rfa_with_one_outlier_at_1e6_reaches_the_geometric_median():
    rng = np.random.default_rng(5)
    x = rng.normal(0, 1, (10, 6))
    x[3] = 1e6
    alpha = np.ones(10)
    reference = weiszfeld(x, alpha)
    # converged: within 1e-3 of the geometric median, which the inliers hold near their own
    est, metrics = RFA(passes=30).combine(*single(x, alpha))
    assert np.linalg.norm(est["model"] - reference) < 1e-3
    assert metrics == {"rfa_passes": 30.0}
    assert np.linalg.norm(reference - weiszfeld(np.delete(x, 3, axis=0), np.ones(9))) < 1.0
    # the default 5 passes start at the mean (2.4e5 away) and shrink the gap ~(n-1)x per pass: 41 away
    # here, > 1e3 times closer to the geometric median than the mean, but not there yet
    mean_gap = np.linalg.norm(x.mean(axis=0) - reference)
    est5, metrics = RFA().combine(*single(x, alpha))
    assert np.linalg.norm(est5["model"] - reference) < 1e-3 * mean_gap
    assert metrics == {"rfa_passes": 5.0}


def test_rfa_weights_and_statistics():
    # alpha = the `model` weights; the same coefficients move every statistic
    vectors, weights = two_statistics(n=7)
    est, _ = RFA(passes=200, smoothing=1e-12).combine(vectors, weights)
    flat = np.concatenate([vectors[k] for k in sorted(vectors)], axis=1)
    reference = weiszfeld(flat, weights["model"])
    got = np.concatenate([est[k] for k in sorted(est)])
    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-9)
    # passes=1 is the weighted mean (with the model's weights, for every statistic)
    est, metrics = RFA(passes=1).combine(vectors, weights)
    for name in vectors:
        expected = weights["model"] @ vectors[name] / weights["model"].sum()
        np.testing.assert_allclose(est[name], expected, rtol=1e-13, atol=1e-15)
    assert metrics == {"rfa_passes": 1.0}
    # no `model`: the first statistic in name order gives alpha
    renamed = {"b": vectors["model"], "a": vectors["control"]}
    w = {"b": weights["model"], "a": np.arange(1.0, 8.0)}
    est, _ = RFA(passes=1).combine(renamed, w)
    np.testing.assert_allclose(est["b"], w["a"] @ renamed["b"] / w["a"].sum(), rtol=1e-13)
    # identical clients: a fixed point at once
    est, metrics = RFA().combine(*single(np.ones((4, 3))))
    assert metrics["rfa_passes"] < 5 and est["model"].tolist() == [1.0, 1.0, 1.0]


# --- properties of every rule -------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", list(RULES))
def test_translation_equivariance(rule):
    vectors, weights = two_statistics()
    rng = np.random.default_rng(6)
    shift = {name: rng.normal(0, 10, x.shape[1]) for name, x in vectors.items()}
    moved = {name: x + shift[name] for name, x in vectors.items()}
    est, metrics = RULES[rule].combine(vectors, weights)
    est_moved, metrics_moved = RULES[rule].combine(moved, weights)
    assert set(est) == set(vectors)
    for name in vectors:
        assert est[name].dtype == np.float64 and est[name].shape == (vectors[name].shape[1],)
        np.testing.assert_allclose(est_moved[name], est[name] + shift[name], rtol=0, atol=1e-9)
    assert metrics_moved == metrics


@pytest.mark.parametrize("rule", list(RULES))
def test_one_client_is_returned_as_is(rule):
    x = np.array([[0.1, -2.5, 3.0]], dtype=np.float32)
    c = np.array([[7.0]], dtype=np.float32)
    est, _ = RULES[rule].combine(
        {"model": x, "control": c}, {"model": np.array([3.0]), "control": np.ones(1)}
    )
    assert np.array_equal(est["model"], x[0].astype(np.float64)) and est["model"].dtype == np.float64
    assert np.array_equal(est["control"], [7.0])


@pytest.mark.parametrize("rule", list(RULES))
def test_deterministic_bits(rule, monkeypatch):
    vectors, weights = two_statistics()
    as32 = {name: x.astype(np.float32) for name, x in vectors.items()}
    widened = {name: x.astype(np.float64) for name, x in as32.items()}
    first, _ = RULES[rule].combine(as32, weights)
    again, _ = RULES[rule].combine(as32, weights)
    wide, _ = RULES[rule].combine(widened, weights)
    for name in vectors:  # float32 rows give the bits of the same values in float64
        assert first[name].tobytes() == again[name].tobytes() == wide[name].tobytes()
    # column blocks: a block size of 3 changes at most the last bits of the reductions over columns
    monkeypatch.setattr(aggbase, "COLUMNS", 3)
    blocked, _ = RULES[rule].combine(as32, weights)
    for name in vectors:
        np.testing.assert_allclose(blocked[name], first[name], rtol=1e-12, atol=1e-14)


def test_shuffled_clients_give_identical_bits():
    vectors, weights = two_statistics()
    updates = [
        ClientUpdate(
            client=10 + i,
            statistics={name: x[i].astype(np.float32) for name, x in vectors.items()},
            weights={name: float(w[i]) for name, w in weights.items()},
        )
        for i in range(9)
    ]
    order = np.random.default_rng(7).permutation(9)
    stacked, w, clients = stack_updates(updates)
    shuffled, w2, clients2 = stack_updates([updates[i] for i in order])
    assert clients == clients2 == list(range(10, 19))
    assert stacked["model"].dtype == np.float32 and stacked["model"].shape == (9, 40)
    for rule in RULES.values():
        a, ma = rule.combine(stacked, w)
        b, mb = rule.combine(shuffled, w2)
        assert ma == mb
        assert all(a[name].tobytes() == b[name].tobytes() for name in a)
    with pytest.raises(ValueError, match="same ones from every client"):
        stack_updates([updates[0], ClientUpdate(3, {"model": np.zeros(40)}, {"model": 1.0})])


def test_mean_matches_the_linear_aggregate():
    vectors, weights = two_statistics()
    agg = Aggregate()
    for i in range(9):
        agg.add(
            ClientUpdate(
                i,
                {name: x[i] for name, x in vectors.items()},
                {name: float(w[i]) for name, w in weights.items()},
            )
        )
    est, metrics = Mean().combine(vectors, weights)
    assert metrics == {}
    back = as_aggregate(est, weights, list(range(9)))
    assert back.clients == list(range(9))
    for name in vectors:
        np.testing.assert_allclose(est[name], agg.mean(name), rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(back.mean(name), est[name], rtol=1e-15)
        assert back.weights[name] == pytest.approx(agg.weights[name], rel=1e-15)
    assert not Mean.needs_stack and all(cls.needs_stack for cls in AGGREGATORS.values() if cls is not Mean)


def test_krum_degrades_when_clients_drop(caplog):
    rng = np.random.default_rng(8)
    x = rng.normal(0, 1, (4, 5))
    rule = Krum(f=1)  # 4 <= 2f+2: one neighbour per score
    with caplog.at_level(logging.WARNING, logger="raypfl.aggregators.krum"):
        _, metrics = rule.combine(*single(x))
        _, again = rule.combine(*single(x))
    assert metrics["aggregator_degraded"] == 1.0 == again["aggregator_degraded"]
    assert len([r for r in caplog.records if "aggregator_degraded" in r.getMessage()]) == 1  # warned once
    dist = ((x[:, None] - x[None]) ** 2).sum(axis=2) + np.diag([np.inf] * 4)
    assert int(metrics["krum_selected"]) == int(np.argmin(dist.min(axis=1)))
    # Multi-Krum: keep is capped at n - f when drops leave fewer clients
    _, metrics = MultiKrum(f=1, keep=5).combine(*single(x))
    assert metrics == {"multikrum_kept": 3.0, "aggregator_degraded": 1.0}
    # two clients tie (each is the other's only neighbour): the lower row wins
    _, metrics = Krum(f=3).combine(*single(x[:2]))
    assert metrics["krum_selected"] == 0.0


def test_bad_stacks_are_value_errors():
    with pytest.raises(ValueError, match="row counts"):
        Median().combine({"a": np.zeros((3, 2)), "b": np.zeros((2, 2))}, {"a": np.ones(3), "b": np.ones(2)})
    with pytest.raises(ValueError, match="finite and >= 0"):
        Mean().combine(*single(np.zeros((2, 2)), [1.0, -1.0]))
    with pytest.raises(ValueError, match="sum to 0"):
        Mean().combine(*single(np.zeros((2, 2)), [0.0, 0.0]))
    with pytest.raises(ValueError, match="same things"):
        Mean().combine({"model": np.zeros((2, 2))}, {"h": np.ones(2)})


# --- knobs and check() --------------------------------------------------------------------------------------


def test_krum_check_messages():
    Krum(f=3).check(10)
    with pytest.raises(ConfigError) as err:
        Krum(f=4).check(10)
    assert str(err.value) == (
        "aggregator.f=4: Krum needs clients.per_round > 2f+2 (10 > 10 is false); "
        "use aggregator.f <= 3 or more clients per round"
    )
    with pytest.raises(ConfigError, match=r"^aggregator\.f=1: Krum needs .* use clients\.per_round >= 5$"):
        Krum(f=1).check(2)
    with pytest.raises(ConfigError, match=r"^aggregator\.f=2: Multi-Krum needs clients\.per_round > 2f\+2"):
        MultiKrum(f=2).check(6)
    MultiKrum(f=2, keep=8).check(10)
    with pytest.raises(ConfigError) as err:
        MultiKrum(f=2, keep=9).check(10)
    assert str(err.value) == (
        "aggregator.keep=9: Multi-Krum keeps at most clients.per_round - f = 8 clients (10 - 2); "
        "use aggregator.keep <= 8 or null"
    )
    assert "\n" not in str(err.value)


def test_other_checks_accept_any_cohort(caplog):
    for rule in (Mean(), Median(), RFA(), TrimmedMean(beta=0.49)):
        rule.check(1)
    with caplog.at_level(logging.WARNING, logger="raypfl.aggregators.trimmed_mean"):
        TrimmedMean(beta=0.1).check(4)  # floor(0.4) = 0: a warning, not an error
    assert "aggregator.beta=0.1 trims nothing" in caplog.text


@pytest.mark.parametrize("name", list(AGGREGATORS))
def test_conf_files_build_the_defaults(name):
    node = OmegaConf.load(CONF_DIR / "aggregator" / f"{name}.yaml")
    rule = build_aggregator(node, per_round=10)
    assert type(rule) is AGGREGATORS[name] and rule == AGGREGATORS[name]()
    assert node.name == name


BAD_KNOBS = [
    ({"name": "trimmed_mean", "beta": 0.5}, r"aggregator\.beta=0\.5 must be in \[0, 0\.5\)"),
    ({"name": "trimmed_mean", "beta": "abc"}, r"aggregator\.beta=abc must be a finite number"),
    ({"name": "krum", "f": -1}, r"aggregator\.f=-1 must be an integer >= 0"),
    ({"name": "krum", "f": 1.5}, r"aggregator\.f=1\.5 must be an integer"),
    ({"name": "multikrum", "keep": 0}, r"aggregator\.keep=0 must be an integer >= 1 .*\(or null: n - f"),
    ({"name": "rfa", "passes": 0}, r"aggregator\.passes=0 must be an integer >= 1"),
    ({"name": "rfa", "smoothing": 0}, r"aggregator\.smoothing=0 must be > 0"),
    ({"name": "krum", "beta": 0.1}, r"unknown key aggregator\.beta for aggregator=krum \(its knobs: f\)"),
    ({"name": "median", "f": 1}, r"unknown key aggregator\.f for aggregator=median \(its knobs: none\)"),
    ({"name": "bulyan"}, r"unknown aggregator=bulyan \(choose from: mean, median, trimmed_mean, krum"),
    ({"name": "krum", "f": 4}, r"aggregator\.f=4: Krum needs clients\.per_round > 2f\+2 \(10 > 10"),
    (
        {"name": "mean", "_target_": "no_such_pkg.Rule"},
        r"aggregator\._target_=no_such_pkg\.Rule: cannot import",
    ),
    (
        {"name": "mean", "_target_": "raypfl.errors.ConfigError"},
        r"aggregator\._target_=raypfl\.errors\.ConfigError is not a raypfl\.aggregators\.Aggregator subclass",
    ),
    (
        {"name": "krum", "_target_": "raypfl.aggregators.median.Median", "f": 1},
        r"unknown key aggregator\.f for aggregator=raypfl\.aggregators\.median\.Median "
        r"\(its knobs: none; aggregator\.f is krum's: start from aggregator=mean\)",
    ),
]


@pytest.mark.parametrize(("node", "message"), BAD_KNOBS)
def test_bad_config_is_one_line_naming_the_key(node, message):
    with pytest.raises(ConfigError, match="^" + message) as err:
        build_aggregator(OmegaConf.create(node), per_round=10)
    assert "\n" not in str(err.value)


def test_build_aggregator_targets_and_defaults():
    assert build_aggregator(None) == Mean() and build_aggregator({}) == Mean()
    rule = build_aggregator({"name": "mean", "_target_": "raypfl.aggregators.rfa.RFA", "passes": 3})
    assert rule == RFA(passes=3)
    rule = build_aggregator(OmegaConf.create({"name": "multikrum", "f": 2, "keep": None, "_target_": None}))
    assert rule == MultiKrum(f=2, keep=None)
    assert build_aggregator({"name": "trimmed_mean", "beta": 0}) == TrimmedMean(beta=0)  # an int is a number
    with pytest.raises(ConfigError, match=r"does not implement combine"):
        build_aggregator({"_target_": "raypfl.aggregators.base.Aggregator"})
    assert issubclass(AGGREGATORS["rfa"], Aggregator)
