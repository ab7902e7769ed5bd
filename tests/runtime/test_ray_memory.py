"""Issue 18 (memory): `runtime.dashboard` and what a local Ray leaves out, and a torch-free parameter server.

The knob's tests never start Ray (`ray.init` is replaced by a recorder); the parameter-server actor runs
in the session's Ray; one slow test runs `python -m raypfl` with a Ray of its own and checks its processes.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
import time

import psutil
import pytest

from raypfl.config import RuntimeSpec, runtime_spec
from raypfl.errors import ConfigError
from raypfl.runtime import ray_start
from tests.conftest import REPO, SMALL_RUN, make_config


@pytest.fixture
def recorded_init(monkeypatch) -> list[dict]:
    """start_ray as if no Ray were up; `ray.init` records its kwargs and whether the head would be lean."""
    from ray._private.node import Node

    calls: list[dict] = []

    def record(**kwargs):
        lean = (
            Node.start_api_server is ray_start._skip_api_server
            and Node.start_monitor is ray_start._skip_monitor
        )
        calls.append({**kwargs, "lean": lean})

    monkeypatch.setattr(ray_start.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_start.ray, "init", record)
    return calls


def test_dashboard_knob_defaults_off_and_is_checked():
    assert runtime_spec(make_config("runtime=ray")).dashboard is False
    assert runtime_spec(make_config("runtime=ray", "runtime.dashboard=true")).dashboard is True
    with pytest.raises(ConfigError, match="runtime.dashboard"):
        runtime_spec(make_config("runtime=ray", "runtime.dashboard=sometimes"))


def test_init_kwargs_follow_the_knob():
    off = ray_start.init_kwargs(RuntimeSpec(num_cpus=2, object_store_mb=100))
    assert off["include_dashboard"] is False
    assert off["num_cpus"] == 2 and off["object_store_memory"] == 100 * 1024 * 1024
    assert "runtime_env" not in off
    on = ray_start.init_kwargs(RuntimeSpec(dashboard=True, runtime_env={"env_vars": {"A": "1"}}))
    assert on["include_dashboard"] is True
    assert on["num_cpus"] == os.cpu_count() and on["object_store_memory"] is None
    assert on["runtime_env"] == {"env_vars": {"A": "1"}}
    joined = ray_start.init_kwargs(RuntimeSpec(address="10.0.0.5:6379"))
    assert "num_cpus" not in joined and "object_store_memory" not in joined  # the cluster's, not ours


def test_local_ray_is_lean_unless_the_dashboard_is_asked_for(recorded_init):
    from ray._private.node import Node

    saved = Node.start_api_server, Node.start_monitor
    assert ray_start.start_ray(RuntimeSpec(num_cpus=1)) is True
    assert ray_start.start_ray(RuntimeSpec(num_cpus=1, dashboard=True)) is True
    lean, full = recorded_init
    assert lean["address"] == "local" and lean["include_dashboard"] is False and lean["lean"] is True
    assert full["include_dashboard"] is True and full["lean"] is False
    assert (Node.start_api_server, Node.start_monitor) == saved  # restored after start-up


def test_lean_head_restores_ray_after_a_failed_start():
    from ray._private.node import Node

    saved = Node.start_api_server, Node.start_monitor
    with pytest.raises(RuntimeError), ray_start.lean_head():
        assert Node.start_monitor is ray_start._skip_monitor
        raise RuntimeError("ray.init failed")
    assert (Node.start_api_server, Node.start_monitor) == saved
    with ray_start.lean_head(False):
        assert (Node.start_api_server, Node.start_monitor) == saved


def test_parameter_server_imports_no_torch():
    """What a parameter-server actor unpickles (its class, FedAvg's server half, the round finalizer)
    imports numpy, not torch."""
    from raypfl.algorithms.fedavg import FedAvg
    from raypfl.runtime.finalize import RoundFinalizer

    payload = pickle.dumps((FedAvg().server_update, RoundFinalizer(seed=0)))
    code = (
        "import pickle, sys\n"
        "from raypfl.runtime.parameter_server import ParameterServer\n"
        f"pickle.loads({payload!r})\n"
        "assert 'torch' not in sys.modules, [m for m in sys.modules if m.startswith('torch')][:3]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]


def test_parameter_server_actor_is_torch_free(ray_session):
    """In a Ray worker of its own (its own runtime_env: no reused worker) the actor runs without torch."""
    import numpy as np

    from raypfl.algorithms.aggregate import MODEL
    from raypfl.algorithms.fedavg import FedAvg
    from raypfl.runtime.parameter_server import ParameterServer

    fresh = {"env_vars": {"RAYPFL_TEST_FRESH_WORKER": "ps"}}
    server_cls = ray_session.remote(ParameterServer).options(num_cpus=0, runtime_env=fresh)
    broadcast = ray_session.put({MODEL: np.zeros(4, np.float32)})
    server = server_cls.remote(broadcast, FedAvg().server_update, 2, 0, {}, None)
    try:
        pulled = ray_session.get(server.pull.remote(0))
        assert np.array_equal(pulled[MODEL], np.zeros(4, np.float32))
        loaded = ray_session.get(server.__ray_call__.remote(lambda _: "torch" in sys.modules), timeout=120)
        assert loaded is False
    finally:
        ray_session.kill(server)


def _ray_roles(root: psutil.Process) -> set[str]:
    names = set()
    for proc in root.children(recursive=True):
        try:
            command = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        for needle in ("dashboard/dashboard.py", "autoscaler/_private/monitor.py", "raylet", "gcs_server"):
            if needle in command:
                names.add(needle)
    return names


@pytest.mark.slow
def test_a_lean_local_ray_run_works(tmp_path):
    """A run with its own Ray (runtime.dashboard=false) and a runtime_env trains, and its tree has no
    dashboard nor autoscaler monitor."""
    command = [
        sys.executable,
        "-m",
        "raypfl",
        *SMALL_RUN[:-1],
        "runtime=ray",
        "runtime.num_cpus=2",
        "runtime.warm_start=false",
        "train.rounds=2",
        "runtime.runtime_env={env_vars:{RAYPFL_LEAN_TEST:'1'}}",  # the runtime-env agent still serves it
        f"hydra.run.dir={tmp_path}",
    ]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "WANDB_MODE": "disabled"}
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    seen: set[str] = set()
    done = threading.Event()

    def watch() -> None:
        root = psutil.Process(proc.pid)
        while not done.is_set():
            seen.update(_ray_roles(root))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        output, _ = proc.communicate(timeout=300)
    finally:
        done.set()
        watcher.join()
    assert proc.returncode == 0, output[-3000:]
    assert "after 2 rounds" in output
    assert {"raylet", "gcs_server"} <= seen  # the watcher saw the Ray
    assert "dashboard/dashboard.py" not in seen and "autoscaler/_private/monitor.py" not in seen
