"""`prefixcache serve` as a real process (local Ray, embedded Valkey): ready line, serving, auth from the
environment, `prefixcache stats`, and a SIGTERM shutdown that leaves no process of its session behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import grpc
import pytest

from protos.prefixcache.v1 import generation_pb2 as pb
from protos.prefixcache.v1 import generation_pb2_grpc
from tests.stack_process import (free_port, prefixcache_cmd, process_env, session_pids, start_session, stop_session,
                                 tail, wait_for_stack)

pytestmark = pytest.mark.timeout(240)


def test_serve_serves_reports_stats_and_stops_cleanly(tmp_path):
    port, metrics_port, cs_port = free_port(), free_port(), free_port()
    env = process_env()
    env["PREFIXCACHE_AUTH_TOKENS"] = "tok-a=alpha,tok-b=beta"
    log = tmp_path / "serve.log"
    proc = start_session(prefixcache_cmd(
        "serve", "--workers", "2", "--num-blocks", "64", "--port", str(port), "--metrics-port", str(metrics_port),
        "--cache-service-port", str(cs_port)), log, env=env)
    try:
        wait_for_stack(proc, port, metrics_port, log, timeout_s=150)
        assert f"ready router=127.0.0.1:{port} metrics=http://127.0.0.1:{metrics_port}/metrics" in log.read_text()
        prompt = list(range(40, 120))
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = generation_pb2_grpc.GenerationStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(pb.GenerateRequest(token_ids=prompt), timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            auth = [("authorization", "Bearer tok-a")]
            r1 = stub.Generate(pb.GenerateRequest(token_ids=prompt, sampling=pb.SamplingParams(max_tokens=4)),
                               metadata=auth, timeout=60)
            r2 = stub.Generate(pb.GenerateRequest(token_ids=prompt, sampling=pb.SamplingParams(max_tokens=4)),
                               metadata=auth, timeout=60)
        assert r1.worker_id in ("worker-0", "worker-1") and r2.usage.cached_tokens == 64
        stats = subprocess.run([sys.executable, "-m", "deploy.cli", "stats", "--metrics-url",
                                f"http://127.0.0.1:{metrics_port}/metrics"], capture_output=True, text=True,
                               timeout=60, env=env)
        assert stats.returncode == 0, stats.stderr
        total = next(line for line in stats.stdout.splitlines() if line.startswith("total"))
        assert total.split()[1:6] == ["2", "1", "160", "64", "40.0%"], stats.stdout  # 1: the unauthenticated call
        assert "alpha" in stats.stdout
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, tail(log)
        deadline = time.monotonic() + 15
        while session_pids(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert session_pids(proc.pid) == [], tail(log)
        assert "shutting down" in log.read_text()
    finally:
        stop_session(proc)


def test_serve_rejects_a_bad_auth_file(tmp_path):
    bad = tmp_path / "tokens.json"
    bad.write_text("[1]")
    result = subprocess.run(prefixcache_cmd("serve", "--auth-tokens", str(bad), "--port", str(free_port())),
                            capture_output=True, text=True, timeout=120, env=process_env())
    assert result.returncode == 1
    assert "must hold a JSON object" in result.stderr
