"""Helpers for tests that run real processes: free ports, `prefixcache serve` as a subprocess, stopping by PID,
and the listening TCP sockets of a set of processes (``listening_sockets``, read from /proc).

Everything a test starts is stopped by that test: each process is started in its own session
(``start_new_session``), and ``stop_session`` kills every process of that session by PID (the Ray raylet's
workers, for example, live in their own process groups but keep the session), never by name.
"""

from __future__ import annotations

import ipaddress
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


def _live_processes(field: int, value: int) -> list[int]:
    """PIDs of every live (not zombie) process whose /proc stat field ``field`` (counted after the command
    name: 0 state, 1 ppid, 2 pgrp, 3 session) is ``value``."""
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
        if len(fields) > field and int(fields[field]) == value and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def session_pids(sid: int) -> list[int]:
    """PIDs of every live process whose session id is ``sid``."""
    return _live_processes(3, sid)


def child_pids(ppid: int) -> list[int]:
    """PIDs of the live children of process ``ppid``."""
    return _live_processes(1, ppid)


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


# ---- listening sockets (no psutil: /proc/net/tcp{,6} and /proc/<pid>/fd) ----------------------------------------

TCP_LISTEN = "0A"  # the `st` column of /proc/net/tcp for a listening socket


def _decode_address(hex_address: str) -> str:
    """/proc/net/tcp writes an address as 32-bit words in host (little-endian) byte order."""
    raw = bytes.fromhex(hex_address)
    address = ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))
    # A dual-stack socket bound to an IPv4 address shows it IPv4-mapped (::ffff:127.0.0.1): name the IPv4 one.
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


def _listening_inodes() -> dict[int, tuple[str, int]]:
    """{socket inode: (address, port)} of every listening TCP socket in this network namespace."""
    inodes: dict[int, tuple[str, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as f:
                lines = f.read().splitlines()[1:]  # the first line names the columns
        except OSError:
            continue  # no IPv6 in this kernel
        for line in lines:
            fields = line.split()
            if fields[3] != TCP_LISTEN:
                continue
            address, _, port = fields[1].partition(":")
            inodes[int(fields[9])] = (_decode_address(address), int(port, 16))
    return inodes


def listening_sockets(pids: list[int]) -> list[tuple[int, str, str, int]]:
    """(pid, command name, address, port) of every listening TCP socket the processes ``pids`` hold, sorted.
    A socket shared by several of them (inherited) is listed once per holder."""
    inodes = _listening_inodes()
    found = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
                name = f.read().strip()
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # gone meanwhile
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and int(target[8:-1]) in inodes:
                found.append((pid, name, *inodes[int(target[8:-1])]))
    return sorted(set(found))
