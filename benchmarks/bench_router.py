"""Router overhead per request: tokenize + hash + lookup + score, for 8k-token prompts and 16 workers.

    python -m benchmarks.bench_router [--json] [--requests 300] [--workers 16] [--prompt-tokens 8192]

Then the tokenize stage again with a real byte-level BPE of 32k tokens (trained here: see
``bench_bpe_tokenize``), since the demo tokenizer is byte level.

The routing path exactly as the router runs it (``validate_generate`` -> ``PromptEncoder.block_hashes``
-> ``RoutingCore.decide``), in process, over 16 worker states whose blocks are known to both index
sources, measured side by side in one run:

    mirror    the router's local index mirror (the default)
    service   CacheService.Lookup over gRPC (embedded Valkey, the one-round-trip Lua walk)

and each again with auth on (``*_auth``): the bearer token checked and the tenant's salt derived first, as
the router's edge does (``TokenAuth.authenticate`` over 64 tenants' tokens, ``tenant_salt``), and on the
service path the router's member token on each Lookup (signed by the router, verified by a members-only
CacheService's interceptor: common/cluster_auth.py). Every request names the same tenant, so that all four
see the same hashes and the same matches. The member token's own cost (sign + verify, no network) is
measured apart as well.

Each of 64 distinct 8k-token "documents" is held (as a prefix of random length) by a random subset of
the 16 workers; each request is one document's prefix + a fresh question. Target: total p99 < 2 ms
with the mirror. ``total_cpu`` is the same path in CPU time of the thread (what the code costs, without
the time the OS gave to other processes on a busy machine). Timing is reported, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import statistics
import time
from typing import Any

from cache_service.block_hash import hash_prompt_blocks
from cache_service.embedded_redis import EmbeddedRedis, connect
from cache_service.index import ClusterIndex
from cache_service.server import CacheServiceConfig, CacheServiceThread
from cache_service.types import NodeInfo
from common.cluster_auth import Member, SharedSecret
from router.auth import TokenAuth, tenant_salt
from router.cache_link import CacheLink
from cache_service.records import BlockStored
from router.index_mirror import IndexMirror
from router.worker_client import InProcessWorkerClient
from router.metrics import RouterMetrics
from router.policies import WorkerLoad, make_policy
from router.registry import WorkerRegistry
from router.routing import RoutingCore
from router.tokenize import PromptEncoder
from router.validation import GenerateArgs, validate_generate
from loadgen.stats import percentile as pct

BS = 16
NUM_DOCS = 64
NUM_TENANTS = 64
TENANT = "tenant-7"


def summary(xs: list[float]) -> dict[str, float]:
    return {"p50_ms": pct(xs, 50) * 1e3, "p99_ms": pct(xs, 99) * 1e3, "mean_ms": statistics.fmean(xs) * 1e3}


def make_docs(rng: random.Random, prompt_tokens: int) -> list[str]:
    # The demo tokenizer is byte level: one ASCII character is one token (plus BOS).
    alphabet = "abcdefghijklmnopqrstuvwxyz .,"
    return ["".join(rng.choice(alphabet) for _ in range(prompt_tokens - 64)) for _ in range(NUM_DOCS)]


def bench_member_token(n: int = 20_000) -> dict[str, float]:
    """One Lookup's credential work, without the network: the router signs, the service verifies."""
    secret = SharedSecret.generate()
    router, service = Member("router", secret), Member("cache-service", secret)
    method = "/prefixcache.v1.CacheService/Lookup"
    sign, verify = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        metadata = router.call_metadata(method)
        t1 = time.perf_counter()
        service.verify(method, metadata)
        t2 = time.perf_counter()
        sign.append(t1 - t0)
        verify.append(t2 - t1)
    return {"sign": summary(sign), "verify": summary(verify)}


async def run(num_requests: int, num_workers: int, prompt_tokens: int) -> dict[str, Any]:
    rng = random.Random(0)
    encoder = PromptEncoder("demo", BS)
    # The demo model attends over 4096 positions; the routing path does not care, so let it take 8k prompts.
    encoder.info = dataclasses.replace(encoder.info, max_context=4 * prompt_tokens)
    docs = make_docs(rng, prompt_tokens)
    auth = TokenAuth({f"token-{i:02d}-{rng.getrandbits(64):016x}": f"tenant-{i}" for i in range(NUM_TENANTS)})
    bearer = (("authorization", f"Bearer {next(t for t, n in auth.tokens.items() if n == TENANT)}"),)
    salt = tenant_salt(TENANT, "")  # every request's (auth off: the client names it; on: derived from the token)
    doc_hashes = [encoder.block_hashes(encoder.encode(d), salt) for d in docs]
    holdings: dict[str, list[tuple[int, int]]] = {}  # worker -> (doc, num blocks held)
    for w in range(num_workers):
        held = rng.sample(range(NUM_DOCS), NUM_DOCS // 4)
        holdings[f"worker-{w}"] = [(d, rng.randrange(1, len(doc_hashes[d]) + 1)) for d in held]
    redis = EmbeddedRedis()
    redis.start()
    secret = SharedSecret.generate()
    service = CacheServiceThread(CacheServiceConfig(redis_url=redis.url, port=0))
    members_only = CacheServiceThread(CacheServiceConfig(redis_url=redis.url, port=0,
                                                         member=Member("cache-service", secret)))
    service.start()
    members_only.start()
    try:
        index = ClusterIndex(connect(redis.url))
        mirror = IndexMirror()
        registry = WorkerRegistry(mirror)
        num_entries = 0
        for wid, held in holdings.items():
            reg = await index.register(NodeInfo(wid, f"127.0.0.1:{7000 + len(registry.workers)}", "demo",
                                                block_size=BS), 3600)
            hashes = [h for d, n in held for h in doc_hashes[d][:n]]
            await index.publish(reg.node_id, reg.epoch, [BlockStored(h) for h in hashes])
            mirror.apply_events(wid, [BlockStored(h) for h in hashes])
            num_entries += len(hashes)
            state = registry.add(InProcessWorkerClient(wid, None), transfer_address=f"127.0.0.1:{7000 + len(registry.workers)}")
            state.live, state.feed_epoch = True, "bench"
            state.load = WorkerLoad(wid, num_running=rng.randrange(8), num_waiting=rng.randrange(4),
                                    num_active_blocks=rng.randrange(500), capacity_blocks=4096,
                                    num_waiting_blocks=rng.randrange(64))
        await index.close()
        link = CacheLink(service.address, encoder.model_id)
        signed_link = CacheLink(members_only.address, encoder.model_id, Member("router", secret))
        metrics = RouterMetrics()
        policy = make_policy("cache_aware")
        mirror_core = RoutingCore(encoder, registry, mirror, policy, metrics, index_source="mirror")
        cores = {  # name -> (core, auth on)
            "mirror": (mirror_core, False),
            "mirror_auth": (mirror_core, True),
            "service": (RoutingCore(encoder, registry, mirror, policy, metrics, service_lookup=link.lookup,
                                    index_source="service"), False),
            "service_auth": (RoutingCore(encoder, registry, mirror, policy, metrics,
                                         service_lookup=signed_link.lookup, index_source="service"), True),
        }
        texts = [docs[rng.randrange(NUM_DOCS)][: rng.randrange(prompt_tokens // 2, prompt_tokens - 64)] +
                 "".join(rng.choice("xyz ") for _ in range(64)) for _ in range(num_requests)]
        results: dict[str, Any] = {}
        agree = 0
        for name, (core, with_auth) in cores.items():
            stages: dict[str, list[float]] = {"auth": [], "tokenize": [], "hash": [], "lookup_score": [], "total": [],
                                              "total_cpu": []}
            for i, text in enumerate(texts + texts[:20]):  # the first 20 warm up
                c0 = time.thread_time()
                t0 = time.perf_counter()
                request_salt = tenant_salt(auth.authenticate(bearer), "") if with_auth else salt
                ta = time.perf_counter()
                req = validate_generate(GenerateArgs(request_id=f"r{i}", text=text, max_tokens=16), encoder)
                req.cache_salt = request_salt
                t1 = time.perf_counter()
                hashes = encoder.block_hashes(req.prompt_ids, req.cache_salt)
                t2 = time.perf_counter()
                decision = await core.decide(req.prompt_ids, hashes, request_id=req.request_id)
                t3 = time.perf_counter()
                c3 = time.thread_time()
                # A refused Lookup falls back to the mirror silently: make sure the service answered.
                assert decision.lookup_source == core.index_source, (name, decision.lookup_source)
                if i >= 20:
                    for key, dt in (("auth", ta - t0), ("tokenize", t1 - ta), ("hash", t2 - t1),
                                    ("lookup_score", t3 - t2), ("total", t3 - t0), ("total_cpu", c3 - c0)):
                        stages[key].append(dt)
                if name == "service_auth" and i < len(texts):
                    other = await mirror_core.decide(req.prompt_ids, hashes, request_id=req.request_id)
                    agree += other.matches == decision.matches
            results[name] = {k: summary(v) for k, v in stages.items()}
        await link.close()
        await signed_link.close()
        return {
            "workers": num_workers, "prompt_tokens": prompt_tokens, "blocks_per_prompt": prompt_tokens // BS,
            "requests": num_requests, "index_entries": num_entries, "mirror_vs_service_matches_agree": agree,
            **results,
            "service_over_mirror_total_p50": results["service"]["total"]["p50_ms"] / results["mirror"]["total"]["p50_ms"],
            "auth_added_p50_ms": {src: results[f"{src}_auth"]["total"]["p50_ms"] - results[src]["total"]["p50_ms"]
                                  for src in ("mirror", "service")},
            "member_token": bench_member_token(),
        }
    finally:
        service.stop()
        members_only.stop()
        redis.stop()


def bench_bpe_tokenize(num_requests: int, prompt_tokens: int, vocab_size: int = 32_000,
                       corpus_bytes: int = 8 << 20) -> dict[str, Any]:
    """The tokenize stage with a real byte-level BPE instead of the demo's byte tokenizer.

    Nothing can be downloaded here, so a 32k-vocabulary byte-level BPE (the kind Llama 3, Qwen2 and GPT-2
    use) is trained with ``tokenizers`` on the Python standard library's sources, saved as tokenizer.json
    and loaded the way a checkpoint's is (``HFTokenizer``). Prompts are windows of those sources of about
    ``prompt_tokens`` tokens. Only this stage differs from the rest of the path measured above.
    """
    import sysconfig
    import tempfile
    from pathlib import Path

    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from workers.model.tokenizer import HFTokenizer

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    corpus = "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)[:corpus_bytes]
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    t0 = time.perf_counter()
    raw.train_from_iterator((corpus[i : i + 65536] for i in range(0, len(corpus), 65536)),
                            trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    train_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "tokenizer.json"
        raw.save(str(path))
        tok = HFTokenizer(path, eos_token_ids=(), bos_token_id=None)
    chars_per_token = len(corpus[:1 << 20]) / len(tok.encode(corpus[:1 << 20]))
    window = int(prompt_tokens * chars_per_token)
    rng = random.Random(1)
    texts = [corpus[start : start + window] for start in (rng.randrange(len(corpus) - window)
                                                          for _ in range(num_requests + 20))]
    times, lengths = [], []
    for i, text in enumerate(texts):
        t0 = time.perf_counter()
        ids = tok.encode(text)
        dt = time.perf_counter() - t0
        if i >= 20:
            times.append(dt)
            lengths.append(len(ids))
    return {"vocab_size": tok.vocab_size, "train_s": train_s, "corpus_bytes": len(corpus),
            "mean_prompt_tokens": statistics.fmean(lengths), "tokenize": summary(times)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=8192)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    out = asyncio.run(run(args.requests, args.workers, args.prompt_tokens))
    out["bpe"] = bench_bpe_tokenize(args.requests, args.prompt_tokens)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"routing path, {out['workers']} workers, prompts up to {out['prompt_tokens']} tokens "
          f"({out['blocks_per_prompt']} blocks), {out['index_entries']} index entries, {out['requests']} requests")
    print(f"{'source':<14}{'stage':<14}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}")
    for source in ("mirror", "mirror_auth", "service", "service_auth"):
        for stage in ("auth", "tokenize", "hash", "lookup_score", "total", "total_cpu"):
            s = out[source][stage]
            print(f"{source:<14}{stage:<14}{s['p50_ms']:>9.3f}{s['p99_ms']:>9.3f}{s['mean_ms']:>9.3f}")
    print(f"service / mirror total p50: {out['service_over_mirror_total_p50']:.1f}x; "
          f"matches agree on {out['mirror_vs_service_matches_agree']}/{out['requests']} requests")
    added, tok = out["auth_added_p50_ms"], out["member_token"]
    print(f"auth on vs off, total p50: mirror {added['mirror']:+.3f} ms, service {added['service']:+.3f} ms; "
          f"bearer check alone p50 {out['mirror_auth']['auth']['p50_ms'] * 1e3:.1f} us; member token sign p50 "
          f"{tok['sign']['p50_ms'] * 1e3:.1f} us + verify p50 {tok['verify']['p50_ms'] * 1e3:.1f} us")
    bpe = out["bpe"]
    print(f"tokenize with a {bpe['vocab_size']}-token byte-level BPE (prompts of {bpe['mean_prompt_tokens']:.0f} "
          f"tokens on average): p50 {bpe['tokenize']['p50_ms']:.3f} ms, p99 {bpe['tokenize']['p99_ms']:.3f} ms "
          f"(the demo byte tokenizer: p50 {out['mirror']['tokenize']['p50_ms']:.3f} ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
