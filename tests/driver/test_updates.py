"""The update pipeline's config (issue 16): every bad combination is one line naming the key, before
anything starts; the pieces the driver builds from a good one."""

from __future__ import annotations

import pytest

from raypfl.driver.updates import build_updates
from raypfl.errors import ConfigError
from raypfl.validation import validate
from tests.conftest import SMALL_RUN, make_config

B = [*SMALL_RUN, "train.rounds=1", "clients.per_round=4"]
#: DP-FedAvg as it should be configured.
DP = [
    *B,
    "algorithm.weighting=uniform",
    "clients.selection=poisson",
    "postprocess=[clip,central_dp]",
    "privacy.noise_multiplier=1.0",
]

BAD = [
    # the list
    ([*B, "postprocess=[clip]", "clip.bound=0"], "clip.bound=0 must be > 0"),
    ([*B, "postprocess=[clip]", "clip.bound=-1"], "clip.bound=-1 must be > 0"),
    ([*DP[:-1], "privacy.epsilon=0"], "privacy.epsilon=0 must be > 0"),
    ([*DP[:-1], "privacy.epsilon=-2"], "privacy.epsilon=-2 must be > 0"),
    ([*DP, "privacy.delta=0"], "privacy.delta=0 must be in (0, 1)"),
    ([*DP, "privacy.delta=1"], "privacy.delta=1 must be in (0, 1)"),
    ([*B, "aggregator=trimmed_mean", "aggregator.beta=0.5"], "aggregator.beta=0.5 must be in [0, 0.5)"),
    ([*B, "aggregator=krum", "aggregator.f=1"], "aggregator.f=1: Krum needs clients.per_round > 2f+2"),
    (
        [*B, "aggregator=multikrum", "aggregator.f=1"],
        "aggregator.f=1: Multi-Krum needs clients.per_round > 2f+2",
    ),
    (
        [*DP, "algorithm.weighting=samples"],
        "central_dp: algorithm.weighting=samples lets one client move the mean by more than clip.bound/m",
    ),
    # and the rest of the pipeline's rules
    ([*DP, "postprocess=[central_dp]"], "postprocess=[central_dp] adds noise calibrated to clip.bound"),
    (
        [*DP, "postprocess=[clip,quantize,central_dp]"],
        "postprocess=[clip, quantize, central_dp]: quantize after clip can raise",
    ),
    ([*B, "postprocess=[zip]"], "postprocess=[zip]: unknown step zip"),
    ([*B, "postprocess=[clip,clip]"], "postprocess=[clip, clip]"),
    ([*B, "postprocess=[topk]", "topk.fraction=0"], "topk.fraction=0 must be in (0, 1]"),
    ([*B, "postprocess=[quantize]", "quantize.bits=5"], "quantize.bits=5 must be 8 or 4"),
    ([*B, "postprocess=[clip,local_dp]", "+local_dp.bound=3"], "unknown key local_dp.bound"),
    ([*DP, "privacy.epsilon=2"], "privacy: set exactly one of privacy.epsilon"),
    ([*DP[:-1]], "privacy: set exactly one of privacy.epsilon"),
    ([*DP, "clients.selection=fixed"], "central_dp: clients.selection=fixed samples the cohort once"),
    ([*DP, "clients.selection=random", "privacy.accountant=pld"], "privacy.accountant=pld has no event"),
    ([*DP, "algorithm=scaffold"], "central_dp: algorithm=scaffold also sends control, which clip"),
    ([*DP, "algorithm=fednova"], "central_dp: algorithm=fednova also sends tau, which clip"),
    ([*B, "algorithm=qffl", *DP[len(B) + 1 :]], "central_dp: algorithm=qffl has no algorithm.weighting"),
    ([*DP, "aggregator=median"], "central_dp: aggregator=median has no clip.bound/m sensitivity"),
    ([*DP, "privacy.noise_cohort_size=2"], "privacy.noise_cohort_size=2 < clients.per_round=4"),
    ([*DP, "privacy.population=5"], "privacy.population=5 < clients.num=10"),
    ([*DP, "faults.evict_after=2"], "central_dp: faults.evict_after changes the population"),
    ([*B, "privacy.noise_multiplier=1"], "privacy.noise_multiplier is set but postprocess has no central_dp"),
    ([*B, "attack.kind=sign_flip"], "attack.kind=sign_flip with attack.fraction=0.0: set both"),
    ([*B, "attack.fraction=0.2"], "attack.kind=none with attack.fraction=0.2: set both"),
    ([*B, "attack.kind=bitflip", "attack.fraction=0.2"], "attack.kind=bitflip must be one of"),
    ([*B, "attack.fraction=1", "attack.kind=scaled"], "attack.fraction=1 must be in [0, 1)"),
    ([*B, "clients.selection=lottery"], "clients.selection=lottery must be one of random, fixed, poisson"),
]


@pytest.mark.parametrize(("overrides", "expected"), BAD, ids=[m[:40] for _, m in BAD])
def test_bad_pipeline_is_one_line_naming_the_key(overrides, expected):
    with pytest.raises(ConfigError) as err:
        validate(make_config(*overrides))
    message = str(err.value)
    assert message.startswith(expected), message
    assert "\n" not in message


@pytest.mark.parametrize(
    "overrides",
    [
        DP,
        [*DP, "clients.selection=random"],  # RDP has fixed-size sampling without replacement
        [*DP, "privacy.accountant=pld"],
        [*DP, "algorithm=fedadam"],
        [*B, "postprocess=[topk,quantize]", "topk.fraction=0.1", "quantize.bits=4"],
        [*B, "postprocess=[clip,quantize]"],  # without DP noise, quantize after clip is only compression
        [*B, "postprocess=[clip,local_dp]", "local_dp.multiplier=0.5"],
        [*B, "aggregator=krum", "clients.per_round=5"],  # 5 > 2*1 + 2
        [*B, "aggregator=rfa", "attack.kind=gaussian", "attack.fraction=0.3"],
        [*B, "attack.kind=label_flip", "attack.fraction=0.2"],
    ],
)
def test_good_pipelines_pass(overrides):
    validate(make_config(*overrides))


def test_build_calibrates_the_noise_or_reuses_a_resumed_one():
    cfg = make_config(*DP[:-1], "privacy.epsilon=4", "train.rounds=10")
    spec = validate(cfg)
    from raypfl.algorithms import build_algorithm

    updates = build_updates(cfg, spec, build_algorithm(cfg, spec), 10)
    z = updates.noise_multiplier
    assert z > 0 and updates.accountant.epsilon(z, 10) <= 4.0
    assert updates.accountant.epsilon(z * 0.95, 10) > 4.0  # calibrated, not merely safe
    step = updates.finalize.server_steps.steps[0]
    assert (step.noise_multiplier, step.bound, step.per_round) == (z, 1.0, 4)
    resumed = build_updates(cfg, spec, build_algorithm(cfg, spec), 10, noise_multiplier=1.234)
    assert resumed.noise_multiplier == 1.234  # a resumed run adds the noise its checkpoint was made with


def test_local_dp_takes_its_scale_from_clip():
    cfg = make_config(*B, "postprocess=[clip,local_dp]", "clip.bound=0.3", "local_dp.multiplier=2")
    spec = validate(cfg)
    from raypfl.algorithms import build_algorithm

    updates = build_updates(cfg, spec, build_algorithm(cfg, spec), 10)
    clip, noise = updates.client.steps
    assert (clip.bound, noise.bound, noise.std) == (0.3, 0.3, pytest.approx(0.6))
    assert updates.finalize is None and updates.accountant is None


@pytest.mark.parametrize(
    "change",
    ["aggregator=median", "postprocess=[clip]", "attack.kind=scaled", "privacy.noise_multiplier=2.0"],
)
def test_a_resume_under_another_pipeline_is_refused(change):
    from omegaconf import OmegaConf

    from raypfl.jobs.checkpoint import check_compatible, fingerprint

    def printed(*overrides):
        return fingerprint(OmegaConf.to_container(make_config(*overrides), resolve=True))

    base = [*DP, "attack.kind=sign_flip", "attack.fraction=0.1"]
    saved = printed(*base)
    check_compatible(saved, printed(*base, "train.rounds=9"), "run")  # more rounds: fine
    with pytest.raises(ConfigError, match="^resume=run: the checkpoint was made with"):
        check_compatible(saved, printed(*base, change), "run")
