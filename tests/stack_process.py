"""Helpers for tests that run real processes: free ports, `prefixcache serve` as a subprocess, stopping by PID.

Everything a test starts is stopped by that test: each process is started in its own session
(``start_new_session``), and ``stop_session`` kills every process of that session by PID (the Ray raylet's
workers, for example, live in their own process groups but keep the session), never by name.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(local_ray: bool = False) -> dict[str, str]:
    """The environment of a process a test starts; ``local_ray``: a bare ``ray.init()`` in it starts a new
    local Ray instead of joining whatever cluster another process on this machine recorded in
    /tmp/ray/ray_current_cluster (RAY_ADDRESS=local only applies where no address is given)."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    if local_ray:
        env["RAY_ADDRESS"] = "local"
    return env


def session_pids(sid: int) -> list[int]:
    """PIDs of every live process whose session id is ``sid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        # Fields after the ")" that closes the command name: state ppid pgrp session ...
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 3 and int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def stop_session(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM the process, then SIGKILL whatever of its session is still alive after ``grace_s``."""
    sid = proc.pid
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            pass
    for pid in session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.1)


def start_session(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``cmd`` in a new session (its own process group and session id), output to ``log_path``."""
    log = open(log_path, "wb")  # noqa: SIM115  (closed with the process by the OS; the test reads it on failure)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env or process_env(), cwd=REPO,
                            start_new_session=True)


def prefixcache_cmd(*args: str) -> list[str]:
    # `serve` binds its HTTP front door on 8000 by default: a shared test machine may have it taken, so a
    # test that does not name --http-port (a free port of its own) gets it off.
    if args and args[0] == "serve" and not any(a == "--http-port" or a.startswith("--http-port=") for a in args):
        args = (*args, "--http-port", "0")
    return [sys.executable, "-m", "deploy.cli", *args]


def wait_for_stack(proc: subprocess.Popen, port: int, metrics_port: int, log_path: Path,
                   timeout_s: float = 120.0) -> None:
    """Until the router answers a health check on ``port`` and /metrics on ``metrics_port``."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    last_error = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefixcache serve exited with {proc.returncode}:\n{tail(log_path)}")
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            if resp.status == health_pb2.HealthCheckResponse.SERVING:
                urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2).read()
                return
            last_error = f"health status {resp.status}"
        except Exception as exc:  # not up yet
            last_error = repr(exc)
        time.sleep(0.5)
    raise RuntimeError(f"stack not ready after {timeout_s}s ({last_error}):\n{tail(log_path)}")


def tail(path: Path, num_lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-num_lines:])
    except OSError:
        return "(no log)"
