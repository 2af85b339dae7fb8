"""vLLM workers (``--engine vllm``) under the whole stack, through the real gRPC contract, on vLLM's CPU build.

Skipped unless ``vllm`` imports (the main suite runs without it; .ci/run runs this module in a second venv
with vLLM's CPU build). One module-scoped ``Stack`` (local Ray, embedded Valkey, the cache service, two vLLM
workers on a tiny random Llama, the router) serves every test: a vLLM engine takes tens of seconds to start
on two shared cores. The kill test restarts worker-0 and runs last.

What is shown: shared-prefix groups hit >= 90% of the ideal and stick to one worker; ``cached_tokens`` is
vLLM's own count and equals the router's prediction; greedy float32 output is token-identical to the native
engine and to ``transformers``; the Redis index, the router's mirror and the worker's translation of vLLM's
KV events agree after stores and evictions (a small pool), and the index predicts exactly what vLLM then
hits; tenants never share; Pin is FAILED_PRECONDITION; a killed vLLM worker is failed over and restarted.
"""

from __future__ import annotations

import random

import grpc
import pytest

pytest.importorskip("vllm")

from cache_service.block_hash import hash_prompt_blocks  # noqa: E402
from deploy.stack import Stack, StackConfig  # noqa: E402
from deploy.stats import parse_metrics  # noqa: E402
from protos.prefixcache.v1 import generation_pb2 as pb  # noqa: E402
from protos.prefixcache.v1 import generation_pb2_grpc  # noqa: E402
from router.server import wait_until  # noqa: E402
from tests.test_serving import parallel  # noqa: E402  (threads, one request each)

pytestmark = pytest.mark.timeout(900)

BS = 32  # vLLM's CPU attention takes multiples of 32
NUM_BLOCKS = 24  # per worker: small enough that the eviction test overflows it
VOCAB = 320


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tests.model_fixtures import build_tiny_checkpoint, write_chat_template

    # head_dim 32: vLLM's CPU attention supports 32, 64, 80, ... (not the fixtures' default 16).
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("vllm"), "llama", hidden=128, heads=4, kv_heads=2,
                                 vocab=VOCAB, name="tiny-llama")
    write_chat_template(path, "llama3")  # tokenizer_config.json: vLLM loads the tokenizer through transformers
    return path


@pytest.fixture(scope="module")
def stack(checkpoint):
    with Stack(StackConfig(model=str(checkpoint), engine="vllm", dtype="float32", num_workers=2, block_size=None,
                           num_blocks=NUM_BLOCKS, max_num_seqs=8, port=0, metrics_port=0, cache_service_port=0,
                           http_port=0, worker_start_timeout_s=600)) as s:
        yield s


@pytest.fixture(scope="module")
def stub(stack):
    channel = grpc.insecure_channel(stack.router_address)
    yield generation_pb2_grpc.GenerationStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def native(checkpoint):
    from workers.engine import Engine, EngineConfig

    return Engine(EngineConfig(model=str(checkpoint), dtype="float32", block_size=BS, num_blocks=64,
                               enable_prefix_caching=False))


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, VOCAB) for _ in range(n)]  # no BOS/EOS/PAD inside prompts


def req(prompt: list[int], max_tokens: int = 8, **kw) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=prompt, sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                              **kw)


def call(stack, worker: str, method: str, *args):
    import ray

    return ray.get(getattr(stack.workers[worker], method).remote(*args), timeout=60)


def test_the_stack_runs_vllm_workers(stack):
    infos = stack.worker_infos
    assert sorted(infos) == ["worker-0", "worker-1"]
    for info in infos.values():
        # The router's hash root and block size (the stack picked 32 for vLLM on CPU), the pool as asked, and
        # no BlockTransfer endpoint: transfer is off for vLLM workers.
        assert info.model_id == stack.router_server.encoder.model_id and info.model_id.startswith("tiny-llama@")
        assert (info.block_size, info.num_blocks, info.device, info.transfer_address) == (BS, NUM_BLOCKS, "cpu", "")
    assert stack.config.block_size == BS


def test_shared_prefix_groups_hit_and_stick(stack, stub):
    rng = random.Random(7)
    num_groups, per_group, prefix_blocks = 4, 4, 3
    prefixes = [tokens(rng, prefix_blocks * BS) for _ in range(num_groups)]
    prompts = [[p + tokens(rng, 20) for _ in range(per_group)] for p in prefixes]
    results: dict[tuple[int, int], pb.GenerateResponse] = {}
    leaders = parallel(lambda g: stub.Generate(req(prompts[g][0]), timeout=300), list(range(num_groups)))
    for g, r in enumerate(leaders):
        results[(g, 0)] = r
    for k in range(1, per_group):  # followers in waves of one per group
        wave = parallel(lambda g: stub.Generate(req(prompts[g][k]), timeout=300), list(range(num_groups)))
        for g, r in enumerate(wave):
            results[(g, k)] = r
    ideal = num_groups * (per_group - 1) * prefix_blocks * BS
    cached = sum(r.usage.cached_tokens for (g, k), r in results.items() if k > 0)
    assert cached >= 0.9 * ideal, (cached, ideal)
    for g in range(num_groups):
        assert len({results[(g, k)].worker_id for k in range(per_group)}) == 1, g  # every group on one worker
    assert {r.worker_id for r in results.values()} == {"worker-0", "worker-1"}  # and the groups spread
    for r in results.values():
        # vLLM's own count (RequestOutput.num_cached_tokens) in whole blocks, and what the router predicted.
        assert r.usage.cached_tokens % BS == 0
        assert r.usage.cached_tokens == r.usage.predicted_cached_tokens
        assert r.usage.prompt_tokens == prefix_blocks * BS + 20 and r.usage.completion_tokens == 8


def test_greedy_float32_matches_native_engine_and_transformers(stack, stub, native, checkpoint):
    from cache_service.records import SamplingParams
    from tests.model_fixtures import hf_greedy

    rng = random.Random(11)
    prompts = [tokens(rng, n) for n in (5, 31, 45, 70)]
    for i, p in enumerate(prompts):
        worker = f"worker-{i % 2}"
        r = stub.Generate(req(p, max_tokens=16, target_worker=worker), timeout=300)
        assert r.worker_id == worker
        (out,) = native.generate([p], SamplingParams(max_tokens=16, ignore_eos=True))
        want = hf_greedy(checkpoint, p, 16)
        assert list(out.new_token_ids) == want, i
        assert list(r.token_ids) == want, i
        again = stub.Generate(req(p, max_tokens=16, target_worker=worker), timeout=300)  # from vLLM's cache
        assert list(again.token_ids) == want and again.usage.cached_tokens == (len(p) - 1) // BS * BS


def test_stream_matches_unary_and_text_is_vllms(stub):
    prompt = tokens(random.Random(13), 40)
    unary = stub.Generate(req(prompt, max_tokens=12), timeout=300)
    parts = list(stub.GenerateStream(req(prompt, max_tokens=12), timeout=300))
    assert [t for p in parts for t in p.token_ids] == list(unary.token_ids)
    assert "".join(p.text for p in parts) == unary.text
    assert parts[-1].finish_reason == "length" and parts[-1].usage.completion_tokens == 12


def test_the_http_front_door_serves_vllm_workers(stack):
    import json
    import urllib.request

    url = f"http://127.0.0.1:{stack.router_server.http_port}/v1/completions"
    body = {"model": "tiny-llama", "prompt": "the cache block prefix token " * 12, "max_tokens": 6,
            "temperature": 0, "ignore_eos": True}
    answers = []
    for _ in range(2):
        request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as resp:
            answers.append(json.loads(resp.read()))
    first, second = answers
    assert first["usage"]["completion_tokens"] == 6 and first["choices"][0]["finish_reason"] == "length"
    assert first["choices"][0]["text"] == second["choices"][0]["text"]  # vLLM's detokenization, greedy
    prompt_tokens = second["usage"]["prompt_tokens"]
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == (prompt_tokens - 1) // BS * BS > 0


def _redis_blocks(stack, worker: str) -> set[bytes]:
    import redis

    r = redis.Redis.from_url(stack.redis_url)
    try:
        idx = r.hget("pc:ids", worker)
        return set(r.smembers(f"pc:nb:{int(idx)}")) if idx is not None else set()
    finally:
        r.close()


def _agree(stack, worker: str) -> bool:
    held = set(call(stack, worker, "cached_hashes"))
    mirror = stack.router_server.registry.mirror.by_worker.get(worker, set())
    return held == set(mirror) == _redis_blocks(stack, worker)


def test_index_and_mirror_follow_vllm_through_stores_and_evictions(stack, stub):
    rng = random.Random(17)
    registry = stack.router_server.registry
    evicted_before = registry.workers["worker-0"].counters.num_blocks_evicted
    # Eight 5-block prompts on worker-0 alone: 40+ blocks through a 24-block pool (vLLM evicts).
    prompts = [tokens(rng, 5 * BS + 3) for _ in range(8)]
    for p in prompts:
        stub.Generate(req(p, target_worker="worker-0"), timeout=300)
    assert wait_until(lambda: _agree(stack, "worker-0"), 30)
    stats = call(stack, "worker-0", "event_stats")
    assert stats["num_gaps"] == 0 and stats["num_dropped_blocks"] == 0 and stats["num_dropped_roots"] == 0
    held = set(call(stack, "worker-0", "cached_hashes"))
    assert 0 < len(held) == stats["num_vllm_blocks"] <= NUM_BLOCKS  # one canonical hash per block vLLM holds
    assert wait_until(lambda: registry.workers["worker-0"].counters.num_blocks_evicted > evicted_before, 30)
    # The latest prompt is held whole; the first was evicted (LRU), and the index says so.
    assert set(hash_prompt_blocks(prompts[-1], BS, stack.router_server.encoder.model_id)) <= held
    assert not set(hash_prompt_blocks(prompts[0], BS, stack.router_server.encoder.model_id)) <= held
    # What the index predicts is exactly what vLLM then hits, prompt by prompt (each probe stores and evicts
    # in turn, so the mirror is let catch up with the worker's feed before the next one).
    hits = 0
    for p in reversed(prompts):
        r = stub.Generate(req(p[: 5 * BS] + tokens(rng, 9), target_worker="worker-0"), timeout=300)
        assert r.usage.cached_tokens == r.usage.predicted_cached_tokens, (r.usage.cached_tokens,
                                                                           r.usage.predicted_cached_tokens)
        hits += r.usage.cached_tokens > 0
        assert wait_until(lambda: _agree(stack, "worker-0"), 30)
    assert hits >= 1


def test_salts_never_share(stack, stub):
    prompt = tokens(random.Random(41), 3 * BS + 2)
    a1 = stub.Generate(req(prompt, cache_salt="tenant-a", target_worker="worker-1"), timeout=300)
    b1 = stub.Generate(req(prompt, cache_salt="tenant-b", target_worker="worker-1"), timeout=300)
    a2 = stub.Generate(req(prompt, cache_salt="tenant-a", target_worker="worker-1"), timeout=300)
    b2 = stub.Generate(req(prompt, cache_salt="tenant-b", target_worker="worker-1"), timeout=300)
    assert (a1.usage.cached_tokens, b1.usage.cached_tokens) == (0, 0)  # vLLM's own hashes keep the salts apart
    assert (a2.usage.cached_tokens, b2.usage.cached_tokens) == (3 * BS, 3 * BS)
    assert a2.usage.predicted_cached_tokens == b2.usage.predicted_cached_tokens == 3 * BS
    assert list(a1.token_ids) == list(b1.token_ids) == list(a2.token_ids)
    # Two salts, one first block: were the events to carry no salt, the worker would tell the two roots apart
    # by recomputing vLLM's own hash under each salt (workers/vllm_roots.py). That recomputation is vLLM's:
    assert call(stack, "worker-1", "vllm_root_hash_held", prompt[:BS], "tenant-a") is True
    assert call(stack, "worker-1", "vllm_root_hash_held", prompt[:BS], "tenant-b") is True
    assert call(stack, "worker-1", "vllm_root_hash_held", prompt[:BS], "tenant-c") is False


def test_pin_is_failed_precondition_naming_vllm(stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.Pin(pb.PinRequest(token_ids=tokens(random.Random(3), 2 * BS), replicas=1), timeout=60)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not supported on vLLM workers" in err.value.details()


def test_metrics_and_stats_count_vllm_hits(stack, stub):
    import urllib.request

    def scrape() -> str:
        with urllib.request.urlopen(stack.metrics_url, timeout=10) as resp:
            return resp.read().decode()

    before = parse_metrics(scrape())
    rng = random.Random(71)
    shared = tokens(rng, 2 * BS)
    responses = [stub.Generate(req(shared + tokens(rng, 7), cache_salt="metrics"), timeout=300) for _ in range(3)]
    after = parse_metrics(scrape())
    assert sum(r.usage.cached_tokens for r in responses) == 2 * 2 * BS
    assert after.total.cached_tokens - before.total.cached_tokens == 2 * 2 * BS
    assert after.total.requests - before.total.requests == 3
    text = scrape()
    assert 'prefixcache_blocks_stored_total{worker="worker-0"}' in text


def test_a_killed_vllm_worker_fails_over_and_is_restarted(stack, stub, native):  # runs last
    import ray

    from cache_service.records import SamplingParams

    registry = stack.router_server.registry
    old_epoch = registry.workers["worker-0"].feed_epoch
    rng = random.Random(101)
    stream = stub.GenerateStream(req(tokens(rng, 30), max_tokens=400, target_worker="worker-0"), timeout=300)
    first = next(stream)
    assert first.worker_id == "worker-0" and first.token_ids
    prompts = [tokens(rng, 20 + i) for i in range(3)]
    ray.kill(stack.workers["worker-0"], no_restart=False)  # the process dies (its engine with it); Ray restarts it
    with pytest.raises(grpc.RpcError) as err:
        for _ in stream:
            pass
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    for p in prompts:  # served meanwhile, by worker-1 (a request sent to the dying worker-0 is retried)
        r = stub.Generate(req(p, max_tokens=8), timeout=300)
        (out,) = native.generate([p], SamplingParams(max_tokens=8, ignore_eos=True))
        assert list(r.token_ids) == list(out.new_token_ids)
    assert wait_until(lambda: not registry.workers["worker-0"].live, 30)
    assert wait_until(lambda: registry.workers["worker-0"].live, 600)  # a fresh vLLM engine, its first poll answered
    w0 = registry.workers["worker-0"]
    assert not w0.dead and w0.feed_epoch != old_epoch
    prompt = tokens(rng, 2 * BS + 5)
    r1 = stub.Generate(req(prompt, target_worker="worker-0"), timeout=300)
    r2 = stub.Generate(req(prompt, target_worker="worker-0"), timeout=300)
    assert (r1.usage.cached_tokens, r2.usage.cached_tokens, r2.usage.predicted_cached_tokens) == (0, 2 * BS, 2 * BS)
