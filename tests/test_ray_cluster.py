"""`prefixcache serve --ray-address` on a real multi-raylet Ray cluster started with the `ray` CLI.

Raylets on this machine: `ray start --head ... --block` and `ray start --address ... --block`, each in its own
session (RAY_AUTH_MODE=disabled for every process). The stack must place one worker per raylet, serve through
both, start a worker on a third raylet that joins while it serves (and route to it), keep answering when the
second raylet dies, and its cache index must forget that node's blocks. Every process is stopped by PID (the
whole session of each `ray start`), never with `ray stop`.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import urllib.request

import grpc
import pytest

from cache_service.block_hash import hash_prompt_blocks
from common.cluster_auth import Member, SharedSecret
from protos.prefixcache.v1 import cache_pb2, cache_pb2_grpc, generation_pb2, generation_pb2_grpc
from stack_process import (free_port, prefixcache_cmd, process_env, start_session, stop_session, tail,
                                 wait_for_stack)

pytestmark = pytest.mark.timeout(240)

BLOCK_SIZE = 16
_NODES_SCRIPT = """
import json, sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
deadline = time.monotonic() + 60
while True:
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) >= int(sys.argv[2]) or time.monotonic() > deadline:
        break
    time.sleep(0.2)
print(json.dumps([{"node_id": n["NodeID"], "head": any(k.startswith("node:__internal_head__") for k in n["Resources"])}
                  for n in nodes]))
"""


def _ray_start(args: list[str], log: Path) -> subprocess.Popen:
    ray_cli = str(Path(sys.executable).with_name("ray"))
    return start_session([ray_cli, "start", "--block", "--disable-usage-stats", *args], log)


def _raylet_ports() -> list[str]:
    # Explicit free ports for every listener, so the cluster never collides with another one on this machine.
    return ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
            "--object-store-memory", str(80 * 1024 * 1024)]


def _alive_nodes(address: str, expect: int) -> list[dict]:
    out = subprocess.run([sys.executable, "-c", _NODES_SCRIPT, address, str(expect)], env=process_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _node_ip() -> str:
    import ray._private.services as services

    return services.get_node_ip_address()


def _generate(stub, token_ids: list[int], target_worker: str = "", timeout: float = 60.0):
    return stub.Generate(generation_pb2.GenerateRequest(
        token_ids=token_ids, target_worker=target_worker,
        sampling=generation_pb2.SamplingParams(max_tokens=4, ignore_eos=True)), timeout=timeout)


# The stack's cluster secret (the test writes it and hands it to `serve`): the cache service serves members only.
SECRET = SharedSecret(b"test-ray-cluster-secret-0123456789")
OPERATOR, ROUTER = Member("operator", SECRET), Member("router", SECRET)


def _stats(cache_stub) -> dict[str, cache_pb2.NodeStats]:
    metadata = OPERATOR.call_metadata("/prefixcache.v1.CacheService/GetStats")
    return {n.node.node_id: n for n in cache_stub.GetStats(cache_pb2.GetStatsRequest(), timeout=10,
                                                           metadata=metadata).nodes}


def _workers_up(metrics_port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return {m[1]: float(m[2]) for m in re.finditer(r'^prefixcache_worker_up\{worker="([^"]+)"\} (\S+)$', text, re.M)}


def _lookup(cache_stub, token_ids: list[int]) -> dict[str, int]:
    hashes = hash_prompt_blocks(token_ids, BLOCK_SIZE, "demo", "")
    resp = cache_stub.Lookup(cache_pb2.LookupRequest(block_hashes=[bytes(h) for h in hashes], model_id="demo"),
                             timeout=10, metadata=ROUTER.call_metadata("/prefixcache.v1.CacheService/Lookup"))
    return {m.node_id: m.num_blocks for m in resp.matches}


def test_serve_on_raylets_takes_in_a_joining_one_and_survives_losing_one():
    tmp = Path(tempfile.mkdtemp(prefix="pcray", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    gcs_port, port, metrics_port, cs_port = free_port(), free_port(), free_port(), free_port()
    ip = _node_ip()
    address = f"{ip}:{gcs_port}"
    procs: dict[str, subprocess.Popen] = {}
    try:
        procs["head"] = _ray_start(
            ["--head", "--port", str(gcs_port), "--num-cpus", "1", "--num-gpus", "0", "--temp-dir", str(tmp / "ray"),
             "--include-dashboard", "false", "--ray-client-server-port", str(free_port()),
             "--dashboard-port", str(free_port()), *_raylet_ports()], tmp / "head.log")
        assert len(_alive_nodes(address, 1)) == 1, tail(tmp / "head.log")
        procs["second"] = _ray_start(
            ["--address", address, "--num-cpus", "1", "--num-gpus", "0", *_raylet_ports()], tmp / "second.log")
        nodes = _alive_nodes(address, 2)
        assert len(nodes) == 2, tail(tmp / "second.log")
        head_node = next(n["node_id"] for n in nodes if n["head"])
        second_node = next(n["node_id"] for n in nodes if not n["head"])

        # Several raylets are the multi-machine case: the stack listens on every interface (--host 0.0.0.0),
        # so each worker advertises its own node's IP to its peers (with the default --host 127.0.0.1 every
        # listener stays on loopback, which only a one-machine stack can use).
        (tmp / "cluster-secret").write_bytes(SECRET.secret)
        procs["serve"] = start_session(prefixcache_cmd(
            "serve", "--ray-address", address, "--host", "0.0.0.0", "--workers", "2", "--model", "demo",
            "--port", str(port),
            "--metrics-port", str(metrics_port), "--cache-service-port", str(cs_port), "--num-blocks", "128",
            "--cluster-secret-file", str(tmp / "cluster-secret")), tmp / "serve.log")
        wait_for_stack(procs["serve"], port, metrics_port, tmp / "serve.log", timeout_s=150)

        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch, grpc.insecure_channel(f"127.0.0.1:{cs_port}") as cch:
            stub, cache_stub = generation_pb2_grpc.GenerationStub(ch), cache_pb2_grpc.CacheServiceStub(cch)
            # One worker per raylet, each registered with its own node.
            stats = _stats(cache_stub)
            assert sorted(stats) == ["worker-0", "worker-1"], tail(tmp / "serve.log")
            by_ray_node = {s.node.ray_node_id: w for w, s in stats.items()}
            assert sorted(by_ray_node) == sorted([head_node, second_node]), by_ray_node
            lost_worker, kept_worker = by_ray_node[second_node], by_ray_node[head_node]
            assert stats[lost_worker].node.transfer_address.rsplit(":", 1)[0] == ip

            # A third machine joins while the stack serves (the stack gets elastic by default with
            # --ray-address): it gets worker-2, registered with its own node, in rotation. Its raylet and
            # worker start while the two first workers serve below.
            procs["third"] = _ray_start(
                ["--address", address, "--num-cpus", "1", "--num-gpus", "0", *_raylet_ports()], tmp / "third.log")
            joined_at = time.monotonic()

            # Generate through both (pinned with target_worker), then once routed.
            prompts = {w: [(7 * i + 13 * k) % 256 for i in range(3 * BLOCK_SIZE + 5)]
                       for k, w in enumerate((kept_worker, lost_worker), start=1)}
            for w, prompt in prompts.items():
                resp = _generate(stub, prompt, target_worker=w)
                assert resp.worker_id == w and resp.usage.completion_tokens == 4
            assert _generate(stub, prompts[kept_worker]).usage.completion_tokens == 4
            deadline = time.monotonic() + 20
            while _lookup(cache_stub, prompts[lost_worker]).get(lost_worker) != 3:
                assert time.monotonic() < deadline, _lookup(cache_stub, prompts[lost_worker])
                time.sleep(0.2)
            assert _lookup(cache_stub, prompts[kept_worker]).get(kept_worker) == 3

            deadline = joined_at + 90
            while True:
                node = _stats(cache_stub).get("worker-2")
                if node is not None and node.alive and _workers_up(metrics_port).get("worker-2") == 1.0:
                    break
                assert time.monotonic() < deadline, (node, tail(tmp / "third.log"), tail(tmp / "serve.log"))
                time.sleep(0.5)
            third_node = node.node.ray_node_id
            assert third_node not in (head_node, second_node) and third_node, third_node
            joined = "worker-2"
            resp = _generate(stub, prompts[kept_worker][:20] + [9] * 30, target_worker=joined)
            assert resp.worker_id == joined and resp.usage.completion_tokens == 4
            print(f"worker-2 in rotation {time.monotonic() - joined_at:.1f}s after its raylet started")

            # The second machine dies (SIGKILL of every process of that raylet).
            stop_session(procs.pop("second"), grace_s=0)

            # The index forgets the lost node: no lookup matches it and its entries are gone.
            deadline = time.monotonic() + 60
            while True:
                matches = _lookup(cache_stub, prompts[lost_worker])
                node = _stats(cache_stub).get(lost_worker)
                if lost_worker not in matches and (node is None or (not node.alive and node.num_indexed_blocks == 0)):
                    break
                assert time.monotonic() < deadline, (matches, node, tail(tmp / "serve.log"))
                time.sleep(0.5)
            assert _lookup(cache_stub, prompts[kept_worker]).get(kept_worker) == 3

            # The service keeps answering, on the surviving workers, for old and new prompts alike.
            for prompt in (prompts[lost_worker], prompts[kept_worker], [5] * 40):
                resp = _generate(stub, prompt)
                assert resp.worker_id in (kept_worker, joined) and resp.usage.completion_tokens == 4
            assert _generate(stub, prompts[kept_worker]).worker_id == kept_worker  # where its prefix is
            # Asking for the lost worker by name is a clean error, not a hang.
            with pytest.raises(grpc.RpcError) as err:
                _generate(stub, prompts[lost_worker], target_worker=lost_worker, timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
            # The lost worker is out for good and not restarted anywhere: no worker-3 was started.
            deadline = time.monotonic() + 30
            while "retired" not in (tmp / "serve.log").read_text():  # the watcher saw the node die
                assert time.monotonic() < deadline, tail(tmp / "serve.log")
                time.sleep(0.5)
            assert _workers_up(metrics_port) == {kept_worker: 1.0, lost_worker: 0.0, joined: 1.0}
            assert sorted(_stats(cache_stub)) == ["worker-0", "worker-1", "worker-2"]
    finally:
        for name in ("serve", "third", "second", "head"):
            if name in procs:
                stop_session(procs.pop(name))
        shutil.rmtree(tmp, ignore_errors=True)
