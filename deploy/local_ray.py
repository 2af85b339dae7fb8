"""The Ray a stack runs on: the one this process already joined, a cluster at an address, or a local Ray of
its own, whose start is retried once when Ray's own start-up waits time out.

    owns_ray = join_or_start_ray(ray_address, num_cpus, host)   # True: a local Ray we must ray.shutdown()
    ...
    if owns_ray: ray.shutdown()

A local Ray listens where the stack's ``--host`` says: on a loopback host its node IP is 127.0.0.1, and Ray
2.x then binds every listener of its own (GCS, raylet and object manager, the core workers' gRPC servers, the
runtime-env and dashboard agents, the metrics exporter) to 127.0.0.1 instead of all interfaces; no dashboard
is started. A joined cluster listens where its ``ray start`` put it.

A Ray we joined is never stopped by us (no ``ray stop``): only a local Ray we started is shut down. Ray is
imported inside the functions so that importing this module (and ``deploy.stack``) stays cheap.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Iterator

from common.logs import get_logger

__all__ = ["join_or_start_ray", "kill_ray_children", "local_ray_node_ip", "start_local_ray"]

log = get_logger("serve")

# What Ray's exception says when its GCS or raylet did not come up in time (Ray raises a bare Exception).
_RAY_START_TIMEOUTS = ("timed out during startup", "Timed out waiting for file")


def join_or_start_ray(ray_address: str | None, num_cpus: int, host: str | None = None) -> bool:
    """Make this process a Ray driver. Returns True when it started a local Ray (``num_cpus`` CPUs, its
    listeners on ``host`` as ``local_ray_node_ip`` says) that the caller owns and must shut down; False
    when Ray was already initialised here (the tests' cluster) or it joined ``ray_address``."""
    import ray

    if ray.is_initialized():
        return False
    if ray_address:
        ray.init(address=ray_address, log_to_driver=False)
        return False
    start_local_ray(num_cpus, host)
    return True


def local_ray_node_ip(host: str | None) -> str | None:
    """The node IP a local Ray gets for the stack's ``--host``: 127.0.0.1 for any loopback host (Ray binds
    loopback only for exactly that IP), the host itself for one specific interface, and None (Ray picks
    the machine's IP; its listeners take every interface) for a wildcard or no host."""
    from workers.ray_env import is_loopback, is_wildcard

    if host is None or is_wildcard(host):
        return None
    return "127.0.0.1" if is_loopback(host) else host


def start_local_ray(num_cpus: int, host: str | None = None, attempts: int = 2) -> None:
    """Start a Ray of our own. If its GCS or raylet does not come up within Ray's own waits (30 s each;
    RAY_gcs_server_port_wait_time_s sets the first), the start is retried once, after killing what the
    failed one left running. A start that fails for good is shut down before the error is raised, so the
    caller owns nothing then."""
    import ray

    node_ip = local_ray_node_ip(host)
    where = {} if node_ip is None else {"_node_ip_address": node_ip}
    for attempt in range(1, attempts + 1):
        try:
            # "local": a new Ray of our own, never whatever cluster /tmp/ray/ray_current_cluster names.
            with _loopback_allowed(node_ip == "127.0.0.1"):
                ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                         **where)
            return
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception for these
            if not any(t in str(exc) for t in _RAY_START_TIMEOUTS) or attempt == attempts:
                with contextlib.suppress(Exception):
                    ray.shutdown()
                raise
            log.warning("local Ray timed out during startup; retrying once", extra={"error": str(exc)})
            ray.shutdown()
            kill_ray_children()  # a start that failed half way leaves its GCS/raylet running, unowned


@contextlib.contextmanager
def _loopback_allowed(loopback: bool) -> Iterator[None]:
    """Let ``ray.init`` keep a node IP of 127.0.0.1. On Linux, Ray replaces it with the machine's IP
    (``services.resolve_ip_for_localhost``) unless Ray clusters are disabled, as they are on macOS and
    Windows; with them disabled the node IP stays 127.0.0.1, and Ray's servers then listen on loopback only.
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 says the same, but Ray reads it once, when it is imported: too late
    for a stack started in a process that imported Ray already (the tests). Only the start needs it: once
    the node runs, every Ray process asks the node for its IP."""
    if not loopback:
        yield
        return
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def kill_ray_children() -> None:
    """SIGKILL this process's child processes that run Ray's binaries or scripts (Linux: read from /proc).
    Other children (the embedded Valkey) are left alone."""
    me = os.getpid()
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                # The command name (field 2) may hold spaces and parentheses: the parent pid is the second
                # field after its closing parenthesis.
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ")
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
        if ppid == me and b"/ray/" in cmdline:
            with contextlib.suppress(OSError):  # it may have exited since
                os.kill(int(entry), signal.SIGKILL)
