"""Ray start-up (raypfl.runtime.ray_start): a wrong `runtime.address` fails fast with one line naming
the key, and a Ray started by a run (here: the session's) listens on the loopback only.

None of these tests starts a Ray of its own: the address probes fail before `ray.init`, and the
loopback check looks at the session's Ray (`ray_session`, started the way a run starts its Ray).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

from raypfl.config import RuntimeSpec, runtime_spec
from raypfl.errors import ConfigError
from raypfl.runtime import ray_start
from tests.conftest import REPO, make_config

#: 127.0.0.1:1 (tcpmux) is closed on any machine that runs these tests.
CLOSED = "127.0.0.1:1"


@pytest.fixture
def no_ray_init(monkeypatch):
    """start_ray as if no Ray were up in this process (the session's may be), with ray.init forbidden:
    a probe must reject the address before Ray is ever asked."""

    def forbidden(*args, **kwargs):
        raise AssertionError(f"ray.init was called: {args} {kwargs}")

    monkeypatch.setattr(ray_start.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_start.ray, "init", forbidden)


def _start(address: str, timeout: float = 20.0) -> tuple[str, float]:
    """start_ray(address) -> (its ConfigError's message, seconds taken); fails if it does not raise."""
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as info:
        ray_start.start_ray(RuntimeSpec(address=address, connect_timeout_s=timeout))
    return str(info.value), time.monotonic() - t0


def test_connect_timeout_is_a_runtime_key():
    spec = runtime_spec(make_config("runtime=ray"))
    assert spec.connect_timeout_s == 15
    assert runtime_spec(make_config("runtime=ray", "runtime.connect_timeout_s=3")).connect_timeout_s == 3


def test_closed_port_fails_fast(no_ray_init):
    message, took = _start(CLOSED)
    assert message.startswith(f"runtime.address={CLOSED}:")
    assert "connection refused" in message
    assert "\n" not in message
    assert took < 20


@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_open_port_that_is_not_ray_fails_within_the_timeout(scheme, no_ray_init):
    """A port that accepts TCP but never answers (not a GCS, not a Ray Client server) gives up after
    runtime.connect_timeout_s."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        address = f"{scheme}127.0.0.1:{server.getsockname()[1]}"
        message, took = _start(address, timeout=2)
    assert message.startswith(f"runtime.address={address}:")
    assert "no Ray answer within" in message
    assert 1.5 < took < 10


def test_open_port_that_hangs_up_is_not_a_gcs(no_ray_init):
    """A port that accepts and closes each connection (not gRPC at all) is rejected too, in time."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    stop = threading.Event()

    def hang_up():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            conn.close()

    thread = threading.Thread(target=hang_up, daemon=True)
    thread.start()
    address = f"127.0.0.1:{server.getsockname()[1]}"
    try:
        message, took = _start(address, timeout=3)
    finally:
        stop.set()
        thread.join(2)
        server.close()
    assert message.startswith(f"runtime.address={address}:")
    assert took < 10


@pytest.mark.parametrize(
    "address", ["foo", "10.0.0.5", "10.0.0.5:notaport", "10.0.0.5:0", "10.0.0.5:70000", ":6379"]
)
def test_malformed_address(address, no_ray_init):
    message, took = _start(address)
    assert message.startswith(f"runtime.address={address} is not an address")
    assert took < 1


def test_launcher_address_is_named_by_its_own_key(no_ray_init):
    with pytest.raises(ConfigError, match=r"^hydra\.launcher\.address=127\.0\.0\.1:1:"):
        ray_start.start_ray(RuntimeSpec(address=CLOSED), key="hydra.launcher.address")


def test_auto_without_a_running_ray(tmp_path, monkeypatch):
    """`auto` finds no Ray: no RAY_ADDRESS, no address file in the temp dir, no raylet (Ray's search,
    with the machine's running raylets hidden: the session's Ray, or someone else's, may be up)."""
    from ray._private import services

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: frozenset())
    with pytest.raises(ConfigError, match=r"^runtime\.address=auto: no running Ray found on this machine"):
        ray_start.resolve_address("auto", temp_dir=str(tmp_path))
    # the address of the last `ray start` is used if there is one (and then probed like any other)
    (tmp_path / "ray_current_cluster").write_text(CLOSED)
    assert ray_start.resolve_address("auto", temp_dir=str(tmp_path)) == CLOSED


def test_auto_with_a_stale_address_fails_fast(monkeypatch, no_ray_init):
    """RAY_ADDRESS (as `auto` reads it) names a Ray that is gone: the probe says so, in time."""
    monkeypatch.setenv("RAY_ADDRESS", CLOSED)
    message, took = _start("auto")
    assert message.startswith("runtime.address=auto:") and "connection refused" in message
    assert took < 20


def test_loopback_only_restores_the_environment(monkeypatch):
    from ray._private import ray_constants

    monkeypatch.delenv(ray_start.CLUSTER_SWITCH, raising=False)
    before = ray_constants.ENABLE_RAY_CLUSTER
    with ray_start.loopback_only():
        assert os.environ[ray_start.CLUSTER_SWITCH] == "0"
        assert ray_constants.ENABLE_RAY_CLUSTER is False
        from ray._private.services import get_node_ip_address

        assert get_node_ip_address() == "127.0.0.1" or ray_start.ray.is_initialized()
    assert before == ray_constants.ENABLE_RAY_CLUSTER
    assert ray_start.CLUSTER_SWITCH not in os.environ


@pytest.mark.slow
def test_cli_with_a_wrong_address_exits_2_with_one_line(tmp_path, data_root):
    args = [
        "model=mlp",
        "dataset.train_limit=2000",
        "dataset.test_limit=500",
        "clients.num=10",
        "clients.per_round=2",
        "runtime=ray",
        "train.rounds=1",
        f"runtime.address={CLOSED}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "raypfl", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=os.environ.copy(),
    )
    took = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: runtime.address={CLOSED}:")
    assert took < 90  # the process's own start-up (imports, data) dominates; the probe is instant


LOOPBACK_PREFIXES = ("127.", "::ffff:127.")


def _is_loopback(ip: str) -> bool:
    return ip == "::1" or ip.startswith(LOOPBACK_PREFIXES)


def _session_listeners(session_dir: str) -> dict[str, list[str]]:
    """{'name pid (command line)': [listening TCP addresses]} of this Ray session's processes: every
    process whose command line names the session dir (GCS, raylet, autoscaler monitor, dashboard head)
    and their descendants (agents and workers rename themselves, e.g. ray::DashboardAgent).

    The test process itself is left out: other tests open sockets in it that are not Ray's (MPICH's
    MPI_Init in test_mpi.py listens on the host's address), and its Ray core-worker socket is the same
    kind as every worker's, which are checked."""
    procs: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if session_dir in " ".join(proc.info["cmdline"] or []):
                procs[proc.pid] = proc
                procs.update((child.pid, child) for child in proc.children(recursive=True))
        except psutil.Error:
            continue
    listeners: dict[str, list[str]] = {}
    for pid, proc in procs.items():
        try:
            conns = proc.net_connections("tcp")
            name = proc.name()
        except psutil.Error:
            continue
        addresses = [f"{c.laddr.ip}:{c.laddr.port}" for c in conns if c.status == psutil.CONN_LISTEN]
        if addresses:
            try:  # the command line says which process it is when the test fails
                name = f"{name} {pid} ({' '.join(proc.cmdline())[:120]})"
            except psutil.Error:
                name = f"{name} {pid}"
            listeners[name] = addresses
    return listeners


@pytest.mark.slow
def test_a_local_ray_listens_on_the_loopback_only(ray_session):
    """Every TCP port of the session's Ray (started as a run starts its Ray) is on 127.0.0.1: GCS,
    raylet (node manager, object manager), core workers, the agents, the metrics exporters."""
    ray = ray_session

    @ray.remote(num_cpus=0)
    def ping() -> int:
        return os.getpid()

    ray.get(ping.remote())  # at least one worker, with its core-worker port
    session_dir = ray._private.worker._global_node.get_session_dir_path()
    deadline = time.monotonic() + 20
    while True:  # the agents start in the background: wait for them (within a bound)
        listeners = _session_listeners(session_dir)
        names = " ".join(listeners)
        if all(n in names for n in ("gcs_server", "raylet", "DashboardA", "RuntimeEnv")):
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert any(n.startswith("gcs_server") for n in listeners), listeners
    assert any(n.startswith("raylet") for n in listeners), listeners
    exposed = {}
    for name, addresses in listeners.items():
        outside = [a for a in addresses if not _is_loopback(a.rsplit(":", 1)[0])]
        if outside:
            exposed[name] = outside
    assert not exposed, f"Ray ports open beyond the loopback: {exposed}"
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")


def test_runtime_env_reaches_ray_init(monkeypatch):
    """`runtime.runtime_env` (e.g. py_modules with the user's own `_target_` code) is handed to ray.init."""
    seen: dict = {}
    monkeypatch.setattr(ray_start.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_start.ray, "init", lambda **kwargs: seen.update(kwargs))
    spec = RuntimeSpec(num_cpus=1, runtime_env={"py_modules": ["examples"]})
    assert ray_start.start_ray(spec) is True
    assert seen["runtime_env"] == {"py_modules": ["examples"]} and seen["address"] == "local"
    seen.clear()
    ray_start.start_ray(RuntimeSpec(num_cpus=1))
    assert "runtime_env" not in seen
