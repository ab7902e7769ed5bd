"""Update postprocessors: clip, top-k with error feedback, stochastic quantization, local and central
Gaussian noise, the pipelines' seeding and state, and the order check. Pure numpy, fast."""

from __future__ import annotations

import math

import numpy as np
import pytest

from raypfl import seeding
from raypfl.algorithms.aggregate import MODEL, Aggregate, ClientUpdate
from raypfl.errors import ConfigError
from raypfl.postprocess import (
    CLIENT_STEPS,
    SERVER_STEPS,
    STEPS,
    CentralGaussian,
    ClientPipeline,
    Clip,
    LocalGaussian,
    ServerPipeline,
    StochasticQuantize,
    TopK,
    Wire,
    build_pipelines,
    check_order,
    join_state,
    knob_names,
    split_state,
)

SEED = 1234


def update(vector: np.ndarray, client: int = 3, **others: np.ndarray) -> ClientUpdate:
    statistics = {MODEL: np.asarray(vector, np.float32), **others}
    return ClientUpdate(client, statistics, {name: 1.0 for name in statistics})


def gaussian(d: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=d) * scale).astype(np.float32)


# --- registry and wire --------------------------------------------------------------------------------


def test_registry_and_wire_size() -> None:
    assert STEPS == ("clip", "topk", "quantize", "local_dp", "central_dp")
    assert set(CLIENT_STEPS) == {"clip", "topk", "quantize", "local_dp"}
    assert set(SERVER_STEPS) == {"central_dp"}
    assert knob_names(LocalGaussian) == ["multiplier"]  # bound comes from clip
    assert Wire(1000).nbytes() == 4000
    assert Wire(1001, bits=4, index_bytes=3, header_bytes=16).nbytes() == 3 + 16 + 501


# --- clip ---------------------------------------------------------------------------------------------


def test_clip_bounds_the_norm_and_keeps_the_direction() -> None:
    v = gaussian(500, scale=3.0)
    norm = float(np.linalg.norm(v.astype(np.float64)))
    out, wire, state, metrics = Clip(bound=0.5).apply(v, Wire(v.size), None, np.random.default_rng(0))
    assert out.dtype == np.float32 and state is None and wire.nbytes() == 2000
    assert np.linalg.norm(out.astype(np.float64)) <= 0.5 * (1 + 1e-6)
    assert np.linalg.norm(out.astype(np.float64)) == pytest.approx(0.5, rel=1e-6)
    np.testing.assert_allclose(out, v * (0.5 / norm), rtol=1e-6)  # same direction, scaled down
    assert metrics == {"update_norm": pytest.approx(norm), "clipped": 1.0}


def test_clip_leaves_a_short_update_unchanged() -> None:
    v = gaussian(500, scale=0.01)
    out, _, _, metrics = Clip(bound=1.0).apply(v, Wire(v.size), None, np.random.default_rng(0))
    np.testing.assert_array_equal(out, v)
    assert metrics["clipped"] == 0.0 and metrics["update_norm"] < 1.0


# --- top-k --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fraction", "d", "k"),
    [(0.01, 1000, 10), (0.015, 1000, 15), (0.0011, 1000, 2), (0.07, 100, 7), (1e-9, 50, 1), (1.0, 50, 50)],
)
def test_topk_keeps_ceil_fraction_d(fraction: float, d: int, k: int) -> None:
    v = gaussian(d, seed=1)
    out, wire, _, _ = TopK(fraction, error_feedback=False).apply(v, Wire(d), None, np.random.default_rng(0))
    assert np.count_nonzero(out) == k == wire.values
    kept = np.flatnonzero(out)
    assert np.abs(v[kept]).min() >= np.abs(np.delete(v, kept)).max(initial=0.0)
    np.testing.assert_array_equal(out[kept], v[kept])


def test_topk_wire_bytes_indices_or_bitmap() -> None:
    d = 1000
    _, wire, _, _ = TopK(0.01, error_feedback=False).apply(gaussian(d), Wire(d), None, None)
    assert (wire.index_bytes, wire.nbytes()) == (40, 8 * 10)  # 4-byte values + 4-byte indices: 8k
    _, wire, _, _ = TopK(0.5, error_feedback=False).apply(gaussian(d), Wire(d), None, None)
    assert (wire.index_bytes, wire.nbytes()) == (125, 125 + 4 * 500)  # the d-bit bitmap is smaller


def test_topk_ties_go_to_the_lowest_indices() -> None:
    v = np.array([1, -2, 2, 2, 0, -2, 1], np.float32)
    out, wire, _, _ = TopK(3 / 7, error_feedback=False).apply(v, Wire(v.size), None, None)
    np.testing.assert_array_equal(wire.support, [1, 2, 3])
    np.testing.assert_array_equal(out, [0, -2, 2, 2, 0, 0, 0])


def test_topk_error_feedback_memory_invariant() -> None:
    d, pipeline = 400, ClientPipeline([TopK(0.05)])
    assert pipeline.stateful
    stored, raw_sum, sent_sum = None, np.zeros(d), np.zeros(d)
    for round_idx in range(5):
        raw = gaussian(d, seed=round_idx)
        _, post = split_state(stored)
        out, post, nbytes, metrics = pipeline.apply(update(raw), post, SEED, round_idx, 3)
        stored = join_state({"personal": np.ones(2)}, post)
        raw_sum += raw
        sent_sum += out.statistics[MODEL]
        assert np.count_nonzero(out.statistics[MODEL]) == 20 and nbytes == 4 * 20 + 50  # d/8 bitmap < 4k
        assert metrics["residual_norm"] > 0
    residual = split_state(stored)[1]["topk"]
    assert residual.dtype == np.float32 and residual.shape == (d,)
    np.testing.assert_allclose(sent_sum + residual, raw_sum, atol=1e-5)


def test_topk_without_error_feedback_is_stateless() -> None:
    pipeline = ClientPipeline([Clip(), TopK(0.1, error_feedback=False)])
    assert not pipeline.stateful and not TopK(error_feedback=False).may_raise_norm
    _, state, _, _ = pipeline.apply(update(gaussian(100)), None, SEED, 0, 0)
    assert state is None


# --- quantize -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_values_lie_on_each_buckets_grid(bits: int) -> None:
    d, bucket, levels = 1000, 256, (1 << bits) - 1
    v = gaussian(d, seed=2)
    out, wire, _, _ = StochasticQuantize(bits, bucket).apply(v, Wire(d), None, np.random.default_rng(5))
    assert out.dtype == np.float32 and wire.bits == bits and wire.header_bytes == 8 * 4
    for start in range(0, d, bucket):
        x, q = v[start : start + bucket].astype(np.float64), out[start : start + bucket].astype(np.float64)
        lo, step = np.float32(x.min()), np.float32((x.max() - x.min()) / levels)
        level = (q - lo) / step
        np.testing.assert_allclose(level, np.round(level), atol=1e-3)  # on the grid
        assert level.min() > -1e-3 and level.max() < levels + 1e-3
        assert np.abs(q - x).max() <= float(step) * (1 + 1e-3)  # rounded to a neighbouring level


def test_quantize_is_unbiased() -> None:
    # 4,000 buckets, each a copy of x: 4,000 independent roundings of every coordinate on the same grid
    x = np.array([-1.0, -0.3, 0.05, 0.1234, 0.5, 0.77, 0.9, 1.0], np.float32)
    draws, step = 4000, float(np.float32(2.0 / 15))
    q = StochasticQuantize(bits=4, bucket=x.size)
    rng = seeding.rng(SEED, seeding.POSTPROCESS, 0, 0, 0)
    out, _, _, _ = q.apply(np.tile(x, draws), Wire(x.size * draws), None, rng)
    mean = out.reshape(draws, x.size).astype(np.float64).mean(axis=0)
    frac = (x.astype(np.float64) + 1.0) / step % 1.0
    sigma = step * np.sqrt(frac * (1 - frac) / draws)  # std of the mean of Bernoulli roundings
    assert np.all(np.abs(mean - x) <= 4 * sigma + 1e-6)
    assert np.all(np.abs(mean - x)[(frac > 0.01) & (frac < 0.99)] > 0)  # they were rounded at random


def test_quantize_wire_bytes() -> None:
    d = 1000
    for bits, expected in [(8, 1016), (4, 516)]:  # ceil(1000 * bits / 8) + 2 buckets x 8 header bytes
        pipeline = ClientPipeline([StochasticQuantize(bits, 512)])
        _, _, nbytes, _ = pipeline.apply(update(gaussian(d)), None, SEED, 0, 0)
        assert nbytes == expected


def test_quantize_bits_are_8_or_4() -> None:
    with pytest.raises(ConfigError, match=r"^quantize.bits=5 must be 8 or 4$"):
        StochasticQuantize(bits=5)


def test_quantize_draws_are_keyed_on_seed_round_client() -> None:
    pipeline, u = ClientPipeline([StochasticQuantize(4, 64)]), update(gaussian(300))
    first = pipeline.apply(u, None, SEED, 2, 7)[0].statistics[MODEL]
    again = pipeline.apply(u, None, SEED, 2, 7)[0].statistics[MODEL]
    assert first.tobytes() == again.tobytes()
    for other in [(SEED, 3, 7), (SEED, 2, 8), (SEED + 1, 2, 7)]:
        assert pipeline.apply(u, None, *other)[0].statistics[MODEL].tobytes() != first.tobytes()


def test_topk_then_quantize_encodes_only_the_kept_values() -> None:
    d = 1000
    v = gaussian(d, seed=4)
    pipeline = ClientPipeline([TopK(0.01, error_feedback=False), StochasticQuantize(8, 512)])
    out, _, nbytes, _ = pipeline.apply(update(v), None, SEED, 0, 0)
    kept = np.sort(np.argsort(-np.abs(v))[:10])
    sent = out.statistics[MODEL]
    assert set(np.flatnonzero(sent)) <= set(kept)
    assert nbytes == 10 + 40 + 8  # 10 values at 8 bits, 40 index bytes, one bucket's header
    step = (np.abs(v[kept]).max() * 2) / 255
    assert np.abs(sent[kept] - v[kept]).max() <= step  # quantized on the kept values' range, not all d


# --- local DP -----------------------------------------------------------------------------------------


def test_local_gaussian_std() -> None:
    (pipeline, _) = build_pipelines(["clip", "local_dp"], {"clip": Clip(0.5), "local_dp": LocalGaussian(2.0)})
    step = pipeline.steps[1]
    assert isinstance(step, LocalGaussian) and step.bound == 0.5 and step.std == 1.0
    out, _, _, metrics = pipeline.apply(update(np.zeros(1_000_000)), None, SEED, 0, 0)
    assert np.std(out.statistics[MODEL].astype(np.float64)) == pytest.approx(1.0, rel=0.01)
    assert metrics["local_dp_noise_std"] == 1.0


def test_local_gaussian_needs_its_bound() -> None:
    with pytest.raises(ValueError, match="clip.bound"):
        LocalGaussian(1.0).apply(np.zeros(3, np.float32), Wire(3), None, np.random.default_rng(0))


# --- central DP ---------------------------------------------------------------------------------------


def aggregate_of(vectors: list[np.ndarray], first: int = 0) -> Aggregate:
    agg = Aggregate()
    for i, v in enumerate(vectors):
        agg.add(update(v, client=first + i))
    return agg


def test_central_gaussian_noise_std_of_the_mean() -> None:
    z, bound, m, cohort = 1.1, 0.7, 10, 1000
    step = CentralGaussian(z, bound, m, cohort)
    agg = aggregate_of([gaussian(200_000, seed=i, scale=0.001) for i in range(m)])
    released, metrics = ServerPipeline([step]).apply(agg, SEED, 4)
    noise = released.mean() - agg.totals[MODEL] / m
    assert np.std(noise) == pytest.approx(z * bound / cohort, rel=0.01)
    assert metrics == {"dp_noise_std": pytest.approx(z * bound / cohort)}
    assert released.weights[MODEL] == m and released.totals[MODEL].dtype == np.float64


def test_central_gaussian_keeps_the_denominator_m_when_clients_drop() -> None:
    vectors = [gaussian(50, seed=i) for i in range(8)]  # 2 of m=10 dropped
    agg = aggregate_of(vectors)
    before = agg.totals[MODEL].copy()
    released, _ = CentralGaussian(0.0, 1.0, per_round=10).apply(agg, np.random.default_rng(0))
    np.testing.assert_allclose(released.mean(), np.sum(vectors, axis=0, dtype=np.float64) / 10, atol=1e-12)
    assert released.clients == agg.clients and agg.weights[MODEL] == 8  # the input is unchanged
    np.testing.assert_array_equal(agg.totals[MODEL], before)


def test_central_gaussian_noise_is_keyed_on_the_version() -> None:
    pipeline = ServerPipeline([CentralGaussian(1.0, 1.0, per_round=4)])
    agg = aggregate_of([gaussian(100, seed=i) for i in range(4)])
    noise = {v: pipeline.apply(agg, SEED, v)[0].totals[MODEL] - agg.totals[MODEL] for v in (3, 3, 4)}
    same = pipeline.apply(agg, SEED, 3)[0].totals[MODEL]
    assert same.tobytes() == pipeline.apply(agg, SEED, 3)[0].totals[MODEL].tobytes()
    assert not np.allclose(noise[3], noise[4])


def test_central_gaussian_does_not_depend_on_how_partials_split() -> None:
    vectors = [gaussian(100, seed=i) for i in range(6)]
    pipeline = ServerPipeline([CentralGaussian(1.0, 1.0, per_round=6)])
    results = []
    for cuts in ([6], [2, 6], [1, 3, 6]):
        merged, start = Aggregate(), 0
        for end in cuts:
            merged.merge(aggregate_of(vectors[start:end], first=start))
            start = end
        released, _ = pipeline.apply(merged, SEED, 9)
        assert sorted(merged.clients) == list(range(6))
        results.append((released.totals[MODEL] - merged.totals[MODEL], released.mean()))
    for noise, model in results[1:]:
        np.testing.assert_allclose(noise, results[0][0], atol=1e-12)
        np.testing.assert_allclose(model, results[0][1], atol=1e-12)


def test_central_gaussian_leaves_an_empty_round_alone_and_needs_unit_weights() -> None:
    empty = Aggregate()
    assert ServerPipeline([CentralGaussian(1.0, 1.0, 10)]).apply(empty, SEED, 0) == (empty, {})
    agg = Aggregate()
    agg.add(ClientUpdate(0, {MODEL: np.ones(3, np.float32)}, {MODEL: 25.0}))
    with pytest.raises(ValueError, match="weighting=uniform"):
        CentralGaussian(1.0, 1.0, 10).apply(agg, np.random.default_rng(0))


# --- pipeline and state -------------------------------------------------------------------------------


def test_pipeline_passes_other_statistics_and_does_not_mutate_its_input() -> None:
    model, control = gaussian(1000, scale=1.0), gaussian(30)
    u = update(model, control=control)
    keep = model.copy()
    pipeline = ClientPipeline([Clip(1.0), TopK(0.01), StochasticQuantize(8, 512)])
    out, state, nbytes, metrics = pipeline.apply(u, None, SEED, 1, 3)
    assert out is not u and out.statistics["control"] is control and out.weights == u.weights
    np.testing.assert_array_equal(u.statistics[MODEL], keep)
    assert set(state) == {"topk"} and set(metrics) == {"update_norm", "clipped", "residual_norm"}
    assert nbytes == (10 + 40 + 8) + 4 * 30  # the model on the wire, `control` dense float32
    assert np.linalg.norm(out.statistics[MODEL]) <= 1.0 + 1e-2


def test_pipeline_passes_a_non_finite_update_through() -> None:
    v = gaussian(100)
    v[5] = np.nan
    old = {"topk": np.ones(100, np.float32)}
    out, state, nbytes, metrics = ClientPipeline([Clip(), TopK(0.1)]).apply(update(v), old, SEED, 0, 0)
    assert np.isnan(out.statistics[MODEL][5]) and not out.finite()
    assert state["topk"] is old["topk"] and nbytes == 400 and metrics == {}


def test_empty_server_pipeline_is_the_identity() -> None:
    agg = aggregate_of([gaussian(10)])
    assert ServerPipeline().apply(agg, SEED, 0) == (agg, {})


def test_state_join_and_split_round_trip() -> None:
    algorithm = {"control": np.arange(3.0)}
    post = {"topk": np.ones(4, np.float32)}
    stored = join_state(algorithm, post)
    assert type(stored) is dict and stored["__raypfl_post__"] == 1
    got_algorithm, got_post = split_state(stored)
    assert got_algorithm is algorithm and set(got_post) == {"topk"}
    np.testing.assert_array_equal(got_post["topk"], post["topk"])
    assert join_state(algorithm, None) is algorithm
    assert split_state(algorithm) == (algorithm, None)
    assert split_state(None) == (None, None)
    assert split_state(join_state(None, {})) == (None, {})
    lookalike = {"__raypfl_post__": 1, "algorithm": 3}  # not all three keys: an algorithm's own dict
    assert split_state(lookalike) == (lookalike, None)


# --- order ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (
            ["foo"],
            "postprocess=[foo]: unknown step foo (choose from: clip, topk, quantize, local_dp, central_dp)",
        ),
        (["central_dp"], "postprocess=[central_dp] adds noise calibrated to clip.bound: put clip before it"),
        (
            ["clip", "quantize", "central_dp"],
            "postprocess=[clip, quantize, central_dp]: quantize after clip can raise an update's norm above "
            "clip.bound=1.0; put it before clip",
        ),
        (
            ["clip", "topk", "central_dp"],
            "postprocess=[clip, topk, central_dp]: topk after clip can raise an update's norm above "
            "clip.bound=1.0; put it before clip (or set topk.error_feedback=false)",
        ),
        (
            ["clip", "quantize", "local_dp"],
            "postprocess=[clip, quantize, local_dp]: quantize after clip can raise an update's norm above "
            "clip.bound=1.0; put it before clip",
        ),
        (
            ["local_dp"],
            "postprocess=[local_dp]: local_dp needs clip before it (its noise is scaled to clip.bound)",
        ),
        (
            ["local_dp", "clip"],
            "postprocess=[local_dp, clip]: local_dp needs clip before it (its noise is scaled to clip.bound)",
        ),
        (
            ["clip", "local_dp", "central_dp"],
            "postprocess=[clip, local_dp, central_dp]: local_dp after clip raises an update's norm above "
            "clip.bound=1.0, which central_dp's noise is calibrated to; use one of local_dp and central_dp",
        ),
        (
            ["central_dp", "clip"],
            "postprocess=[central_dp, clip]: central_dp is a server step (it acts on the round's aggregate): "
            "put it after the client steps (clip)",
        ),
        (
            ["clip", "topk", "clip"],
            "postprocess=[clip, topk, clip]: clip is listed twice (each step runs once)",
        ),
    ],
)
def test_check_order_refuses(names: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_order(names, {})
    assert str(info.value) == message


@pytest.mark.parametrize(
    "names",
    [
        [],
        ["clip", "quantize"],  # plain compression: nothing is calibrated to clip.bound
        ["clip", "topk", "quantize"],
        ["topk", "quantize", "clip", "central_dp"],
        ["clip", "local_dp", "topk", "quantize"],  # after local noise: post-processing
        ["quantize", "clip", "local_dp"],
    ],
)
def test_check_order_accepts(names: list[str]) -> None:
    check_order(names, {})


def test_check_order_reads_the_configured_steps() -> None:
    check_order(["clip", "topk", "central_dp"], {"topk": TopK(0.1, error_feedback=False)})
    with pytest.raises(ConfigError, match=r"clip.bound=0.25; put it before clip$"):
        check_order(["clip", "quantize", "central_dp"], {"clip": Clip(0.25)})


def test_build_pipelines_orders_steps_and_checks_the_central_bound() -> None:
    central = CentralGaussian(1.0, 0.5, per_round=10)
    client, server = build_pipelines(
        ["topk", "clip", "central_dp"],
        {"clip": Clip(0.5), "topk": TopK(0.1, error_feedback=False)},
        {"central_dp": central},
    )
    assert [s.name for s in client.steps] == ["topk", "clip"] and server.steps == [central]
    with pytest.raises(ValueError, match="differs from clip.bound"):
        build_pipelines(["clip", "central_dp"], {"clip": Clip(1.0)}, {"central_dp": central})
    with pytest.raises(ValueError, match="not built"):
        build_pipelines(["clip", "central_dp"], {"clip": Clip(0.5)})
    assert math.isclose(central.mean_std, 0.05) and math.isclose(central.sum_std, 0.5)
