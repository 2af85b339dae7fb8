"""The serving stack end to end, through the real gRPC API, on a real two-node local Ray cluster.

One module-scoped cluster (``tests/ray_fixtures.py``) and one ``Stack`` (embedded Valkey, cache service,
worker-0 on the head node, worker-1 on the second node, the router) serve every test; extra routers
(auth, a tiny in-flight cap) are cheap threads over the same two workers. Outputs are compared with a
cold ``Engine`` (prefix caching off) in the test process: caching, routing, transfers and retries must
never change a token. The node-loss test removes the second node and therefore runs last.
"""

from __future__ import annotations

import random
import threading
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from deploy.stack import Stack, StackConfig
from deploy.stats import parse_metrics
from protos.prefixcache.v1 import generation_pb2 as pb
from protos.prefixcache.v1 import generation_pb2_grpc
from router.auth import TokenAuth
from router.metrics import anonymous_tenant
from router.ray_client import RayWorkerClient
from router.server import RouterConfig, RouterThread, WorkerEndpoint, wait_until
from tests.ray_fixtures import two_node_cluster  # noqa: F401  (module-scoped fixture)
from workers.engine import Engine, EngineConfig
from cache_service.records import SamplingParams

pytestmark = pytest.mark.timeout(240)

BS = 16
NUM_BLOCKS = 160


@pytest.fixture(scope="module")
def stack(two_node_cluster):  # noqa: F811
    with Stack(StackConfig(
        num_workers=2, node_ids=two_node_cluster.node_ids, port=0, metrics_port=0, cache_service_port=0,
        num_blocks=NUM_BLOCKS, block_size=BS, max_num_seqs=16, always_transfer=True,
    )) as s:
        yield s


@pytest.fixture(scope="module")
def stub(stack):
    channel = grpc.insecure_channel(stack.router_address)
    yield generation_pb2_grpc.GenerationStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def cold_engine():
    return Engine(EngineConfig(model="demo", num_blocks=NUM_BLOCKS, block_size=BS, enable_prefix_caching=False))


def cold(engine: Engine, prompt: list[int], max_tokens: int, **kw) -> list[int]:
    (out,) = engine.generate([prompt], SamplingParams(max_tokens=max_tokens, **kw))
    assert out.error is None
    return list(out.new_token_ids)


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(0, 256) for _ in range(n)]  # demo vocabulary: bytes 0..255 (+ specials)


def req(prompt: list[int], max_tokens: int = 8, **kw) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(max_tokens=max_tokens, ignore_eos=kw.pop("ignore_eos", False))
    return pb.GenerateRequest(token_ids=prompt, sampling=sampling, **kw)


def parallel(fn, items):
    results = [None] * len(items)

    def run(i, item):
        results[i] = fn(item)

    threads = [threading.Thread(target=run, args=(i, it)) for i, it in enumerate(items)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_health_and_reflection(stack):
    with grpc.insecure_channel(stack.router_address) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        replies = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"prefixcache.v1.Generation", "grpc.health.v1.Health"} <= names


def test_shared_prefix_groups_hit_and_stick(stack, stub, cold_engine):
    rng = random.Random(7)
    num_groups, per_group, prefix_blocks = 4, 4, 6
    prefixes = [tokens(rng, prefix_blocks * BS) for _ in range(num_groups)]
    prompts = [[p + tokens(rng, 20) for _ in range(per_group)] for p in prefixes]
    results: dict[tuple[int, int], pb.GenerateResponse] = {}
    # Group leaders together (the router's load accounting spreads them), then followers in waves of
    # one per group.
    leaders = parallel(lambda g: stub.Generate(req(prompts[g][0]), timeout=60), list(range(num_groups)))
    for g, r in enumerate(leaders):
        results[(g, 0)] = r
    for k in range(1, per_group):
        wave = parallel(lambda g: stub.Generate(req(prompts[g][k]), timeout=60), list(range(num_groups)))
        for g, r in enumerate(wave):
            results[(g, k)] = r
    ideal = num_groups * (per_group - 1) * prefix_blocks * BS
    cached = sum(r.usage.cached_tokens for (g, k), r in results.items() if k > 0)
    assert cached >= 0.9 * ideal, (cached, ideal)
    workers_of_group = []
    for g in range(num_groups):
        ws = [results[(g, k)].worker_id for k in range(per_group)]
        top = max(set(ws), key=ws.count)
        assert ws.count(top) >= per_group - 1, ws  # mostly one worker per group
        workers_of_group.append(top)
    assert set(workers_of_group) == {"worker-0", "worker-1"}, workers_of_group  # groups spread
    for (g, k), r in results.items():
        assert r.finish_reason in ("stop", "length")
        assert r.usage.prompt_tokens == len(prompts[g][k])
        assert r.usage.predicted_cached_tokens <= r.usage.prompt_tokens
        assert list(r.token_ids) == cold(cold_engine, prompts[g][k], 8), (g, k)


def test_stream_matches_unary(stub, cold_engine):
    prompt = tokens(random.Random(11), 70)
    deltas = list(stub.GenerateStream(req(prompt, max_tokens=12, ignore_eos=True), timeout=60))
    assert all(d.finish_reason == "" for d in deltas[:-1]) and deltas[-1].finish_reason == "length"
    streamed = [t for d in deltas for t in d.token_ids]
    assert streamed == cold(cold_engine, prompt, 12, ignore_eos=True)
    assert deltas[-1].usage.completion_tokens == 12 and deltas[-1].usage.prompt_tokens == 70
    unary = stub.Generate(req(prompt, max_tokens=12, ignore_eos=True), timeout=60)
    assert list(unary.token_ids) == streamed
    assert unary.text == "".join(d.text for d in deltas)


def test_target_worker_on_other_node_transfers(stack, stub, cold_engine):
    rng = random.Random(21)
    prefix = tokens(rng, 8 * BS)
    first = stub.Generate(req(prefix + tokens(rng, 5), target_worker="worker-0"), timeout=60)
    assert first.worker_id == "worker-0" and first.usage.cached_tokens == 0
    prompt = prefix + tokens(rng, 9)
    second = stub.Generate(req(prompt, target_worker="worker-1"), timeout=60)
    assert second.worker_id == "worker-1"
    assert second.usage.transferred_tokens == 8 * BS
    assert second.usage.cached_tokens == 8 * BS
    assert list(second.token_ids) == cold(cold_engine, prompt, 8)
    assert stack.worker_infos["worker-0"].node_id != stack.worker_infos["worker-1"].node_id


def test_pinned_prompt_hits_on_every_replica(stub, cold_engine):
    rng = random.Random(31)
    system = tokens(rng, 5 * BS + 3)
    pin = stub.Pin(pb.PinRequest(token_ids=system, replicas=2), timeout=60)
    assert sorted(pin.workers) == ["worker-0", "worker-1"]
    assert pin.pinned_tokens == 5 * BS and pin.num_blocks == 5
    again = stub.Pin(pb.PinRequest(token_ids=system, replicas=2), timeout=60)
    assert again.pin_id == pin.pin_id  # same prefix, same pin
    for worker in ("worker-0", "worker-1"):
        prompt = system + tokens(rng, 12)
        r = stub.Generate(req(prompt, target_worker=worker), timeout=60)
        assert r.worker_id == worker
        assert r.usage.cached_tokens == 5 * BS and r.usage.transferred_tokens == 0, (worker, r.usage)
        assert list(r.token_ids) == cold(cold_engine, prompt, 8)
    released = stub.Unpin(pb.PinRequest(token_ids=system), timeout=30)
    assert released.pin_id == pin.pin_id and sorted(released.workers) == ["worker-0", "worker-1"]
    with pytest.raises(grpc.RpcError) as err:
        stub.Unpin(pb.PinRequest(token_ids=system), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_salts_never_share(stub):
    prompt = tokens(random.Random(41), 6 * BS + 2)
    a1 = stub.Generate(req(prompt, cache_salt="tenant-a", target_worker="worker-0"), timeout=60)
    b1 = stub.Generate(req(prompt, cache_salt="tenant-b", target_worker="worker-0"), timeout=60)
    b_other = stub.Generate(req(prompt, cache_salt="tenant-b", target_worker="worker-1"), timeout=60)
    a2 = stub.Generate(req(prompt, cache_salt="tenant-a", target_worker="worker-0"), timeout=60)
    assert a1.usage.cached_tokens == 0 and b1.usage.cached_tokens == 0
    assert b_other.usage.cached_tokens == 6 * BS  # b's own blocks, pulled from worker-0
    assert a2.usage.cached_tokens == 6 * BS
    assert list(a1.token_ids) == list(b1.token_ids) == list(a2.token_ids)


@pytest.mark.parametrize("request_kwargs, fragment", [
    ({"sampling": pb.SamplingParams(max_tokens=4)}, "no prompt"),
    ({"text": "hi", "token_ids": [1, 2], "sampling": pb.SamplingParams(max_tokens=4)}, "both text and token_ids"),
    ({"token_ids": [1, 2, 70000], "sampling": pb.SamplingParams(max_tokens=4)}, "token id 70000 at position 2"),
    ({"token_ids": [1, 2], "sampling": pb.SamplingParams(max_tokens=5000)}, "exceeds the model's context"),
    ({"token_ids": [1, 2], "sampling": pb.SamplingParams(max_tokens=4, top_p=2.0)}, "top_p must be in (0, 1]"),
    ({"token_ids": [1, 2], "sampling": pb.SamplingParams(max_tokens=0)}, "max_tokens must be a positive integer"),
    ({"token_ids": [1, 2], "target_worker": "worker-9"}, "unknown target_worker 'worker-9'"),
    ({"token_ids": [1, 2], "sampling": pb.SamplingParams(temperature=-1)}, "temperature must be >= 0"),
])
def test_bad_input_is_invalid_argument(stub, request_kwargs, fragment):
    for call in (stub.Generate, lambda r, timeout: list(stub.GenerateStream(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as err:
            call(pb.GenerateRequest(**request_kwargs), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert fragment in err.value.details(), err.value.details()


def test_pin_bad_input(stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.Pin(pb.PinRequest(token_ids=[1, 2, 3]), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at least one full block" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.Pin(pb.PinRequest(token_ids=list(range(40)), replicas=3), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "only 2 workers" in err.value.details()


@pytest.fixture(scope="module")
def extra_router(stack):
    """Start more routers over the stack's workers (cheap: a thread each); stopped at module end."""
    routers: list[RouterThread] = []

    def start(**overrides) -> RouterThread:
        endpoints = [WorkerEndpoint(RayWorkerClient(w, h), stack.worker_infos[w].node_id,
                                    stack.worker_infos[w].transfer_address)
                     for w, h in stack.workers.items()]
        config = RouterConfig(block_size=BS, port=0, metrics_port=None,
                              cache_service_address=stack.cache_service_address, **overrides)
        r = RouterThread(config, endpoints)
        r.start()
        routers.append(r)
        return r

    yield start
    for r in routers:
        r.stop()


def test_bearer_token_auth_and_tenant_salts(extra_router):
    router = extra_router(auth=TokenAuth({"tok-a": "alpha", "tok-b": "beta"}))
    prompt = tokens(random.Random(51), 4 * BS + 1)
    with grpc.insecure_channel(router.address) as ch:
        s = generation_pb2_grpc.GenerationStub(ch)
        for metadata in (None, [("authorization", "Bearer nope")], [("authorization", "tok-a")]):
            with pytest.raises(grpc.RpcError) as err:
                s.Generate(req(prompt), metadata=metadata, timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
        with pytest.raises(grpc.RpcError) as err:
            s.Pin(pb.PinRequest(token_ids=prompt), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        a = [("authorization", "Bearer tok-a")]
        b = [("authorization", "Bearer tok-b")]
        a1 = s.Generate(req(prompt, target_worker="worker-0"), metadata=a, timeout=60)
        a2 = s.Generate(req(prompt, target_worker="worker-0"), metadata=a, timeout=60)
        # beta claims alpha's salt: the router derives beta's own salt, so nothing is shared.
        b1 = s.Generate(req(prompt, target_worker="worker-0", cache_salt="alpha"), metadata=b, timeout=60)
    assert a1.usage.cached_tokens == 0 and a2.usage.cached_tokens == 4 * BS
    assert b1.usage.cached_tokens == 0
    assert list(a1.token_ids) == list(b1.token_ids)


def test_overload_is_resource_exhausted(extra_router):
    router = extra_router(max_in_flight=1)
    prompt = tokens(random.Random(61), 20)
    with grpc.insecure_channel(router.address) as ch:
        s = generation_pb2_grpc.GenerationStub(ch)
        long = s.GenerateStream(req(prompt, max_tokens=400, ignore_eos=True), timeout=120)
        next(long)  # in flight now
        with pytest.raises(grpc.RpcError) as err:
            s.Generate(req(prompt, max_tokens=2), timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit of 1 requests in flight" in err.value.details()
        long.cancel()
    # The cancelled stream is aborted on its worker: the cap frees up.
    assert wait_until(lambda: router.server.dispatcher.num_in_flight == 0, 10)
    with grpc.insecure_channel(router.address) as ch:
        assert generation_pb2_grpc.GenerationStub(ch).Generate(req(prompt, max_tokens=2), timeout=60).usage.completion_tokens == 2


def test_a_hung_worker_leaves_rotation_and_its_request_is_retried(extra_router, cold_engine):
    router = extra_router(stall_after_s=2.0, unresponsive_after_s=2.0)
    registry = router.server.registry
    w0 = registry.workers["worker-0"]
    rng = random.Random(91)
    prefix = tokens(rng, 6 * BS)
    with grpc.insecure_channel(router.address) as ch:
        s = generation_pb2_grpc.GenerationStub(ch)
        s.Generate(req(prefix + tokens(rng, 3), target_worker="worker-0"), timeout=60)
        # Until a poll reports the first request done, its blocks still count as worker-0's queued load
        # and could tip the choice to worker-1: wait for that poll, so that the prefix alone decides.
        assert wait_until(lambda: w0.live and w0.num_routed_blocks == 0 and w0.load.num_running == 0, 30)
        w0.client.handle.debug_stall.remote(10.0)
        prompt = prefix + tokens(rng, 10)  # drawn to worker-0 by its prefix
        r = s.Generate(req(prompt), timeout=60)
        # Answered while worker-0 is still stalled (it comes back once the 10 s stall ends): the request
        # did not wait for the stall.
        assert not w0.live
    assert r.worker_id == "worker-1" and list(r.token_ids) == cold(cold_engine, prompt, 8)
    failed_on_0 = router.server.metrics.requests.labels("worker-0", "default", "error")._value.get()
    assert failed_on_0 == 1  # it went to worker-0 first, and was retried when worker-0 left rotation
    assert "stalled" in registry.workers["worker-0"].last_error or not registry.workers["worker-0"].live
    assert wait_until(lambda: registry.workers["worker-0"].live, 30)  # back once it goes round again


def scrape(stack) -> str:
    return urllib.request.urlopen(stack.metrics_url, timeout=10).read().decode()


def test_metrics_agree_with_responses(stack, stub):
    before = parse_metrics(scrape(stack))
    rng = random.Random(71)
    shared = tokens(rng, 3 * BS)
    responses = [stub.Generate(req(shared + tokens(rng, 7), cache_salt="metrics"), timeout=60) for _ in range(5)]
    after = parse_metrics(scrape(stack))
    assert sum(r.usage.cached_tokens for r in responses) >= 4 * 3 * BS
    assert after.total.cached_tokens - before.total.cached_tokens == sum(r.usage.cached_tokens for r in responses)
    assert after.total.prompt_tokens - before.total.prompt_tokens == sum(r.usage.prompt_tokens for r in responses)
    assert after.total.requests - before.total.requests == 5
    # Auth is off: the tenant label is a digest of the client's salt, never the salt itself.
    label = anonymous_tenant("metrics")
    assert label.startswith("salt-") and "metrics" not in after.tenants
    assert before.tenants.get(label) is None
    assert after.tenants[label].cached_tokens == sum(r.usage.cached_tokens for r in responses)
    for w in ("worker-0", "worker-1"):
        mine = sum(r.usage.cached_tokens for r in responses if r.worker_id == w)
        prev = before.workers[w].cached_tokens if w in before.workers else 0
        assert after.workers[w].cached_tokens - prev == mine
        assert after.workers[w].up == 1
    text = scrape(stack)
    for name in ("prefixcache_router_decision_seconds_bucket", 'prefixcache_index_lookups_total{source="mirror"}',
                 'prefixcache_blocks_stored_total{worker="worker-0"}', "prefixcache_ttft_seconds_bucket",
                 'prefixcache_transfers_total{outcome="ok",worker="worker-1"}', "prefixcache_kv_blocks_free"):
        assert name in text, name


def test_a_worker_whose_actor_dies_is_restarted_and_rejoins(stack, stub, cold_engine):
    import ray

    registry = stack.router_server.registry
    old = registry.workers["worker-0"]
    old_epoch = old.feed_epoch
    rng = random.Random(101)
    ray.kill(stack.workers["worker-0"], no_restart=False)  # the process dies; its node stays
    prompts = [tokens(rng, 20 + i) for i in range(4)]
    for i, p in enumerate(prompts):  # served meanwhile (a request sent to the dying worker-0 is retried)
        r = stub.Generate(req(p), timeout=60)
        assert list(r.token_ids) == cold(cold_engine, p, 8)
        if i == 0:
            assert wait_until(lambda: not registry.workers["worker-0"].live, 10)
    assert wait_until(lambda: registry.workers["worker-0"].live, 60)  # Ray restarted it; its first poll answered
    w0 = registry.workers["worker-0"]
    assert not w0.dead and w0.feed_epoch != old_epoch  # a new incarnation, mirrored from a full snapshot
    info = ray.get(stack.workers["worker-0"].info.remote(), timeout=30)
    # Restarted on its own node, serving BlockTransfer again (on whatever port it got this time).
    assert info.node_id == stack.config.node_ids[0] and info.transfer_address == w0.transfer_address != ""
    prompt = tokens(rng, 3 * BS + 5)
    r = stub.Generate(req(prompt, max_tokens=12, target_worker="worker-0"), timeout=60)
    assert r.worker_id == "worker-0" and list(r.token_ids) == cold(cold_engine, prompt, 12)
    assert parse_metrics(scrape(stack)).workers["worker-0"].up == 1
    # Its blocks are found again (mirror and cache service) and pulled from its new BlockTransfer address.
    peer_prompt = prompt[:3 * BS] + tokens(rng, 7)
    r = stub.Generate(req(peer_prompt, target_worker="worker-1"), timeout=60)
    assert r.worker_id == "worker-1" and r.usage.transferred_tokens == 3 * BS
    assert list(r.token_ids) == cold(cold_engine, peer_prompt, 8)


def test_node_loss_fails_over(two_node_cluster, stack, stub, cold_engine):  # noqa: F811  (runs last)
    rng = random.Random(81)
    # A prefix only worker-1 holds draws the requests there (some spill to worker-0 with the load).
    prefix = tokens(rng, 6 * BS)
    stub.Generate(req(prefix + tokens(rng, 3), target_worker="worker-1"), timeout=60)
    prompts = [prefix + tokens(rng, 20) for _ in range(6)]
    before = parse_metrics(scrape(stack))
    stream_prompt = tokens(rng, 30)
    stream = stub.GenerateStream(req(stream_prompt, max_tokens=300, ignore_eos=True, target_worker="worker-1"),
                                 timeout=120)
    first = next(stream)
    assert first.worker_id == "worker-1" and first.token_ids
    # Long enough that the ones on worker-1 are still decoding when its machine goes (96 tokens could finish
    # first on a quiet machine, and then nothing but the stream would fail there).
    futures = [stub.Generate.future(req(p, max_tokens=300, ignore_eos=True), timeout=180) for p in prompts]
    dispatcher = stack.router_server.dispatcher
    registry = stack.router_server.registry
    assert wait_until(lambda: dispatcher.num_in_flight == 7, 30)  # the stream + the 6 unary requests
    assert wait_until(lambda: registry.workers["worker-1"].num_in_flight >= 2, 30)  # the stream + a unary one
    two_node_cluster.remove_worker_node()
    with pytest.raises(grpc.RpcError) as err:
        for _ in stream:
            pass
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "worker-1 was lost after streaming" in err.value.details(), err.value.details()
    results = [f.result() for f in futures]
    for p, r in zip(prompts, results):  # every one completes, retried on worker-0 if it was on worker-1
        assert r.usage.completion_tokens == 300 and r.finish_reason == "length"
        assert list(r.token_ids) == cold(cold_engine, p, 300, ignore_eos=True)
    assert wait_until(lambda: [w.worker_id for w in registry.live_workers()] == ["worker-0"], 10)
    after = stub.Generate(req(tokens(rng, 20)), timeout=60)
    assert after.worker_id == "worker-0"
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(req(tokens(rng, 20), target_worker="worker-1"), timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    metrics = parse_metrics(scrape(stack))
    assert metrics.workers["worker-1"].up == 0 and metrics.workers["worker-0"].up == 1
    # The stream and at least one unary request failed on worker-1 (the unary ones were retried).
    assert metrics.workers["worker-1"].errors - before.workers["worker-1"].errors >= 2
