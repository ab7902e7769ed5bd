"""Start a local Ray bound to the loopback, or join `runtime.address` within `runtime.connect_timeout_s`.

A local Ray (no `runtime.address`) listens on 127.0.0.1 only. Ray 2.60 binds its gRPC servers (GCS,
raylet, object manager, core workers), its agents and its metrics exporters to the loopback exactly when
the node's IP is a loopback address, and it takes the node's IP to be 127.0.0.1 only where multi-node
clusters are off (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, the Windows/macOS default). `loopback_only()`
turns that on while Ray starts: its processes inherit the variable, this process gets it back afterwards.

Joining (`runtime.address`) is checked before `ray.init`, which otherwise retries for minutes on a
wrong address: the address must accept a TCP connection, answer as a Ray GCS (its `GetClusterId` RPC)
and have a node on this machine (a driver joins through its local raylet), all within the timeout.
Each failure is a ConfigError (exit code 2) naming the key.

Memory: a local Ray starts no dashboard unless `runtime.dashboard=true`. With `include_dashboard=False`
Ray 2.60 still starts its dashboard process (`dashboard.py`, ~80 MB PSS, only its usage-stats module) and
the autoscaler monitor (~50 MB; it has nothing to scale on one fixed node); `lean_head()` skips both while
a local Ray starts. What stays: GCS, raylet, the log monitor (actor output reaches the console), and the
two agents the raylet always starts (dashboard agent, runtime-env agent: runtime_env keeps working). The
state API and job submission (`ray list`, `ray job`) need `runtime.dashboard=true`.
benchmarks/ray_memory.py measures each process.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray

from raypfl.config import RuntimeSpec
from raypfl.errors import ConfigError

log = logging.getLogger(__name__)

#: `runtime.connect_timeout_s` when the spec has none.
DEFAULT_CONNECT_TIMEOUT_S = 15.0
#: Ray turns multi-node support off (and the node IP into 127.0.0.1) when this is 0.
CLUSTER_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
#: The Ray Client server's default port (`ray://host` without a port).
RAY_CLIENT_PORT = 10001


def start_ray(spec: RuntimeSpec, key: str = "runtime.address") -> bool:
    """Start a local Ray (or join `spec.address`) unless one is already up; True if we started it.

    `key` names the setting the address came from in error messages (the Ray launcher has its own).
    """
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    kwargs = init_kwargs(spec)
    if spec.address:
        join_ray(spec.address, connect_timeout(spec), key, **kwargs)
    else:
        with loopback_only(), lean_head(not kwargs["include_dashboard"]):
            ray.init(address="local", **kwargs)
    return True


def init_kwargs(spec: RuntimeSpec) -> dict[str, Any]:
    """The `ray.init` keyword arguments of `spec` (besides the address): the dashboard only if
    `runtime.dashboard`; CPUs and object store of a local Ray; the runtime_env."""
    kwargs: dict[str, Any] = {
        "include_dashboard": bool(getattr(spec, "dashboard", False)),
        "logging_level": logging.WARNING,
        "log_to_driver": True,
    }
    if not spec.address:
        kwargs["num_cpus"] = spec.num_cpus or os.cpu_count()
        kwargs["object_store_memory"] = spec.object_store_mb * 1024 * 1024 if spec.object_store_mb else None
    runtime_env = getattr(spec, "runtime_env", None)
    if runtime_env:  # e.g. {working_dir: .} or {py_modules: [my_pkg]}: user code reaches every node
        kwargs["runtime_env"] = dict(runtime_env)
    return kwargs


@contextmanager
def lean_head(enabled: bool = True) -> Iterator[None]:
    """While active, a local Ray head starts neither its dashboard process nor the autoscaler monitor.

    Ray starts both in `Node.start_head_processes` whatever `include_dashboard` says; here those two
    `Node` methods do nothing until the head is up (the node then has no web UI URL, as without a dashboard).
    """
    if not enabled:
        yield
        return
    from ray._private.node import Node

    saved = Node.start_api_server, Node.start_monitor
    Node.start_api_server = _skip_api_server
    Node.start_monitor = _skip_monitor
    try:
        yield
    finally:
        Node.start_api_server, Node.start_monitor = saved


def _skip_api_server(node: Any, *args: Any, **kwargs: Any) -> None:
    log.debug("local Ray without a dashboard process (runtime.dashboard=false)")


def _skip_monitor(node: Any, *args: Any, **kwargs: Any) -> None:
    log.debug("local Ray without an autoscaler monitor (one fixed node)")


def connect_timeout(spec: RuntimeSpec) -> float:
    timeout = getattr(spec, "connect_timeout_s", None)
    if timeout is None:
        return DEFAULT_CONNECT_TIMEOUT_S
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise ConfigError(f"runtime.connect_timeout_s={timeout} must be a number of seconds > 0")
    return float(timeout)


@contextmanager
def loopback_only(enabled: bool = True) -> Iterator[None]:
    """While active, a Ray started (or joined) from this process takes 127.0.0.1 as its node IP.

    Ray reads the switch once, at import (`ray_constants.ENABLE_RAY_CLUSTER`), so the module constant
    is set too; the processes Ray spawns meanwhile (GCS, raylet, and through it the agents and the
    workers) inherit the environment variable.
    """
    if not enabled:
        yield
        return
    from ray._private import ray_constants

    saved_env = os.environ.get(CLUSTER_SWITCH)
    saved_constant = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[CLUSTER_SWITCH] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_constant
        if saved_env is None:
            os.environ.pop(CLUSTER_SWITCH, None)
        else:
            os.environ[CLUSTER_SWITCH] = saved_env


def join_ray(address: str, timeout: float, key: str = "runtime.address", **kwargs) -> None:
    """`ray.init(address=...)` after checking, within `timeout` seconds, that a Ray answers there."""
    deadline = time.monotonic() + timeout
    target = resolve_address(address, key)
    host, port = split_address(target, key)
    try:
        if target.startswith("ray://"):  # Ray Client: a gRPC server, with its own connection retries
            probe_grpc(host, port, deadline, f"{key}={address}")
            ray.init(address=target, **kwargs)
            return
        cluster_id = probe_gcs(host, port, deadline, f"{key}={address}")
        probe_local_node(target, cluster_id, deadline, f"{key}={address}")
        with loopback_only(_is_loopback(host)), bounded_ray_connect(max(1.0, deadline - time.monotonic())):
            ray.init(address=target, **kwargs)
    except (ConnectionError, RuntimeError, TimeoutError) as exc:
        if ray.is_initialized():
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{key}={address}: could not join the Ray cluster there: {first}") from exc


def resolve_address(address: str, key: str = "runtime.address", temp_dir: str | None = None) -> str:
    """`auto` -> the host:port of the Ray running on this machine (as Ray finds it); others unchanged.

    Ray's order for `auto`: RAY_ADDRESS, the last `ray start` (TEMP_DIR/ray_current_cluster), any
    running raylet's GCS address.
    """
    if address.strip() != "auto":
        return address.strip()
    from ray._private import services

    getattr(services.find_gcs_addresses, "cache_clear", lambda: None)()  # a Ray seen earlier may be gone
    try:
        found = services.get_ray_address_from_environment("auto", temp_dir)
    except ConnectionError as exc:
        raise ConfigError(
            f"{key}=auto: no running Ray found on this machine; start one with `ray start --head`, "
            f"give its host:port, or drop {key} to start a local Ray"
        ) from exc
    log.info("%s=auto: joining the Ray at %s", key, found)
    return found


def split_address(address: str, key: str = "runtime.address") -> tuple[str, int]:
    """host:port (or ray://host[:port]) -> (host, port); a ConfigError naming `key` if malformed."""
    client = address.startswith("ray://")
    rest = address[len("ray://") :].rstrip("/") if client else address
    if client and (":" not in rest or rest.endswith("]")):  # ray://host, ray://[::1]: the default port
        rest = f"{rest}:{RAY_CLIENT_PORT}"
    host, sep, port = rest.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"{key}={address} is not an address: use host:port of the head's GCS (e.g. 10.0.0.5:6379), "
            "auto (the Ray running on this machine), or ray://host:10001 (Ray Client)"
        )
    return host, int(port)


def probe_tcp(host: str, port: int, deadline: float, what: str) -> None:
    """A TCP connection to host:port before the deadline, or a ConfigError saying why not."""
    remaining = max(0.1, deadline - time.monotonic())
    try:
        with socket.create_connection((host, port), timeout=remaining):
            return
    except socket.gaierror as exc:
        reason = f"unknown host {host!r} ({exc.strerror})"
    except ConnectionRefusedError:
        reason = f"nothing listens on {host}:{port} (connection refused)"
    except TimeoutError:
        reason = f"{host}:{port} did not answer within {_seconds(remaining)}"
    except OSError as exc:
        reason = f"cannot reach {host}:{port} ({exc.strerror or exc})"
    raise ConfigError(f"{what}: {reason}; is the Ray head running there?")


def probe_grpc(host: str, port: int, deadline: float, what: str) -> None:
    """Check that host:port speaks gRPC (the HTTP/2 handshake completes) before the deadline."""
    import grpc
    from ray._common.network_utils import build_address
    from ray._private.grpc_utils import init_grpc_channel

    probe_tcp(host, port, deadline, what)
    remaining = max(0.1, deadline - time.monotonic())
    channel = init_grpc_channel(build_address(host, port))
    try:
        grpc.channel_ready_future(channel).result(timeout=remaining)
    except grpc.FutureTimeoutError:
        raise ConfigError(
            f"{what}: {host}:{port} accepts connections but gave no Ray answer within {_seconds(remaining)}"
        ) from None
    finally:
        channel.close()


def probe_gcs(host: str, port: int, deadline: float, what: str) -> str | None:
    """Check that host:port is a Ray GCS (it answers `GetClusterId`); its cluster id (hex), if told."""
    import grpc
    from ray._common.network_utils import build_address
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    probe_tcp(host, port, deadline, what)
    remaining = max(0.1, deadline - time.monotonic())
    channel = init_grpc_channel(build_address(host, port))
    try:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        reply = stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=remaining)
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return None  # a GCS with token auth: ray.init reports a missing or wrong token
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            reason = f"{host}:{port} accepts connections but gave no Ray answer within {_seconds(remaining)}"
        else:
            reason = f"{host}:{port} is not a Ray GCS ({code.name if code else exc})"
        raise ConfigError(
            f"{what}: {reason}; give the head's GCS address (port 6379 by `ray start --head`)"
        ) from None
    finally:
        channel.close()
    return reply.cluster_id.hex() if reply.cluster_id else None


def probe_local_node(address: str, cluster_id: str | None, deadline: float, what: str) -> None:
    """A driver joins through a raylet of the cluster on its own machine; check there is one in time."""
    from ray._private import services
    from ray._raylet import GcsClient

    if not services.find_node_ids():
        raise ConfigError(
            f"{what}: a Ray cluster answers there but none of its nodes runs on this machine; run "
            f"`ray start --address={address}` here first, or connect as a client (ray://HOST:10001)"
        )
    remaining = max(1, int(deadline - time.monotonic() + 0.999))
    try:
        with bounded_ray_connect(remaining):
            client = GcsClient(address=address, cluster_id=cluster_id)
        services.get_node_to_connect_for_driver(client, timeout_seconds=remaining)
    except Exception as exc:  # RuntimeError (no node), RpcError, ...: Ray's own wording follows
        raise ConfigError(
            f"{what}: a Ray cluster answers there but none of its nodes runs on this machine "
            f"(within {remaining} s); run `ray start --address={address}` here first, or connect as a "
            f"client (ray://HOST:10001)"
        ) from exc


@contextmanager
def bounded_ray_connect(timeout: float) -> Iterator[None]:
    """Cap Ray's own GCS-connection waits (C++ connect check, Python GcsClient, its retry loop).

    Ray reads these at import (RayConfig) and re-reads them on `Config.initialize`; a value the user
    set is kept. The previous environment comes back afterwards.
    """
    from ray._raylet import Config

    seconds = str(max(1, int(timeout + 0.999)))
    knobs = {
        "RAY_gcs_rpc_server_connect_timeout_s": seconds,
        "RAY_py_gcs_connect_timeout_s": seconds,
        "RAY_gcs_server_port_wait_time_s": "1",  # node.py: one GcsClient attempt, not 20 of them
    }
    added = {name: value for name, value in knobs.items() if name not in os.environ}
    os.environ.update(added)
    if added:
        Config.initialize("")
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def _is_loopback(host: str) -> bool:
    from ray._common.network_utils import is_localhost

    return is_localhost(host) or host.startswith("127.")


def _seconds(remaining: float) -> str:
    return f"{remaining:.0f} s" if remaining >= 1 else f"{remaining:.1f} s"
