"""Shared fixtures: the data root, a config composer and ONE Ray for the whole session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"
DEFAULT_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("RAYPFL_DATA", str(DEFAULT_DATA))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(1)

#: Small enough for seconds per run, large enough that accuracy means something.
TINY = [
    "dataset.train_limit=3000",
    "dataset.test_limit=1000",
    "model=mlp",
    "clients.num=8",
    "clients.per_round=4",
    "train.rounds=3",
    "train.batch_size=20",
]


#: A test that needs one of these is `slow` whatever it does: starting the session's Ray alone costs 10-25 s.
SLOW_FIXTURES = {"ray_session", "ray_address", "fault_kill_sweep"}


#: The modules that take longest (most first; 7-80 s each on a 2-core machine, together ~85% of the suite's
#: time), run before all others. With `--dist loadfile` each module goes to whichever xdist worker is free
#: next, so the many short modules fill the end of both workers' time instead of one worker finishing a
#: long module alone (~10 s with xdist's default order, most tests first). A module not listed keeps its
#: place after these.
LONGEST_FIRST = [
    "driver/test_faults.py",
    "paradigms/test_paradigm_runs.py",
    "jobs/test_signals.py",
    "tracking/test_sweeps.py",
    "clock/test_virtual_runs.py",
    "driver/test_fault_experiments.py",
    "runtime/test_actor_death.py",
    "algorithms/test_algorithm_runtimes.py",
    "runtime/test_multinode.py",
    "runtime/test_mpi.py",
    "runtime/test_runtimes.py",
    "jobs/test_run_folder.py",
    "driver/test_experiment.py",
    "test_cli.py",
    "runtime/test_ray_start.py",
    "test_bench.py",
    "config/test_bad_keys.py",
    "training/test_vectorize.py",
    "privacy/test_accountant.py",
    "data/test_registries.py",
    "driver/test_updates.py",
]


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep LONGEST_FIRST's order (below)
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark Ray-bound tests `slow`: `pytest -m "not slow"` is the quick loop (others are marked by hand).
    Put the modules of LONGEST_FIRST first, in its order (each module's tests keep theirs)."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    rank = {f"tests/{module}": k for k, module in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # a stable sort


#: The issue-13 probe's base command line: a small, quick sequential run (add train.rounds=...).
SMALL_RUN = [
    "model=mlp",
    "dataset.train_limit=2000",
    "dataset.test_limit=500",
    "clients.num=10",
    "clients.per_round=2",
    "runtime=sequential",
]


def run_cli(*args: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """`python -m raypfl ARGS` as a user types it, with this session's environment (plus `env`)."""
    return subprocess.run(
        [sys.executable, "-m", "raypfl", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd or REPO,
        env={**os.environ, **(env or {})},
    )


def make_config(*overrides: str):
    """Compose conf/config.yaml with overrides, as `python -m raypfl` would."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture(scope="session", autouse=True)
def _shared_data_read_once():
    """This process reads and normalises each split of the shared data root (`$RAYPFL_DATA`) once.

    `raypfl.data.datasets._load_split` (file checks, the idx files, float conversion, normalisation: ~0.4 s
    for MNIST's 60,000 training images, whatever `dataset.train_limit`) runs once per split; later loads of
    it get the same arrays (`load_dataset` then applies its limits, as before). raypfl never writes its data
    (in Ray actors the arrays are read-only); the end of the session checks that nothing did. Other roots
    (the tests' own files) are read every time, as are the shared files if they change; subprocesses and
    Ray actors are not affected.
    """
    import hashlib

    from raypfl.data import datasets

    original = datasets._load_split
    shared = Path(os.environ["RAYPFL_DATA"]).resolve()
    cache: dict = {}

    def load_split(name, root, train, download):
        if Path(root).resolve() != shared or name not in datasets._TORCHVISION:
            return original(name, root, train=train, download=download)
        try:  # the files as they are now: a changed file is read again
            files = datasets._expected_files(name, shared / datasets._TORCHVISION[name].folder, train)
            stamp = tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files)
        except OSError:  # missing: the original reports (or downloads) it
            return original(name, root, train=train, download=download)
        key = (name, train, stamp)
        if key not in cache:
            x, y = original(name, root, train=train, download=download)
            cache[key] = (x, y, hashlib.sha1(x.data).hexdigest(), hashlib.sha1(y.data).hexdigest())
        return cache[key][:2]

    datasets._load_split = load_split
    try:
        yield
    finally:
        datasets._load_split = original
        changed = [
            k[:2]
            for k, (x, y, hx, hy) in cache.items()
            if (hashlib.sha1(x.data).hexdigest(), hashlib.sha1(y.data).hexdigest()) != (hx, hy)
        ]
        assert not changed, f"a test wrote into the shared dataset arrays: {changed}"


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = Path(os.environ["RAYPFL_DATA"])
    assert (root / "MNIST" / "raw").is_dir(), f"MNIST raw files not found under {root}; set RAYPFL_DATA"
    return root


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray (2 CPUs, small object store) shared by every test that needs it; like a run's own
    Ray it listens on the loopback only (raypfl.runtime.ray_start.loopback_only)."""
    import ray

    from raypfl.runtime.ray_start import loopback_only

    with loopback_only():
        ray.init(address="local", num_cpus=2, object_store_memory=256 * 1024 * 1024, include_dashboard=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def kept(ray_session):
    """The client actors and parameter server a module's Ray runs share (tests/runtime/kept_actors.py: a
    test opts in with `use_kept`; one that starts its own actors calls `kept.kill(ray_session)` first)."""
    from tests.runtime.kept_actors import Kept

    pool = Kept()
    try:
        yield pool
    finally:
        pool.kill(ray_session)


@pytest.fixture(scope="session")
def ray_address(ray_session) -> str:
    """The session Ray's address, for a `python -m raypfl` subprocess to join (`runtime.address=...`)
    instead of starting a Ray of its own (which costs ~10 s of CPU and more of wall time on 2 cores)."""
    return ray_session.get_runtime_context().gcs_address


def sweep(out: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m raypfl -m ARGS` (a multirun) into the sweep folder `out`."""
    return subprocess.run(
        [sys.executable, "-m", "raypfl", "-m", *args, f"hydra.sweep.dir={out}"],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=REPO,
        env=os.environ.copy(),
    )


@pytest.fixture(scope="session")
def fault_kill_sweep(tmp_path_factory, data_root, ray_address) -> tuple[Path, subprocess.CompletedProcess]:
    """A tiny fault_kill sweep (kill 0 or 1 of 2 actors), run ONCE for two tests.

    test_fault_experiments checks the table it writes, and that its two runtime=ray jobs
    (basic launcher, one after another) shared the one Ray connection the sweep made (SharedRay), here to
    the session's Ray.
    """
    out = tmp_path_factory.mktemp("fault_kill")
    proc = sweep(
        out,
        "+experiment=fault_kill",
        "dataset.train_limit=2000",
        "dataset.test_limit=500",
        "model=mlp",
        "clients.num=4",
        "clients.per_round=4",
        "runtime.num_actors=2",  # two clients per actor: losing one actor loses two clients
        "runtime.cpus_per_actor=1",
        f"runtime.address={ray_address}",  # the session's Ray (2 CPUs), not one more Ray
        "train.rounds=3",
        "faults.kill_count=0,1",
    )
    return out, proc
