"""runtime.placement: spread puts the actors on distinct nodes of a multi-node cluster; same model as one.

The session's Ray (`ray_session`) owns `ray.init` in this process, so the multi-node cluster runs in a
subprocess: benchmarks/multinode.py starts a local `ray.cluster_utils.Cluster` (0-CPU head + 2 worker nodes
of 4 CPUs, so only the SPREAD strategy, not a lack of room, splits the actors), runs the experiment with
`runtime.address=<cluster>` and writes the placement and final weights to a JSON file.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import subprocess
import sys

import numpy as np
import pytest

from raypfl.config import RuntimeSpec
from raypfl.driver.experiment import run_experiment
from raypfl.errors import ConfigError
from raypfl.runtime import ray_runtime
from raypfl.runtime.placement import describe, scheduling_options
from raypfl.validation import validate
from tests.conftest import REPO, make_config

SCRIPT = REPO / "benchmarks" / "multinode.py"


def _benchmark_module():
    """benchmarks/multinode.py as a module (for its EXPERIMENT overrides)."""
    spec = importlib.util.spec_from_file_location("multinode_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Lines(logging.Handler):
    """Keeps the messages logged while attached."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def cluster_proc(tmp_path_factory, data_root):
    """Start the multi-node spread run in a subprocess (it works while this process runs the local one)."""
    out = tmp_path_factory.mktemp("multinode")
    record = out / "multinode.json"
    command = [sys.executable, str(SCRIPT), "--placements", "spread", "--no-reference", "--no-report"]
    command += ["--json", str(record), "--out", str(out / "runs")]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield proc, record
    finally:
        if proc.poll() is None:  # SIGTERM: the cluster's shutdown hooks (and Ray's reaper) stop its nodes
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def local_pack_run(cluster_proc, ray_session, tmp_path_factory):
    """The same experiment with placement=pack on the session's one-node Ray; (result, placement lines)."""
    overrides = [*_benchmark_module().EXPERIMENT, "seed=0", "runtime.placement=pack"]
    lines = _Lines()
    logger = logging.getLogger(ray_runtime.__name__)
    level = logger.level
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    try:
        result = run_experiment(make_config(*overrides), tmp_path_factory.mktemp("local_pack"))
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
    return result, [m for m in lines.messages if m.startswith("placement: node")]


@pytest.fixture(scope="module")
def cluster_run(cluster_proc, local_pack_run) -> dict:
    """The subprocess's JSON record: cluster nodes and the spread run (placement, final weights file)."""
    proc, record = cluster_proc
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-5000:]
    data = json.loads(record.read_text())
    (run,) = data["runs"]
    return {**data, "run": run}


def test_spread_puts_the_actors_on_distinct_worker_nodes(cluster_run):
    nodes = {n["node_id"]: n for n in cluster_run["nodes"]}
    assert len(nodes) == 3 and sum(n["head"] for n in nodes.values()) == 1
    placement = cluster_run["run"]["placement"]
    assert [row["actor"] for row in placement] == [0, 1]
    landed = [row["node_id"] for row in placement]
    assert len(set(landed)) == 2, describe(placement)  # worker nodes have room for both: SPREAD split them
    assert not any(nodes[n]["head"] for n in landed)  # the head has no CPUs
    assert sorted(row["label"] for row in placement) == ["worker_a", "worker_b"]
    assert len({row["pid"] for row in placement}) == 2


def test_multinode_spread_gives_the_single_node_pack_model(cluster_run, local_pack_run):
    """Placement changes where clients train, never what they compute: same seed, same final weights."""
    local, lines = local_pack_run
    assert len(lines) == 1 and "actors 0, 1 (pids" in lines[0], lines  # one node: both actors on it
    run = cluster_run["run"]
    assert "runtime.placement=spread" in run["overrides"]
    spread = np.load(run["weights_path"])
    diff = float(np.abs(spread - local.weights).max())
    assert diff <= 1e-6, f"max abs difference {diff}"
    assert run["final_acc"] == pytest.approx(local.final_accuracy)


def test_benchmark_runs_every_round_on_the_actors():
    """The one-node reference starts its own Ray: with warm start its driver could train every round before
    the pool is up (a fast machine), leaving no placement to report; so the benchmark turns warm start off."""
    module = _benchmark_module()
    assert module.compose_config(list(module.EXPERIMENT)).runtime.warm_start is False


def test_benchmark_run_without_an_actor_pool_says_so(monkeypatch, tmp_path):
    """No pool came up (nothing passed `wait_ready`): a clear error, not an IndexError."""
    import raypfl.driver.experiment

    module = _benchmark_module()
    monkeypatch.setattr(raypfl.driver.experiment, "run_experiment", lambda cfg, out: None)
    with pytest.raises(RuntimeError, match="local-pack: no actor pool came up"):
        module.run("local-pack", ["model=mlp", "runtime.warm_start=true"], tmp_path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("runtime.placement=bogus", "runtime.placement=bogus must be one of pack, spread"),
        ("runtime.gpus_per_actor=-0.5", "runtime.gpus_per_actor=-0.5 must be >= 0"),
        ("runtime.gpus_per_actor=1.5", "runtime.gpus_per_actor=1.5: Ray needs a fraction <= 1"),
    ],
)
def test_bad_placement_and_gpu_requests_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(make_config(override))


def test_good_placements_validate():
    for override in ("runtime.placement=spread", "runtime.placement=pack", "runtime.gpus_per_actor=0.25"):
        validate(make_config(override))


def test_scheduling_options():
    assert scheduling_options("spread") == {"scheduling_strategy": "SPREAD"}
    assert scheduling_options("pack") == {}  # Ray's default policy, as before
    with pytest.raises(ValueError, match="runtime.placement=x"):
        scheduling_options("x")


def test_placement_lines_group_actors_by_node():
    rows = [
        {"actor": 0, "node_id": "a" * 40, "ip": "10.0.0.2", "pid": 11, "label": "worker_a", "gpu_ids": ["0"]},
        {"actor": 1, "node_id": "b" * 40, "ip": "10.0.0.3", "pid": 12, "label": "", "gpu_ids": []},
        {"actor": 2, "node_id": "a" * 40, "ip": "10.0.0.2", "pid": 13, "label": "worker_a", "gpu_ids": ["0"]},
    ]
    assert describe(rows) == [
        "node aaaaaaaaaaaa (10.0.0.2, worker_a): actors 0, 2 (pids 11, 13), GPUs 0",
        "node bbbbbbbbbbbb (10.0.0.3): actors 1 (pids 12)",
    ]


def test_pool_size_counts_gpus_when_actors_ask_for_them(monkeypatch):
    monkeypatch.setattr(ray_runtime.ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 2.0})
    assert ray_runtime.pool_size(RuntimeSpec()) == 16
    assert ray_runtime.pool_size(RuntimeSpec(gpus_per_actor=0.25)) == 8  # 4 actors per GPU
    assert ray_runtime.pool_size(RuntimeSpec(cpus_per_actor=0.5, gpus_per_actor=0.1)) == 20
    assert ray_runtime.pool_size(RuntimeSpec(num_actors=3, gpus_per_actor=0.25)) == 3


def test_gpu_actors_without_gpus_fail_fast_on_a_local_ray(monkeypatch, caplog):
    monkeypatch.setattr(ray_runtime.ray, "cluster_resources", lambda: {"CPU": 2.0})
    with pytest.raises(ConfigError, match=re.escape("runtime.gpus_per_actor=0.5 but Ray has 0 GPUs")):
        ray_runtime.check_gpus(RuntimeSpec(gpus_per_actor=0.5))
    ray_runtime.check_gpus(RuntimeSpec(gpus_per_actor=0.5, address="auto"))  # a cluster may still scale up
    assert "wait until a GPU node joins" in caplog.text
    ray_runtime.check_gpus(RuntimeSpec())  # no GPUs asked for
    monkeypatch.setattr(ray_runtime.ray, "cluster_resources", lambda: {"CPU": 2.0, "GPU": 1.0})
    ray_runtime.check_gpus(RuntimeSpec(gpus_per_actor=0.5))
