"""Trust: a stack listens where it is told, and its embedded Valkey survives being killed.

- ``prefixcache serve --host 127.0.0.1`` (a real process, local Ray, embedded Valkey): every listening TCP
  socket of every process of its session (router, metrics, cache service, Valkey, the workers' BlockTransfer
  and raw stream, and Ray's own GCS, raylet, agents and core workers) is on loopback, and the workers
  advertise loopback BlockTransfer addresses.
- The stack's embedded Valkey killed with SIGKILL is started again on its port from its append-only file:
  GetStats answers again, the index holds exactly what every worker caches, new blocks are indexed, and a
  pin made before the kill is still assigned, held and hit on its replicas.
- The rules that map ``--host`` to bind and advertise addresses, and the supervisor on its own.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import time

import grpc
import pytest

from cache_service.block_hash import hash_prompt_blocks
from cache_service.embedded_redis import EmbeddedRedis, connect_sync
from protos.prefixcache.v1 import cache_pb2
from protos.prefixcache.v1 import generation_pb2 as pb
from protos.prefixcache.v1 import generation_pb2_grpc
from common.cluster_auth import SharedSecret
from tests.cache_fixtures import member_stub
from tests.stack_process import (free_port, listening_sockets, prefixcache_cmd, session_pids, start_session,
                                 stop_session, tail, wait_for_stack)

pytestmark = pytest.mark.timeout(240)

BS = 16


def wait_for(predicate, what: str, timeout_s: float = 60.0):
    """Poll ``predicate`` until it returns something truthy (returned) or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# ---- the host rules -------------------------------------------------------------------------------------------

def test_host_rules_bind_and_advertise(monkeypatch):
    from deploy.local_ray import local_ray_node_ip
    from deploy.stack import StackConfig
    from workers import ray_env

    monkeypatch.setattr(ray_env, "node_ip", lambda: "10.1.2.3")
    # Loopback and wildcards mean the same on every machine; a specific address is one machine's, so a
    # worker elsewhere binds its own node's IP instead.
    assert [ray_env.bind_host(h) for h in ("127.0.0.1", "localhost", "::1", "0.0.0.0", "::", "10.9.9.9", None)] == \
        ["127.0.0.1", "localhost", "::1", "0.0.0.0", "::", "10.1.2.3", "10.1.2.3"]
    assert [ray_env.advertise_host(h) for h in ("127.0.0.1", "0.0.0.0", "::", "10.9.9.9")] == \
        ["127.0.0.1", "10.1.2.3", "10.1.2.3", "10.9.9.9"]
    assert [local_ray_node_ip(h) for h in ("127.0.0.1", "localhost", "::1", "0.0.0.0", "::", None, "10.9.9.9")] == \
        ["127.0.0.1", "127.0.0.1", "127.0.0.1", None, None, None, "10.9.9.9"]
    assert [StackConfig(host=h, advertise_host=a).dial_host() for h, a in [
        ("127.0.0.1", None), ("0.0.0.0", None), ("0.0.0.0", "head.example"), ("10.9.9.9", None)]] == \
        ["127.0.0.1", "10.1.2.3", "head.example", "10.9.9.9"]


def test_serve_passes_advertise_host_to_the_stack():
    import argparse

    from deploy.serve import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args(["--host", "0.0.0.0", "--advertise-host", "10.0.0.7"]))
    assert (config.host, config.advertise_host, config.dial_host()) == ("0.0.0.0", "10.0.0.7", "10.0.0.7")
    assert config_from_args(parser.parse_args([])).advertise_host is None


# ---- the supervisor -------------------------------------------------------------------------------------------

def test_a_killed_supervised_valkey_restarts_on_its_port_with_its_data():
    server = EmbeddedRedis(supervise=True, durable=True)
    url = server.start()
    data_dir = server._data_dir
    try:
        connect_sync(url).hset("pc:probe", mapping={"a": "1", "b": "2"})
        first = server.pid
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: server.pid not in (None, first) and server.is_running(), "the restarted Valkey")
        assert (server.url, server.num_restarts) == (url, 1)
        assert connect_sync(url).hgetall("pc:probe") == {b"a": b"1", b"b": b"2"}  # from the append-only file
    finally:
        server.stop()
    # stop() is no crash: nothing restarts, and the files go; a start after it is empty (tests rely on that).
    assert (server.is_running(), server.num_restarts, os.path.exists(data_dir)) == (False, 1, False)
    server.start()
    try:
        assert server.url == url and connect_sync(url).exists("pc:probe") == 0
    finally:
        server.stop()


# ---- a real `prefixcache serve --host 127.0.0.1` -------------------------------------------------------------

def is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


def test_serve_on_loopback_listens_on_loopback_only(tmp_path):
    port, metrics_port, cs_port = free_port(), free_port(), free_port()
    secret_file = tmp_path / "cluster-secret"  # the cache service serves members only: we call as an operator
    secret_file.write_text("test-trust-bind-secret-0123456789")
    log = tmp_path / "serve.log"
    proc = start_session(prefixcache_cmd(
        "serve", "--model", "demo", "--workers", "2", "--num-blocks", "64", "--host", "127.0.0.1", "--port", str(port),
        "--metrics-port", str(metrics_port), "--cache-service-port", str(cs_port),
        "--cluster-secret-file", str(secret_file)), log)
    try:
        wait_for_stack(proc, port, metrics_port, log, timeout_s=150)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            r = generation_pb2_grpc.GenerationStub(ch).Generate(
                pb.GenerateRequest(token_ids=list(range(40, 80)), sampling=pb.SamplingParams(max_tokens=2)), timeout=60)
        assert r.usage.prompt_tokens == 40
        operator = member_stub(f"127.0.0.1:{cs_port}", SharedSecret.from_file(secret_file))
        stats = operator.GetStats(cache_pb2.GetStatsRequest(), timeout=10)
        operator.close()
        sockets = listening_sockets(session_pids(proc.pid))
        listing = "\n".join(map(str, sockets))
        assert [s for s in sockets if not is_loopback(s[2])] == [], listing
        by_name: dict[str, list[tuple[int, str, str, int]]] = {}
        for s in sockets:
            by_name.setdefault(s[1], []).append(s)
        # Every part of the stack is in the listing (so a listener that moved elsewhere would be missed by
        # nobody): ours in the serve process, Valkey, Ray's GCS and raylet (node manager, object manager).
        assert {port, metrics_port, cs_port} <= {s[3] for s in by_name["python"] if s[0] == proc.pid}, listing
        assert (len(by_name["valkey-server"]), len(by_name["gcs_server"]), len(by_name["raylet"])) == (1, 1, 2), listing
        # Each worker actor: its BlockTransfer gRPC server, its raw block stream, and Ray's core-worker server.
        worker_pids = {s[0] for s in by_name["ray::WorkerActo"]}
        assert len(worker_pids) == 2 and len(by_name["ray::WorkerActo"]) == 6, listing
        # And the addresses the workers advertise to peers are loopback too.
        addresses = sorted(n.node.transfer_address.rpartition(":")[0] for n in stats.nodes)
        assert addresses == ["127.0.0.1", "127.0.0.1"], stats
    finally:
        stop_session(proc)
    assert session_pids(proc.pid) == [], tail(log)


# ---- an in-process stack whose embedded Valkey is killed ------------------------------------------------------

def test_a_killed_embedded_valkey_comes_back_with_the_index_and_the_pins():
    import ray

    from deploy.stack import Stack, StackConfig

    stack = Stack(StackConfig(num_workers=2, host="127.0.0.1", port=0, metrics_port=0, cache_service_port=0,
                              num_blocks=64, block_size=BS, max_num_seqs=8))
    stack.start()
    router = grpc.insecure_channel(stack.router_address)
    cache = member_stub(stack.cache_service_address, stack.credential)  # members only: as an operator
    as_router = member_stub(stack.cache_service_address, stack.credential, "router")  # Lookup is the router's
    try:
        gen = generation_pb2_grpc.GenerationStub(router)
        svc = cache
        workers = dict(sorted(stack.workers.items()))

        def generate(prompt: list[int], worker: str) -> pb.GenerateResponse:
            return gen.Generate(pb.GenerateRequest(token_ids=prompt, target_worker=worker,
                                                   sampling=pb.SamplingParams(max_tokens=2)), timeout=60)

        def stats_if_indexed() -> cache_pb2.GetStatsResponse | None:
            """GetStats, if it answers and the index holds exactly what every worker caches (else None)."""
            try:
                stats = svc.GetStats(cache_pb2.GetStatsRequest(), timeout=2)
            except grpc.RpcError:
                return None  # Redis down or coming back: UNAVAILABLE
            cached = {w: len(ray.get(h.cached_hashes.remote())) for w, h in workers.items()}
            indexed = {n.node.node_id: n.num_indexed_blocks for n in stats.nodes if n.alive}
            return stats if indexed == cached else None

        system = [(7 * i) % 256 for i in range(3 * BS)]  # 3 full blocks
        pinned = gen.Pin(pb.PinRequest(token_ids=system, replicas=2), timeout=60)
        assert (sorted(pinned.workers), pinned.num_blocks) == (["worker-0", "worker-1"], 3)
        prompts = {"worker-0": list(range(100, 100 + 4 * BS + 3)), "worker-1": list(range(10, 10 + 5 * BS + 3))}
        for worker, prompt in prompts.items():
            generate(prompt, worker)
        before = wait_for(stats_if_indexed, "the index to hold every worker's blocks")
        assert [(p.pin_id, sorted(p.node_ids)) for p in before.pins] == [(pinned.pin_id, ["worker-0", "worker-1"])]

        killed = stack.cache.redis.pid
        os.kill(killed, signal.SIGKILL)
        wait_for(lambda: stack.cache.redis.pid not in (None, killed), "the embedded Valkey to be restarted")
        assert stack.cache.redis.num_restarts == 1
        after = wait_for(stats_if_indexed, "GetStats to answer with the index rebuilt")
        assert [(p.pin_id, sorted(p.node_ids)) for p in after.pins] == [(pinned.pin_id, ["worker-0", "worker-1"])]
        assert {n.node.node_id: n.epoch for n in after.nodes} == {n.node.node_id: n.epoch for n in before.nodes}
        for worker, prompt in prompts.items():
            hashes = [bytes(h) for h in hash_prompt_blocks(prompt, BS, "demo")]
            matches = as_router.Lookup(cache_pb2.LookupRequest(block_hashes=hashes, model_id="demo"),
                                       timeout=5).matches
            assert [(m.node_id, m.num_blocks) for m in matches] == [(worker, len(hashes))]
        # Publishing goes on: blocks made after the restart are indexed too.
        generate(list(range(200, 200 + 2 * BS + 1)), "worker-1")
        wait_for(stats_if_indexed, "the new blocks to be indexed")
        # The pin is still held by both replicas (their pin keepers saw it in every heartbeat answer) and hits.
        for worker, handle in workers.items():
            assert ray.get(handle.pinned.remote()) == [pinned.pin_id]
            r = generate(system + [1, 2, 3, 4, 5], worker)
            assert (r.worker_id, r.usage.cached_tokens) == (worker, 3 * BS)
    finally:
        router.close()
        cache.close()
        as_router.close()
        stack.stop()
