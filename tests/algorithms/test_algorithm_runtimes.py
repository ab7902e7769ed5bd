"""Every shipped algorithm (FedAvgM, FedAdam, FedYogi, FedAdagrad, FedProx, SCAFFOLD, FedNova, q-FFL, Ditto,
FedPer) and a user's algorithm and model on every runtime, and their state kept.

Each algorithm runs MNIST with `model=mlp` on 8 Dirichlet(0.3) clients (unequal sizes), 4 per round, 5
local steps (Ditto and FedPer also hold out 20% of each client and test every client after round 3):

1. (and 4.) sequential, Ray and MPI give the same model, broadcast (SCAFFOLD's control variate), server
   state (FedAvgM's momentum, FedOpt's m, v and t) and, sequential vs Ray, the clients' states (SCAFFOLD's
   control variates, Ditto's and FedPer's personal models) after 3 rounds, up to float summation order (see
   CROSS_RUNTIME); the per-client evaluation of the global and personal models agrees too;
2. a warm start (the driver trains round 1, then the pool takes over) hands over the broadcast and the
   server state: the model and the state equal the plain run's;
3. FedProx's lock-step clients (`runtime.vectorize=true`) add the plain path's proximal term;
5. a run SIGKILLed after round 3 and resumed equals the uninterrupted run bit for bit, because the
   checkpoint holds the server state and every client's state (re-initialising them gives another model).

Runs are shared: the uninterrupted 6-round sequential run of each algorithm is recorded after every round
(its round-3 checkpoint is the sequential side of 1, 2 and 4); the crash runs and the MPI runs are ONE
`mpiexec -n 2` job (algorithm_runs.py), started when this module starts, and the tests that need it come
last; the Ray runs share their actors (`KeptActors`).
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import raypfl.driver.experiment
from raypfl.algorithms import build_algorithm
from raypfl.algorithms.fedavg import proximal_adjust
from raypfl.config import OptimSpec, TrainSpec
from raypfl.driver.experiment import run_experiment
from raypfl.jobs.checkpoint import load_checkpoint, save_checkpoint
from raypfl.models.io import initial_weights
from raypfl.models.zoo import build_model
from raypfl.postprocess.state import split_state
from raypfl.runtime.sequential import SequentialRuntime
from raypfl.runtime.warm import WarmStart
from raypfl.training.local import make_optimizer, train_local
from raypfl.training.lockstep import ClientJob, train_lockstep
from tests.algorithms.algorithm_runs import quick_runs, unflatten
from tests.conftest import REPO, make_config
from tests.runtime.kept_actors import Kept, KeptActors

ALGORITHMS = [
    "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox", "scaffold",
    "fednova", "qffl", "ditto", "fedper",
]  # fmt: skip
#: Clients' personal models (client state); with every client tested on its held-out data after round 3
#: (and 6), global and personal model, on every runtime.
PERSONAL = ("ditto", "fedper")
HELD_OUT = ["partition.client_test_fraction=0.2", "train.eval_clients_every=3"]
#: examples/fedexp.py, a user's algorithm outside the package (its server state starts in its first server
#: update): it must run unchanged on Ray actors and MPI ranks, so it joins the cross-runtime checks.
USER_ALGORITHM = "fedexp"
#: FedAvg on examples/my_model.py, a user's model factory: every worker builds it from the setup's spec.
USER_MODEL = "fedavg-my-model"
CHOICE = {
    USER_ALGORITHM: ["algorithm=custom", "algorithm._target_=examples.fedexp.FedExP"],
    USER_MODEL: ["algorithm=fedavg", "model._target_=examples.my_model.make_net", "+model.hidden=32"],
}
#: The update pipeline (issue 16) on every runtime too: compression with error feedback (residuals are client
#: state), DP-FedAvg with Poisson cohorts (noise drawn once per version by the server) and a robust aggregator
#: of stacked updates under attack (its clients' rows sorted by id wherever they were trained).
PIPELINES = {
    "fedavg-compress": [
        "algorithm=fedavg",
        "postprocess=[clip,topk,quantize]",
        "clip.bound=2.0",
        "topk.fraction=0.1",
    ],
    "fedavg-dp": [
        "algorithm=fedavg",
        "algorithm.weighting=uniform",
        "clients.selection=poisson",
        "postprocess=[clip,central_dp]",
        "privacy.noise_multiplier=0.8",
        "privacy.noise_cohort_size=400",
        "privacy.population=800",
    ],
    "scaffold-trimmed-attack": [
        "algorithm=scaffold",
        "aggregator=trimmed_mean",
        "aggregator.beta=0.25",
        "attack.kind=sign_flip",
        "attack.fraction=0.25",
    ],
}
CHOICE.update(PIPELINES)
ON_EVERY_RUNTIME = [*ALGORITHMS, USER_ALGORITHM, USER_MODEL, *PIPELINES]
#: FedYogi and FedAdagrad are FedAdam's class with another second moment (one line of its server update, which
#: no runtime looks inside): on Ray and in a warm start they run like every algorithm, while the MPI job (and
#: its crash runs) checks FedAdam for the three, to keep the suite's time. FedProx has no state to lose: its
#: crash run would be FedAvg's (tests/driver/test_faults.py).
SAME_CLASS_AS_FEDADAM = ("fedyogi", "fedadagrad")
ON_MPI = [alg for alg in ON_EVERY_RUNTIME if alg not in SAME_CLASS_AS_FEDADAM]
CRASHED = [alg for alg in [*ALGORITHMS, *PIPELINES] if alg not in (*SAME_CLASS_AS_FEDADAM, "fedprox")]
FEDOPT = ("fedadam", "fedyogi", "fedadagrad")
BASE = [
    "model=mlp",
    "partition=dirichlet",
    "partition.alpha=0.3",
    "dataset.train_limit=2000",
    "dataset.test_limit=500",
    "clients.num=8",
    "clients.per_round=4",
    "train.local_steps=5",
    "train.batch_size=20",
]
SEQ = "runtime=sequential"
MPIEXEC = str(Path(sys.executable).parent / "mpiexec")

#: Why 1e-5 holds on every CPU (as test_runtimes.py's CROSS_RUNTIME): every client trains with the
#: same kernels and one thread on every runtime, so its float32 statistics are the same bits; only the
#: float64 sums of the clients' statistics are grouped differently (per actor or rank, then the partials,
#: vs one by one). That changes a float64 sum by ~1e-16 of itself, and a float32 weight or control variate
#: only when the sum lands within that of a float32 rounding boundary (~1e-9 per value per round); the
#: float64 server states (momentum, m, v) differ by ~1e-16 of their size. Float summation order is the
#: only difference allowed, so each array is compared to within 1e-5 of its own size (at most 1e-5
#: absolute: FedAdam's v is ~1e-5 itself) and round counters exactly. Measured: 0.0 everywhere.
CROSS_RUNTIME = 1e-5


def args(alg: str, *extra: str) -> list[str]:
    held_out = HELD_OUT if alg in PERSONAL else []
    return [*BASE, *CHOICE.get(alg, [f"algorithm={alg}"]), *held_out, *extra]


def crash_args(alg: str) -> list[str]:
    return args(alg, SEQ, "train.rounds=6", "faults.crash_after_round=3")


def mpi_args(alg: str) -> list[str]:
    return args(alg, "runtime=mpi", "train.rounds=3")


# --- the server's side of a run, wherever it comes from ---------------------------------------------------


@dataclass
class Final:
    """A version's broadcast (with `model`), server state and the driver's client states (None: not kept
    by the driver, as on MPI ranks)."""

    broadcast: dict
    state: dict
    clients: dict | None

    @classmethod
    def of_checkpoint(cls, state: dict) -> Final:
        return cls(state["broadcast"], state["server_state"], _flat(state["planner"]["client_states"]))

    @classmethod
    def of_result(cls, result) -> Final:
        return cls(result.server.broadcast, result.server.state, _flat(result.client_states))

    @classmethod
    def of_arrays(cls, arrays) -> Final:
        parts = unflatten(arrays)
        return cls(parts["broadcast"], parts["state"], None)


def _flat(states: dict) -> dict:
    """Client states as one array each: a postprocessor's composite state (the algorithm's state and, e.g.,
    top-k's error-feedback residual) is concatenated in a fixed order."""

    def flat(state):
        algorithm, steps = split_state(state)
        if steps is None:
            return state
        parts = [] if algorithm is None else [np.ravel(algorithm)]
        return np.concatenate([*parts, *(np.ravel(steps[k]) for k in sorted(steps))])

    return {client: flat(state) for client, state in states.items()}


def differences(got: Final, want: Final) -> dict[str, float]:
    """Max abs difference of every named array (broadcast, server state, client states), after checking
    that both hold the same names; scalars (FedOpt's t) must be equal."""
    assert sorted(got.broadcast) == sorted(want.broadcast)
    assert sorted(got.state) == sorted(want.state)
    pairs = [(f"broadcast.{k}", got.broadcast[k], want.broadcast[k]) for k in want.broadcast]
    pairs += [(f"state.{k}", got.state[k], want.state[k]) for k in want.state]
    if got.clients is not None and want.clients is not None:
        assert sorted(got.clients) == sorted(want.clients)
        pairs += [(f"client.{c}", got.clients[c], want.clients[c]) for c in want.clients]
    diffs = {}
    for name, a, b in pairs:
        if np.ndim(b) == 0 and isinstance(b, (int, np.integer)):  # counters (FedOpt's t): equal
            assert a == b, f"{name}: {a} != {b}"
            continue
        assert np.shape(a) == np.shape(b) and np.asarray(a).dtype == np.asarray(b).dtype, name
        diffs[name] = float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())
    return diffs


def assert_close(got: Final, want: Final, label: str) -> dict[str, float]:
    diffs = differences(got, want)
    for name, diff in diffs.items():
        array = want.broadcast if name.startswith("broadcast.") else want.state
        if name.startswith("client."):
            array = want.clients
        scale = float(np.abs(array[_key(name)]).max())
        assert diff <= CROSS_RUNTIME * min(1.0, scale), f"{label}: {name} max abs difference {diff}"
    return diffs


def assert_identical(got: Final, want: Final, label: str) -> None:
    """Bit for bit: the same names, dtypes, shapes and bytes (and equal scalars)."""
    unequal = [name for name, diff in differences(got, want).items() if diff != 0.0]
    groups = [("broadcast", got.broadcast, want.broadcast), ("state", got.state, want.state)]
    if got.clients is not None and want.clients is not None:
        groups.append(("client", got.clients, want.clients))
    for group, a, b in groups:
        for key in b:
            if np.ndim(b[key]) and np.asarray(a[key]).tobytes() != np.asarray(b[key]).tobytes():
                unequal.append(f"{group}.{key}")  # e.g. -0.0 for 0.0, which max abs difference misses
    assert not unequal, f"{label}: not bit for bit: {sorted(set(unequal))}"


def _key(name: str):
    group, _, key = name.partition(".")
    return int(key) if group == "client" else key


def assert_not_initial(alg: str, final: Final, rounds: int, cohorts: set[int] | None = None) -> None:
    """The server side after `rounds` rounds is not what `server_init` starts from (so a restore that
    re-initialised it would be seen), with the specific facts of each algorithm."""
    algorithm = build_algorithm(make_config(*args(alg, SEQ)))
    first_broadcast, first_state = algorithm.server_init(final.broadcast["model"])
    for name, value in first_state.items():
        assert not np.array_equal(final.state[name], value), (
            f"{alg}: server state {name} is its initial value"
        )
    for name, value in first_broadcast.items():
        if name != "model":
            assert not np.array_equal(final.broadcast[name], value), f"{alg}: broadcast {name} is initial"
    if alg == "fedavgm":
        assert np.abs(final.state["momentum"]).max() > 0
    elif alg in FEDOPT:
        assert final.state["t"] == rounds and np.abs(final.state["m"]).max() > 0
    elif alg in ("fedprox", "fednova", "qffl", USER_MODEL):  # nothing but the model to carry
        assert final.state == {} and sorted(final.broadcast) == ["model"]
    elif alg == USER_ALGORITHM:  # FedExP's step size, kept as server state from its first update on
        assert final.state["eta_g"] >= 1.0 and sorted(final.broadcast) == ["model"]
    elif alg in PERSONAL:  # every client that trained has its personal model (Ditto) or layers (FedPer)
        assert final.state == {} and sorted(final.broadcast) == ["model"]
        if cohorts is not None:
            assert final.clients is not None and sorted(final.clients) == sorted(cohorts)
            size = final.broadcast["model"].size
            assert all(0 < c.size <= size and np.isfinite(c).all() for c in final.clients.values())
    elif alg == "scaffold":
        assert np.abs(final.broadcast["control"]).max() > 0 and final.state == {}
        if cohorts is not None:  # every client that trained has its c_i, none is zero
            assert final.clients is not None and sorted(final.clients) == sorted(cohorts)
            assert all(np.abs(c).max() > 0 for c in final.clients.values())


# --- shared runs -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _quick():
    """No plots, data read once (algorithm_runs.py): this module has ~40 runs of ~0.5 s of rounds."""
    with quick_runs():
        yield


@dataclass
class Recorded:
    """The uninterrupted run: its result and its checkpoint after every round."""

    result: object
    after: dict[int, Final]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_root) -> Callable[[str], Recorded]:
    """`uninterrupted(alg)`: the 6-round sequential run of `alg` (run once, on first use), with a deep copy
    of what it checkpointed after each round."""
    runs: dict[str, Recorded] = {}

    def get(alg: str) -> Recorded:
        if alg not in runs:
            after: dict[int, Final] = {}

            def record(path, state):
                after[state["round"]] = copy.deepcopy(Final.of_checkpoint(state))
                save_checkpoint(path, state)

            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(raypfl.driver.experiment, "save_checkpoint", record)
                cfg = make_config(*args(alg, SEQ, "train.rounds=6"))
                result = run_experiment(cfg, tmp_path_factory.mktemp(f"whole-{alg}"))
            assert sorted(after) == [1, 2, 3, 4, 5, 6]
            runs[alg] = Recorded(result, after)
        return runs[alg]

    return get


class HelperJob:
    """The `mpiexec -n 2 algorithm_runs.py` job: crash runs, then MPI runs, of every algorithm."""

    TIMEOUT_S = 400

    def __init__(self, out: Path):
        self.out = out
        spec = {
            "out": str(out),
            "crash": {alg: crash_args(alg) for alg in CRASHED},
            "mpi": {alg: mpi_args(alg) for alg in ON_MPI},
        }
        (out / "spec.json").write_text(json.dumps(spec))
        self.log = open(out / "job.log", "w")  # noqa: SIM115 (closed in finish)
        script = str(Path(__file__).resolve().parent / "algorithm_runs.py")
        self.proc = subprocess.Popen(
            [MPIEXEC, "-n", "2", sys.executable, script, str(out / "spec.json")],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=os.environ.copy(),
            start_new_session=True,  # its own process group: on a timeout, mpiexec and its ranks go together
        )
        self.returncode: int | None = None

    def wait(self) -> HelperJob:
        if self.returncode is None:
            try:
                self.returncode = self.proc.wait(timeout=self.TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.finish()
                raise
            self.log.close()
        return self

    def finish(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group this job started, nothing else
            self.proc.wait()
        self.log.close()

    def tail(self) -> str:
        return (self.out / "job.log").read_text()[-3000:]

    def crash(self, alg: str) -> tuple[int, Path]:
        """(the crash run's returncode, its run folder)."""
        self.wait()
        report = self.out / f"crash-{alg}.json"
        assert report.exists(), self.tail()
        return json.loads(report.read_text())["returncode"], self.out / alg

    def mpi(self, alg: str) -> Final:
        return Final.of_arrays(self._arrays(alg))

    def mpi_row(self, alg: str) -> dict:
        """The MPI run's last metrics row's per-client evaluation summary."""
        return unflatten(self._arrays(alg))["row"]

    def _arrays(self, alg: str) -> dict:
        self.wait()
        assert self.returncode == 0, self.tail()
        with np.load(self.out / f"mpi-{alg}.npz") as arrays:
            return {k: arrays[k] for k in arrays.files}


@pytest.fixture(scope="module")
def helper_job(tmp_path_factory, data_root):
    job = HelperJob(tmp_path_factory.mktemp("algorithm_runs"))
    try:
        yield job
    finally:
        job.finish()


@pytest.fixture(scope="module", autouse=True)
def _start_the_job_early(request):
    """Start the MPI job as the module starts (it runs beside the in-process tests) if a selected test
    of this module needs it."""
    mine = [item for item in request.session.items if item.module is request.module]
    if any("helper_job" in item.fixturenames for item in mine):
        request.getfixturevalue("helper_job")


def ray_run(alg: str, out: Path, kept: Kept, rounds: int = 3, warm: bool = False):
    """`alg` on the session's Ray with two client actors (kept); `warm`: behind a WarmStart whose pool
    takes over after round 1. Returns (result, the runtime)."""
    ray = ["runtime=ray", "runtime.num_actors=2", "runtime.warm_start=false", f"train.rounds={rounds}"]
    cfg = make_config(*args(alg, *ray))
    made: list = []

    def build(spec):
        pool = KeptActors(spec, kept, wait_for_actors=warm)
        made.append(WarmStart(pool) if warm else pool)
        return made[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(raypfl.driver.experiment, "build_runtime", build)
        result = run_experiment(cfg, out)
    return result, made[0]


@pytest.fixture(scope="module")
def ray_results(kept, tmp_path_factory) -> Callable[[str], tuple]:
    """`ray_results(alg)`: (the 3-round Ray run's result, its clients' rows), run once on first use."""
    runs: dict[str, tuple] = {}

    def get(alg: str) -> tuple:
        if alg not in runs:
            out = tmp_path_factory.mktemp(f"ray-{alg}")
            result, _ = ray_run(alg, out, kept)
            runs[alg] = (result, load_checkpoint(out)["client_rows"])
        return runs[alg]

    return get


# --- 1. sequential == Ray (== MPI: in 4, at the end, so that the MPI job runs meanwhile) ------------------


@pytest.mark.parametrize("alg", ON_EVERY_RUNTIME)
def test_ray_gives_the_sequential_model_and_state(alg, uninterrupted, ray_results):
    sequential = uninterrupted(alg).after[3]
    assert_not_initial(alg, sequential, 3)
    result, client_rows = ray_results(alg)
    cohorts = [r["clients"] for r in uninterrupted(alg).result.rounds[:3]]  # Poisson cohorts vary in size
    assert [r["clients"] for r in result.rounds] == cohorts
    assert alg == "fedavg-dp" or cohorts == [4, 4, 4]
    assert {r["actor"] for r in client_rows if r["status"] != "eval"} == {0, 1}  # partials were summed
    found = assert_close(Final.of_result(result), sequential, "ray vs sequential")
    print(alg, "ray vs sequential", max(found.values()))


# --- 2. warm start on == off -------------------------------------------------------------------------------


class HandOverPool(SequentialRuntime):
    """A stand-in for the Ray pool (as test_warm_start.SlowPool): ready at the first check, i.e. it takes
    over after round 1; records the snapshot it was handed and the rounds it trained."""

    def __init__(self):
        super().__init__()
        self.rounds: list[int] = []
        self.handed = None

    def expected_parallelism(self) -> int:
        return 2

    def launch(self, setup, initial):
        self._args = (setup, initial)

    def ready(self) -> bool:
        return True

    def wait_ready(self) -> None:
        super().start(*self._args)  # from the initial snapshot: the hand-over must replace it

    def take_over(self, snapshot):
        self.handed = copy.deepcopy(snapshot)
        self.server.reset(snapshot.broadcast, snapshot.version, snapshot.state)

    def run_round(self, plan, on_submitted=None):
        self.rounds.append(plan.round_idx)
        return super().run_round(plan, on_submitted)

    def evaluate_async(self):  # as RayRuntime's (WarmStart asks the pool for it once it took over)
        done = self.evaluate()
        return lambda: done


@pytest.mark.parametrize("alg", ALGORITHMS)
def test_warm_start_hands_over_the_server_state(alg, uninterrupted, tmp_path, monkeypatch):
    """The driver trains round 1 (in a helper thread, while the pool "launches"), the pool rounds 2 and 3.
    Both are this process's sequential code with one torch thread, so the result is the plain run's bit
    for bit. The one real Ray warm start is test_warm_start_on_ray_hands_over_to_the_actors."""
    plain = uninterrupted(alg)  # first: it must not use the runtime patched in below
    pool = HandOverPool()
    warm = WarmStart(pool)
    monkeypatch.setattr(raypfl.driver.experiment, "build_runtime", lambda spec: warm)
    result = run_experiment(make_config(*args(alg, SEQ, "train.rounds=3")), tmp_path)
    assert warm.local_rounds == 1 and pool.rounds == [2, 3]
    handed = Final(pool.handed.broadcast, pool.handed.state, None)
    assert pool.handed.version == 1
    assert_not_initial(alg, handed, 1)  # e.g. FedAdam's t == 1: the state after round 1 was handed over
    assert_identical(handed, plain.after[1], "handed over")
    assert_identical(Final.of_result(result), plain.after[3], "warm vs plain")


def test_warm_start_on_ray_hands_over_to_the_actors(uninterrupted, kept, tmp_path):
    """A real warm start on Ray, for FedAdam (server state m, v, t): round 1 trains in the driver while the
    RayRuntime launches its actors and parameter-server actor; then `take_over` puts the driver's
    broadcast and server state in the object store and resets the parameter-server actor to them, and
    rounds 2 and 3 run on the actors. (`runtime.warm_start=true` itself only applies to a Ray the run
    starts, ~15 s more here; the pool's `ready()` waits for the actors, so the hand-over is always after
    round 1.)"""
    result, warm = ray_run("fedadam", tmp_path, kept, warm=True)
    assert warm.local_rounds == 1 and warm.local is None  # the pool took over after round 1
    assert result.server.state["t"] == 3
    assert_close(Final.of_result(result), uninterrupted("fedadam").after[3], "ray warm vs sequential")


# --- 3. FedProx in lock-step -------------------------------------------------------------------------------

#: As test_vectorize.py claims 1 and 2 (which hold on Intel and AMD CPUs; see there): float64, one
#: local epoch: the lock-step path equals the plain one to <= 1e-10; float32: a difference of summation
#: order only, <= 1e-3 of the update.
FLOAT64_BOUND = 1e-10
RELATIVE_TO_UPDATE = 1e-3
MU = 1.0  # large enough that the proximal term moves a 2-step update by ~5%, 50x the float32 bound


def test_fedprox_lockstep_proximal_term_equals_the_plain_one_in_float64(data_root):
    """Claim 1 with FedProx's term: `train_lockstep(..., proximal_mu)` (what FedProx.client_updates runs)
    vs `train_local` with `proximal_adjust` (FedProx.client_update), uneven clients, one epoch of 2 to 15
    steps (the term acts from the second step on: at the first, w = w_global)."""
    data = raypfl.driver.experiment.load_data(make_config(*args("fedprox", SEQ)))  # cached (quick_runs)
    x, y = torch.as_tensor(data.train_x).double(), torch.as_tensor(data.train_y).long()
    train, optim = TrainSpec(batch_size=20, local_epochs=1), OptimSpec(lr=0.1)
    parts = [np.arange(0, 40), np.arange(40, 213), np.arange(213, 513)]
    torch.manual_seed(0)
    model = build_model("mlp").double()
    start = {k: v.detach().clone() for k, v in model.named_parameters()}

    def plain(mu: float) -> torch.Tensor:
        out = []
        for c, part in enumerate(parts):
            alone = build_model("mlp").double()
            alone.load_state_dict(start, strict=False)
            optimizer = make_optimizer(alone.parameters(), optim)
            generator = torch.Generator().manual_seed(c)
            train_local(alone, optimizer, x, y, part, train, generator, proximal_adjust(alone, mu))
            out.append(torch.cat([p.detach().flatten() for p in alone.parameters()]))
        return torch.stack(out)

    jobs = [ClientJob(x, y, part, torch.Generator().manual_seed(c), train) for c, part in enumerate(parts)]
    stacked, results = train_lockstep(model, start, jobs, optim, MU)
    together = torch.stack([torch.cat([stacked[k][c].flatten() for k in start]) for c in range(len(parts))])
    with_mu, without = plain(MU), plain(0.0)
    assert [r.steps for r in results] == [2, 9, 15]
    assert (with_mu - together).abs().max().item() <= FLOAT64_BOUND
    assert (with_mu - without).abs().max().item() > 1e-3  # the term is there, on both paths


def test_fedprox_vectorized_round_matches_plain_and_mu_matters(data_root, tmp_path):
    """One round of 4 clients x 2 local steps, float32: lock-step vs plain within 1e-3 of the update, and
    FedProx's term (mu=1) moves the update by ~5%, so a lock-step path without it would fail.

    Two steps, because at the first w = w_global and the term is 0 (one step cannot tell FedProx from
    FedAvg). Claim 2 bounds the first step's reordering; the second starts from weights that differ by
    that much only (~1e-7 of the update), and `mlp` has no max-pool, so only a ReLU input within ~1e-7 of
    0 could make more of it (measured: 5e-7 of the update). mu=1, not the default 0.01, whose effect on
    two steps (~lr * mu / 2 = 5e-4 of the update) would hide under the bound."""
    one = [SEQ, "train.rounds=1", "train.local_steps=2"]
    plain, vectorized, no_mu = (
        run_experiment(make_config(*args("fedprox", *one, *extra)), tmp_path / name)
        for name, extra in [
            ("plain", [f"algorithm.mu={MU}"]),
            ("vec", [f"algorithm.mu={MU}", "runtime.vectorize=true"]),
            ("mu0", ["algorithm.mu=0"]),
        ]
    )
    cfg = make_config(*args("fedprox", *one))
    start = initial_weights("mlp", raypfl.driver.experiment.load_data(cfg), int(cfg.seed))
    update = np.abs(plain.weights - start).max()
    assert update > 1e-3
    lockstep_diff = np.abs(plain.weights - vectorized.weights).max()
    assert lockstep_diff <= RELATIVE_TO_UPDATE * update, (lockstep_diff, update)
    assert np.abs(plain.weights - no_mu.weights).max() > 10 * RELATIVE_TO_UPDATE * update
    print("fedprox", {"update": update, "lockstep": lockstep_diff})


# --- 4. sequential == MPI (== Ray) -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("alg", ON_MPI)
def test_mpi_gives_the_sequential_and_ray_model_and_state(alg, uninterrupted, ray_results, helper_job):
    """Two ranks, mode server. Client states stay on the ranks (not compared: Ray's are, above)."""
    sequential = uninterrupted(alg).after[3]
    mpi = helper_job.mpi(alg)
    found = assert_close(mpi, sequential, "mpi vs sequential")
    ray = Final.of_result(ray_results(alg)[0])
    found_ray = assert_close(Final(ray.broadcast, ray.state, None), mpi, "ray vs mpi")
    print(alg, "mpi vs sequential", max(found.values()), "ray vs mpi", max(found_ray.values()))


def summary(row: dict) -> dict:
    """A metrics row's per-client evaluation figures (means and worst 10%, global and personal)."""
    return {k: float(v) for k, v in row.items() if k.endswith(("acc_mean", "acc_worst10")) and v != ""}


@pytest.mark.slow
@pytest.mark.parametrize("alg", PERSONAL)
def test_every_runtime_scores_the_clients_and_their_personal_models_alike(
    alg, uninterrupted, ray_results, helper_job
):
    """After round 3 each client's held-out data is scored with the global model and its personal model:
    in the driver (sequential), split over the Ray actors (with the driver's client states), and over the
    MPI ranks (each with the states of the clients it trained). The models agree to float summation order
    (above; measured equal), so the scores agree unless a held-out sample sits on a decision boundary
    within that: at most one sample of one client (~1/(8 x 30) of a mean), allowed here."""
    sequential = summary(uninterrupted(alg).result.rounds[2])
    assert set(sequential) == {f"{m}_acc_{s}" for m in ("client", "personal") for s in ("mean", "worst10")}
    if alg == "fedper":  # the personal layers matter: the global model's head was never trained
        assert sequential["personal_acc_mean"] > sequential["client_acc_mean"] + 0.1
    ray = summary(ray_results(alg)[0].rounds[2])
    mpi = {k: float(v) for k, v in helper_job.mpi_row(alg).items()}
    for name, other in (("ray", ray), ("mpi", mpi)):
        assert set(other) == set(sequential), name
        gaps = {k: abs(other[k] - sequential[k]) for k in sequential}
        assert max(gaps.values()) <= 0.01, (name, gaps)
        print(alg, name, "vs sequential, per-client evaluation", max(gaps.values()))


# --- 5. SIGKILL after round 3, resume --------------------------------------------------------------------


def cohorts_until(state: dict, round_idx: int) -> set[int]:
    """The clients whose update was averaged in rounds 1..round_idx (from a checkpoint's client rows)."""
    return {r["client"] for r in state["client_rows"] if r["round"] <= round_idx and r["status"] == "ok"}


@pytest.mark.slow
@pytest.mark.parametrize("alg", CRASHED)
def test_sigkill_after_round_3_and_resume_gives_the_uninterrupted_run(
    alg, uninterrupted, helper_job, tmp_path
):
    returncode, killed = helper_job.crash(alg)
    assert returncode == -signal.SIGKILL, helper_job.tail()
    state = load_checkpoint(killed)
    assert state["round"] == 3 and state["version"] == 3 and not (killed / "model.pt").exists()
    saved = Final.of_checkpoint(state)
    assert_not_initial(alg, saved, 3, cohorts_until(state, 3))  # e.g. FedAdam: m != 0, t == 3
    whole = uninterrupted(alg)
    assert_identical(saved, whole.after[3], "checkpoint after round 3")
    resumed = run_experiment(make_config(*args(alg, SEQ, "train.rounds=6", f"resume={killed}")), tmp_path)
    assert [r["round"] for r in resumed.rounds] == [1, 2, 3, 4, 5, 6]
    assert [r["test_acc"] for r in resumed.rounds] == [r["test_acc"] for r in whole.result.rounds]
    np.testing.assert_array_equal(resumed.weights, whole.result.weights)
    assert_identical(Final.of_result(resumed), Final.of_result(whole.result), "resumed vs uninterrupted")
    if alg == "scaffold" or alg in PERSONAL:  # every client's c_i (personal model) came back, went on
        assert sorted(resumed.client_states) == sorted(cohorts_until(load_checkpoint(tmp_path), 6))
    if alg in PERSONAL:  # and each client's personal model scored the same on its held-out data
        assert summary(resumed.rounds[-1]) == summary(whole.result.rounds[-1]) != {}
    if alg == "fedavg-compress":  # every client's error-feedback residual came back, went on
        assert sorted(resumed.client_states) == sorted(cohorts_until(load_checkpoint(tmp_path), 6))
    if alg == "fedavg-dp":  # the same noise multiplier, so the same epsilon column, and noise was added
        column = [(r["epsilon"], r["dp_noise_std"]) for r in resumed.rounds]
        assert column == [(r["epsilon"], r["dp_noise_std"]) for r in whole.result.rounds]
        assert 0 < column[0][0] < column[-1][0] and column[0][1] == 0.8 * 1.0 / 400


#: What a resume that lost state would start from: the server side re-initialised (`server_init` of the
#: checkpoint's model: FedAvgM's momentum 0, FedOpt's m = 0, v = tau^2, t = 0, SCAFFOLD's control 0), or
#: SCAFFOLD's clients' c_i dropped (each starts again from zeros).
FORGETTING = ["fedavgm", "fedadam", "scaffold", "scaffold-clients"]


@pytest.mark.slow
@pytest.mark.parametrize("case", FORGETTING)
def test_a_resume_that_reinitialised_the_state_would_be_caught(case, uninterrupted, helper_job, tmp_path):
    """The resume test can fail: resuming from the same checkpoint with the state re-initialised gives
    another model."""
    alg = case.split("-")[0]
    _, killed = helper_job.crash(alg)
    state = load_checkpoint(killed)
    if case.endswith("-clients"):
        assert state["planner"]["client_states"]
        state["planner"]["client_states"] = {}
    else:
        algorithm = build_algorithm(make_config(*args(alg, SEQ)))
        broadcast, state["server_state"] = algorithm.server_init(state["broadcast"]["model"])
        state["broadcast"] = broadcast
    state.pop("format")
    forgot = tmp_path / "forgot"
    forgot.mkdir()
    save_checkpoint(forgot / "checkpoint.pt", state)
    resumed = run_experiment(make_config(*args(alg, SEQ, "train.rounds=6", f"resume={forgot}")), tmp_path)
    diff = np.abs(resumed.weights - uninterrupted(alg).result.weights).max()
    assert diff > 1e-4, f"{case}: forgetting the state changed the model by only {diff}"
    print(case, "forgetting the state moved the model by", diff)
