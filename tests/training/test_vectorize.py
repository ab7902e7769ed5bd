"""runtime.vectorize=true: lock-step clients run the plain path's algorithm.

What is claimed, and why it holds on every CPU (Intel Xeon and AMD EPYC sum floats in different orders):

1. In float64 the lock-step path equals the plain path after one local epoch (10 to 43 steps) to <= 1e-10
   (measured on an AMD EPYC: 6e-17 to 3e-15). Same algorithm, different summation order: rounding starts at
   ~1e-16 and training amplifies it slowly (x100 in 40 steps here), leaving a million-fold margin; over
   ~120 steps it reaches 1e-10, which is why the test stops at one epoch.
2. In float32, after ONE step the update differs by at most 1e-3 of its own size. The kernels sum the same
   terms in another order (vmap turns a conv into a grouped conv whose weight gradient sums over batch x
   pixels differently; the stacked-conv path (raypfl/training/stacked_conv.py) runs channels-last oneDNN
   convolutions, the first conv's weight gradient as a GEMM over batch x pixels and the Linear layers in
   column tiles); a reordered float32 sum of N terms moves by at most ~N * 6e-8 of the terms' magnitudes,
   whatever the order a CPU's kernels pick, and N <= 20 x 28 x 28 = 15,680 here gives ~1e-3 (measured on
   an AMD EPYC: ~1e-6 for every path).
3. Over many float32 steps NO such bound exists: a 1-ulp difference flips a max-pool or ReLU choice
   sooner or later, and SGD amplifies it (tiny_cnn, 10 steps: lock-step vs plain 3e-3 on an AMD EPYC, and
   the plain float32 path is itself 2.5e-3 from float64). So multi-round runs are compared on what a user
   sees: the same cohorts, steps and samples, and accuracy within a point.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raypfl.config import OptimSpec, TrainSpec
from raypfl.data.load import load_data
from raypfl.driver.experiment import build_setup, run_experiment
from raypfl.errors import ConfigError
from raypfl.models.io import initial_weights
from raypfl.models.weights import parameter_views
from raypfl.models.zoo import build_model
from raypfl.training.local import batches, make_optimizer, train_local
from raypfl.training.lockstep import ClientJob, train_lockstep
from tests.conftest import TINY, make_config

FLOAT64_BOUND = 1e-10  # claim 1
ONE_STEP_RELATIVE = 1e-3  # claim 2


@pytest.fixture(scope="module")
def mnist(data_root) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_data(make_config("dataset.train_limit=800", "dataset.test_limit=100"))
    return torch.as_tensor(data.train_x), torch.as_tensor(data.train_y).long()


def _plain_and_lockstep(mnist, model_name, dtype, train, optim, sizes, correction=None, momentum=None):
    """Each client trained alone (train_local) and all together (train_lockstep), from one start.

    `correction` (client -> flat vector) is added to that client's gradient at every step; `momentum`
    (client -> flat vector) is its momentum buffer on entry (`optim.persistent_state`)."""
    x, y = mnist[0].to(dtype), mnist[1]
    torch.manual_seed(0)
    model = build_model(model_name).to(dtype)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    offsets = np.cumsum([0, *sizes])
    parts = [np.arange(offsets[c], offsets[c + 1]) for c in range(len(sizes))]
    plain = []
    for c, part in enumerate(parts):
        alone = build_model(model_name).to(dtype)
        alone.load_state_dict(start, strict=False)
        optimizer = make_optimizer(alone.parameters(), optim)
        if momentum is not None:
            for p, buf in zip(alone.parameters(), parameter_views(alone, momentum[c])):
                optimizer.state[p]["momentum_buffer"] = buf.clone()
        adjust = None
        if correction is not None:
            pairs = list(zip(alone.parameters(), parameter_views(alone, correction[c])))

            def adjust(pairs=pairs):
                for p, v in pairs:
                    p.grad.add_(v)

        train_local(alone, optimizer, x, y, part, train, torch.Generator().manual_seed(c), adjust)
        plain.append(torch.cat([p.detach().flatten() for p in alone.parameters()]))
    jobs = [ClientJob(x, y, part, torch.Generator().manual_seed(c), train) for c, part in enumerate(parts)]
    stacked = {k: _stacked(model, k, correction) for k in start} if correction is not None else None
    buffers = {k: _stacked(model, k, momentum) for k in start} if momentum is not None else None
    stacked, results = train_lockstep(model, start, jobs, optim, correction=stacked, momentum=buffers)
    together = [torch.cat([stacked[k][c].flatten() for k in start]) for c in range(len(parts))]
    first = torch.cat([v.flatten() for v in start.values()])
    return torch.stack(plain).double(), torch.stack(together).double(), first.double(), results


def _stacked(model, name: str, flats: list[torch.Tensor]) -> torch.Tensor:
    """Parameter `name`'s slice of every client's flat vector, stacked on a client axis."""
    index = [k for k, _ in model.named_parameters()].index(name)
    return torch.stack([parameter_views(model, flat)[index].clone() for flat in flats])


PATHS = {
    "cnn-vmap": ("tiny_cnn", OptimSpec(lr=0.1, weight_decay=0.001), [200, 200, 200]),
    "cnn-stacked-sgd": ("tiny_cnn", OptimSpec(lr=0.1), [200, 200, 200]),
    "cnn2fc-stacked-sgd": ("cnn", OptimSpec(lr=0.05), [100, 100]),
    "uneven-masked-stacked": ("tiny_cnn", OptimSpec(lr=0.05), [40, 173, 300]),
    "mlp-vmap-momentum": ("mlp", OptimSpec(lr=0.1, momentum=0.9, weight_decay=0.001), [200, 200, 200]),
    "mlp-fused-sgd": ("mlp", OptimSpec(lr=0.1), [200, 200, 200]),
    "uneven-masked-vmap": ("tiny_cnn", OptimSpec(lr=0.05, momentum=0.9), [40, 173, 300]),
    "uneven-masked-fused": ("mlp", OptimSpec(lr=0.1), [40, 173, 300]),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_lockstep_equals_plain_in_float64(mnist, path):
    """Claim 1: the same algorithm (batches, masking, momentum, weight decay) on every path."""
    model_name, optim, sizes = PATHS[path]
    train = TrainSpec(batch_size=7 if "uneven" in path else 20, local_epochs=1)
    plain, together, start, results = _plain_and_lockstep(
        mnist, model_name, torch.float64, train, optim, sizes
    )
    assert (plain - together).abs().max().item() <= FLOAT64_BOUND
    assert (plain - start).abs().max().item() > 0.01  # trained, not left at the start
    assert [r.samples_seen for r in results] == sizes


@pytest.mark.parametrize("path", list(PATHS))
def test_lockstep_one_float32_step_is_within_the_reordering_bound(mnist, path):
    """Claim 2: one float32 step differs only by summation order."""
    model_name, optim, sizes = PATHS[path]
    train = TrainSpec(batch_size=20, local_steps=1)
    plain, together, start, _ = _plain_and_lockstep(mnist, model_name, torch.float32, train, optim, sizes)
    step = (plain - start).abs().max().item()
    assert step > 1e-4
    assert (plain - together).abs().max().item() <= ONE_STEP_RELATIVE * step


@pytest.mark.parametrize(
    "path, what",
    [
        ("cnn-vmap", "correction"),
        ("cnn2fc-stacked-sgd", "correction"),
        ("uneven-masked-stacked", "correction"),
        ("mlp-fused-sgd", "correction"),
        ("uneven-masked-fused", "correction"),
        ("uneven-masked-vmap", "momentum"),
        ("mlp-vmap-momentum", "momentum"),
    ],
)
def test_lockstep_carries_per_client_terms_like_plain_in_float64(mnist, path, what):
    """Claim 1 with what stateful algorithms bring: SCAFFOLD's per-client gradient correction c - c_i (on
    the autograd and the fused path, masked clients included) and momentum buffers carried in from earlier
    rounds (`optim.persistent_state`)."""
    model_name, optim, sizes = PATHS[path]
    train = TrainSpec(batch_size=7 if "uneven" in path else 20, local_epochs=1)
    size = sum(p.numel() for p in build_model(model_name).parameters())
    g = torch.Generator().manual_seed(5)
    terms = [0.05 * torch.randn(size, generator=g, dtype=torch.float64) for _ in sizes]
    kwargs = {what: terms}
    plain, together, start, _ = _plain_and_lockstep(
        mnist, model_name, torch.float64, train, optim, sizes, **kwargs
    )
    without, _, _, _ = _plain_and_lockstep(mnist, model_name, torch.float64, train, optim, sizes)
    assert (plain - together).abs().max().item() <= FLOAT64_BOUND
    assert (plain - without).abs().max().item() > 1e-3  # the term mattered


def test_optimizer_states_round_trip_in_torch_format():
    """Lock-step momentum goes out as torch.optim.SGD state_dicts the plain path loads, and comes back."""
    from raypfl.training.lockstep import optimizer_states, stack_optimizer_states

    model = build_model("mlp")
    optim = OptimSpec(lr=0.1, momentum=0.9)
    buffers = {k: torch.randn(3, *p.shape) for k, p in model.named_parameters()}
    states = optimizer_states(model, optim, buffers, 3)
    plain = make_optimizer(model.parameters(), optim)
    plain.load_state_dict(states[1])
    for name, p in model.named_parameters():
        assert torch.equal(plain.state[p]["momentum_buffer"], buffers[name][1])
    back = stack_optimizer_states(model, optim, [states[0], None, states[2]])
    assert torch.equal(back[name][2], buffers[name][2]) and not back[name][1].any()
    assert stack_optimizer_states(model, OptimSpec(lr=0.1), [None]) is None  # plain SGD keeps no buffer


@pytest.mark.parametrize(
    "model_name, optim, taken",
    [
        ("tiny_cnn", OptimSpec(lr=0.1), "stacked_step"),
        ("mlp", OptimSpec(lr=0.1), "_fused_linear_step"),
        ("tiny_cnn", OptimSpec(lr=0.1, momentum=0.9), None),
    ],
)
def test_each_path_is_taken_where_it_applies(mnist, monkeypatch, model_name, optim, taken):
    """Plain SGD on a conv stack takes the stacked-conv step, on a Linear stack the fused one; else vmap."""
    import raypfl.training.lockstep as lockstep

    calls = {"stacked_step": 0, "_fused_linear_step": 0}
    for name in calls:
        real = getattr(lockstep, name)
        monkeypatch.setattr(lockstep, name, lambda *a, _r=real, _n=name: calls.__setitem__(_n, 1) or _r(*a))
    x, y = mnist
    model = build_model(model_name)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    job = ClientJob(x, y, np.arange(40), torch.Generator().manual_seed(0), TrainSpec(batch_size=20))
    train_lockstep(model, start, [job, job], optim)
    assert calls == {k: int(k == taken) for k in calls}


def test_a_conv_model_whose_forward_is_not_its_module_order_takes_the_general_path(monkeypatch):
    """The stacked-conv step runs a model's leaf modules in order; a model that does more falls back."""
    import raypfl.training.lockstep as lockstep

    class Doubled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.relu = torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU()
            self.flat, self.fc = torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.flat(self.relu(self.conv(x)))) * 2.0

    monkeypatch.setattr(lockstep, "stacked_step", None)  # calling it would fail the test
    torch.manual_seed(0)
    model = Doubled()
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    spec = TrainSpec(batch_size=8)
    jobs = [ClientJob(x, y, np.arange(16), torch.Generator().manual_seed(1), spec)]
    stacked, _ = train_lockstep(model, start, jobs, OptimSpec(lr=0.1))
    alone = Doubled()
    alone.load_state_dict(start)
    train_local(alone, make_optimizer(alone.parameters(), OptimSpec(lr=0.1)), x, y, np.arange(16), spec,
                torch.Generator().manual_seed(1))  # fmt: skip
    for name, p in alone.named_parameters():
        assert torch.allclose(stacked[name][0], p.detach(), atol=1e-6)


def _both(tmp_path, *overrides: str):
    return [
        run_experiment(make_config(*TINY, *overrides, f"runtime.vectorize={vec}"), tmp_path / vec)
        for vec in ("false", "true")
    ]


def test_vectorized_run_after_one_step_matches_plain(data_root, tmp_path):
    """The runtime wiring (cohorts, seeds, weighting, aggregation) is the plain path's: claim 2 on a whole
    round of 4 clients of one local step each."""
    overrides = ("runtime=sequential", "model=tiny_cnn", "train.rounds=1", "train.local_steps=1")
    plain, vec = _both(tmp_path, *overrides)
    cfg = make_config(*TINY, *overrides)
    start = initial_weights("tiny_cnn", load_data(cfg), int(cfg.seed))
    step = np.abs(plain.weights - start).max()
    assert step > 1e-4
    assert np.abs(plain.weights - vec.weights).max() <= ONE_STEP_RELATIVE * step


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        ["model=tiny_cnn", "dataset.train_limit=800"],
        ["optim.momentum=0.9", "optim.weight_decay=0.001"],
        ["partition=quantity_skew", "partition.min_size=40", "partition.max_size=300", "train.batch_size=7"],
        # the stateless client steps act on lock-step clients' updates as on plain ones (same wire bytes)
        ["postprocess=[clip,topk,quantize]", "clip.bound=2", "topk.fraction=0.1"]
        + ["topk.error_feedback=false"],
        # stateful clients in lock-step: control variates, momentum, error-feedback residuals carried over
        ["algorithm=scaffold", "clients.per_round=6"],
        ["optim.momentum=0.9", "optim.persistent_state=true", "clients.per_round=6"],
        ["postprocess=[topk]", "topk.fraction=0.1", "clients.per_round=6"],
        # DP: clipped and noised updates (the noise is seeded by round and client, whoever trains them)
        ["postprocess=[clip,central_dp]", "clip.bound=2", "privacy.noise_multiplier=0.005"]
        + ["algorithm.weighting=uniform"],
        ["postprocess=[clip,local_dp]", "clip.bound=2", "local_dp.multiplier=0.002"],
    ],
    ids=[
        "cnn",
        "mlp-momentum",
        "uneven",
        "postprocess",
        "scaffold",
        "persistent",
        "error-feedback",
        "central-dp",
    ]
    + ["local-dp"],
)
def test_vectorized_runs_see_what_plain_runs_see(data_root, tmp_path, overrides):
    """Claim 3: over three rounds, the same cohorts, steps and samples, and accuracy within a point."""
    plain, vec = _both(tmp_path, "runtime=sequential", *overrides)
    for a, b in zip(plain.rounds, vec.rounds):
        assert (a["clients"], a.get("bytes_up")) == (b["clients"], b.get("bytes_up"))
    assert abs(plain.final_accuracy - vec.final_accuracy) <= 0.01
    assert plain.final_accuracy > 0.5  # it learned


#: Stateful clients: what a client keeps between rounds, and a run that keeps none (to show it mattered)
STATEFUL = {
    "scaffold": (["algorithm=scaffold"], ["algorithm=fedavg", "algorithm.weighting=uniform"]),
    "persistent-momentum": (
        ["optim.momentum=0.9", "optim.persistent_state=true"],
        ["optim.momentum=0.9", "optim.persistent_state=false"],
    ),
}


@pytest.mark.parametrize("name", list(STATEFUL))
def test_stateful_lockstep_clients_carry_their_state_like_plain_ones(data_root, tmp_path, name):
    """Two rounds of two local steps, every client in both: round 2 trains from the control variates or
    momentum that round 1 left, on both paths. Each local step adds at most one claim-2 difference (1e-3 of
    a step, measured ~1e-6) and carries the earlier ones on through one more SGD step, so four times the
    bound holds on every CPU; the stateless run is further away than that (the state mattered). (With one
    local step and the whole population in the cohort SCAFFOLD's corrections cancel in the mean.)"""
    with_state, without = STATEFUL[name]
    overrides = ("runtime=sequential", "train.rounds=2", "train.local_steps=2", "clients.per_round=8")
    plain, vec = _both(tmp_path, *overrides, *with_state)
    stateless = run_experiment(make_config(*TINY, *overrides, *without), tmp_path / "stateless")
    cfg = make_config(*TINY, *overrides)
    start = initial_weights("mlp", load_data(cfg), int(cfg.seed))
    step = np.abs(plain.weights - start).max()
    assert np.abs(plain.weights - vec.weights).max() <= 4 * ONE_STEP_RELATIVE * step
    assert np.abs(plain.weights - stateless.weights).max() > 10 * ONE_STEP_RELATIVE * step


# Vectorized clients inside Ray actors: tests/runtime/test_runtimes.py (on that module's shared actors).


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
        (["algorithm=ditto"], "no lock-step client half"),
        (["faults.drop_prob=0.1"], "lock-step"),
    ],
)
def test_unsupported_combinations_are_clear_errors(data_root, overrides, message):
    from raypfl.validation import validate

    cfg = make_config(*TINY, "runtime=sequential", "runtime.vectorize=true", *overrides)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)
        build_setup(cfg, load_data(cfg))
