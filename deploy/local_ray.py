"""The Ray a stack runs on: the one this process already joined, a cluster at an address, or a local Ray of
its own, whose start is retried once when Ray's own start-up waits time out.

    owns_ray = join_or_start_ray(ray_address, num_cpus)   # True: a local Ray we must ray.shutdown()
    ...
    if owns_ray: ray.shutdown()

A Ray we joined is never stopped by us (no ``ray stop``): only a local Ray we started is shut down. Ray is
imported inside the functions so that importing this module (and ``deploy.stack``) stays cheap.
"""

from __future__ import annotations

import contextlib
import os
import signal

from common.logs import get_logger

__all__ = ["join_or_start_ray", "kill_ray_children", "start_local_ray"]

log = get_logger("serve")

# What Ray's exception says when its GCS or raylet did not come up in time (Ray raises a bare Exception).
_RAY_START_TIMEOUTS = ("timed out during startup", "Timed out waiting for file")


def join_or_start_ray(ray_address: str | None, num_cpus: int) -> bool:
    """Make this process a Ray driver. Returns True when it started a local Ray (``num_cpus`` CPUs) that
    the caller owns and must shut down; False when Ray was already initialised here (the tests' cluster)
    or it joined ``ray_address``."""
    import ray

    if ray.is_initialized():
        return False
    if ray_address:
        ray.init(address=ray_address, log_to_driver=False)
        return False
    start_local_ray(num_cpus)
    return True


def start_local_ray(num_cpus: int, attempts: int = 2) -> None:
    """Start a Ray of our own. If its GCS or raylet does not come up within Ray's own waits (30 s each;
    RAY_gcs_server_port_wait_time_s sets the first), the start is retried once, after killing what the
    failed one left running. A start that fails for good is shut down before the error is raised, so the
    caller owns nothing then."""
    import ray

    for attempt in range(1, attempts + 1):
        try:
            # "local": a new Ray of our own, never whatever cluster /tmp/ray/ray_current_cluster names.
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
            return
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception for these
            if not any(t in str(exc) for t in _RAY_START_TIMEOUTS) or attempt == attempts:
                with contextlib.suppress(Exception):
                    ray.shutdown()
                raise
            log.warning("local Ray timed out during startup; retrying once", extra={"error": str(exc)})
            ray.shutdown()
            kill_ray_children()  # a start that failed half way leaves its GCS/raylet running, unowned


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
