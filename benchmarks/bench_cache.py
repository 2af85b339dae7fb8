"""Cache service benchmarks, each measured side by side in one run (ratios printed; never asserted).

    python -m benchmarks.bench_cache [--json] [--quick] [--skip-model] [--auth-only]

1. Lookup of a 512-block prompt on embedded Valkey: the one-round-trip Lua script vs per-key reads
   (one HKEYS round trip per block, and the same reads pipelined), 8 nodes holding 512, 256, ... 4 blocks.
2. Redis memory per (block, holder) entry (INFO used_memory deltas; target <= 200 bytes).
3. BlockTransfer throughput over loopback vs a raw TCP socket moving the same bytes (target >= 50%), the
   serving side in another process (as deployed), then in this process: as deployed (gRPC hands the fetch
   to the raw block stream), over the gRPC stream only, and grpcio's own streaming ceiling.
   With cluster credentials (DESIGN 6b), side by side in one run: BlockTransfer as deployed without a
   credential, under the shared secret (a token per fetch, a proof per connection: no encryption) and under
   mutual TLS (both streams encrypted; certificates of a throwaway CA, benchmarks/pki.py), against the same
   raw TCP baseline (target: still >= 50% with encryption on).
4. Transfer + import of a 2048-token prefix of a ~50M-parameter Llama (hidden 512, 8 layers, 8 heads,
   2 kv heads, vocab 32000, fp32; built with transformers in a temp dir) vs recomputing it (target >= 3x).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from cache_service.block_hash import BlockHash, hash_prompt_blocks
from cache_service.embedded_redis import EmbeddedRedis, connect
from cache_service.index import ClusterIndex
from cache_service.loop_thread import LoopThread
from cache_service.raw_socket import tune_socket
from cache_service.transfer_client import TransferClient
from cache_service.records import BlockStored
from cache_service.transfer_server import TransferServer
from cache_service.transfer_servicer import BlockTransferServicer
from cache_service.types import NodeInfo
from loadgen.stats import percentile


def summarize(latencies_s: list[float], wall_s: float) -> dict[str, float]:
    return {
        "p50_ms": percentile(latencies_s, 50) * 1e3,
        "p99_ms": percentile(latencies_s, 99) * 1e3,
        "lookups_per_s": len(latencies_s) / wall_s,
    }


# ---- 1 + 2: the index ------------------------------------------------------------------------------
async def naive_lookup(r: Any, prefix: str, hashes: list[BlockHash], ids: dict[bytes, str]) -> dict[str, int]:
    """The per-key baseline: one HKEYS round trip per block until no live holder remains."""
    p = prefix.encode()
    first = await r.hkeys(p + b"b:" + hashes[0])
    alive = [idx for idx in first if await r.exists(p + b"hb:" + idx)]
    lens: dict[bytes, int] = {}
    cands = set(alive)
    for i in range(1, len(hashes)):
        if not cands:
            break
        holders = set(await r.hkeys(p + b"b:" + hashes[i]))
        for idx in cands - holders:
            lens[idx] = i
        cands &= holders
    for idx in cands:
        lens[idx] = len(hashes)
    return {ids[idx]: n for idx, n in lens.items()}


async def pipelined_lookup(r: Any, prefix: str, hashes: list[BlockHash], ids: dict[bytes, str]) -> dict[str, int]:
    """Per-key reads in one pipeline: one round trip, but every block's holders cross the wire."""
    p = prefix.encode()
    pipe = r.pipeline(transaction=False)
    for h in hashes:
        pipe.hkeys(p + b"b:" + h)
    rows = await pipe.execute()
    alive = [idx for idx in rows[0] if await r.exists(p + b"hb:" + idx)]
    out = {}
    for idx in alive:
        n = 0
        while n < len(rows) and idx in rows[n]:
            n += 1
        out[ids[idx]] = n
    return out


async def bench_index(iters: int, memory_blocks: int) -> dict[str, Any]:
    server = EmbeddedRedis()
    server.start()
    try:
        index = ClusterIndex(connect(server.url), bulk_client=connect(server.url, socket_timeout_s=30))
        hashes = hash_prompt_blocks(list(range(512 * 16)), 16, "bench")
        lengths = [512 >> i for i in range(8)]
        ids: dict[bytes, str] = {}
        for i, n in enumerate(lengths):
            reg = await index.register(NodeInfo(f"node-{i}", f"127.0.0.1:{7000 + i}", "bench"), 600)
            await index.publish(reg.node_id, reg.epoch, [BlockStored(h) for h in hashes[:n]])
            ids[await index.redis.hget("pc:ids", reg.node_id)] = reg.node_id
        expected = {f"node-{i}": n for i, n in enumerate(lengths)}
        got = {m.node_id: m.num_blocks for m in await index.lookup(hashes)}
        assert got == expected == await naive_lookup(index.redis, "pc:", hashes, ids) == \
            await pipelined_lookup(index.redis, "pc:", hashes, ids), "lookups disagree"
        results: dict[str, Any] = {}
        for name, fn, n in [
            ("script", lambda: index.lookup(hashes), iters),
            ("per_key_sequential", lambda: naive_lookup(index.redis, "pc:", hashes, ids), max(20, iters // 10)),
            ("per_key_pipelined", lambda: pipelined_lookup(index.redis, "pc:", hashes, ids), max(20, iters // 4)),
        ]:
            for _ in range(5):
                await fn()  # warm up
            lat = []
            t0 = time.perf_counter()
            for _ in range(n):
                t = time.perf_counter()
                await fn()
                lat.append(time.perf_counter() - t)
            results[name] = summarize(lat, time.perf_counter() - t0)
        # Memory per (block, holder) entry.
        await index.redis.flushall()
        r = index.redis
        blocks = [os.urandom(16) for _ in range(memory_blocks)]
        regs = [await index.register(NodeInfo(f"m{i}", "127.0.0.1:1", "bench"), 600) for i in range(4)]
        base = int((await r.info("memory"))["used_memory"])
        mem: dict[str, float] = {}
        for k, reg in enumerate(regs, start=1):
            for start in range(0, len(blocks), 50_000):
                await index.publish(reg.node_id, reg.epoch,
                                    [BlockStored(h) for h in blocks[start : start + 50_000]])
            used = int((await r.info("memory"))["used_memory"])
            mem[f"bytes_per_entry_{k}_holders"] = (used - base) / (k * len(blocks))
        mem["memory_usage_block_key_4_holders"] = await r.memory_usage(b"pc:b:" + blocks[0])
        await index.close()
        return {"lookup_512_blocks": results, "memory": mem, "memory_blocks": memory_blocks}
    finally:
        server.stop()


# ---- 3: BlockTransfer vs raw TCP ---------------------------------------------------------------------
# The serving side (BlockTransfer server, raw TCP sender, grpcio ceiling server) runs either in a spawned
# process, as in deployment (the peer is another actor on another node), or in this process on its own loop
# thread (then server and client share one GIL). The client is always this process.
def make_blocks(num_blocks: int, nbytes: int, seed: int = 0) -> list[Any]:
    """The same blocks in every process that asks with the same arguments (payloads from a seeded PRNG)."""
    import random

    from cache_service.block_wire import ExportedBlock

    rng = random.Random(seed)
    hashes = hash_prompt_blocks(list(range(num_blocks * 16)), 16, "bench")
    return [ExportedBlock(h, tuple(range(16)), rng.randbytes(nbytes)) for h in hashes]


class RawTcpSender:
    """The baseline's sending side: per request byte, the same payloads on a plain TCP socket, joined
    beforehand into one buffer and sent by one ``sendall`` (no per-block work at all: the socket's limit)."""

    def __init__(self, payloads: list[bytes]) -> None:
        self.payload = b"".join(payloads)
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(1)
        self.address = self._listener.getsockname()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return
        with conn:
            tune_socket(conn)  # the raw stream's options: compared with the best a plain socket does here
            while conn.recv(1) == b"x":  # one request byte per transfer; b"" on close
                conn.sendall(self.payload)

    def close(self) -> None:
        self._listener.close()
        self._thread.join(5)


class RawTcpReceiver:
    """The baseline's receiving side: the bytes into one preallocated buffer (no per-block work at all)."""

    def __init__(self, address: tuple[str, int], total: int) -> None:
        self.total = total
        self._conn = socket.create_connection(address)
        tune_socket(self._conn)
        self._buf = bytearray(total)

    def fetch_s(self) -> float:
        view = memoryview(self._buf)
        t0 = time.perf_counter()
        self._conn.sendall(b"x")
        got = 0
        while got < self.total:
            got += self._conn.recv_into(view[got:], self.total - got)
        return time.perf_counter() - t0

    def close(self) -> None:
        self._conn.close()


async def _start_ceiling_server(messages: list[bytes]) -> tuple[Any, str]:
    """grpcio's own ceiling: a stream of pre-serialized 1 MiB messages, no protocol work at all."""
    import grpc

    async def stream(request: bytes, context: Any) -> Any:
        for m in messages:
            yield m

    server = grpc.aio.server(options=[("grpc.max_send_message_length", 8 << 20)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Ceiling", {
        "Stream": grpc.unary_stream_rpc_method_handler(stream, request_deserializer=None, response_serializer=None),
    }),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def _ceiling_fetch(channel: Any) -> int:
    call = channel.unary_stream("/bench.Ceiling/Stream", request_serializer=None, response_deserializer=None)
    n = 0
    async for m in call(b""):
        n += len(m)
    return n


class TransferPeer:
    """The serving side of the transfer benchmark: BlockTransfer + raw TCP + ceiling servers on one loop."""

    def __init__(self, num_blocks: int, nbytes: int) -> None:
        blocks = make_blocks(num_blocks, nbytes)
        self.by_hash = {b.block_hash: b for b in blocks}
        total = num_blocks * nbytes
        self.loop = LoopThread("bench-peer").start()
        self.server = TransferServer(BlockTransferServicer(self.export, "bench"))
        self.transfer_address = self.loop.run(self.server.start(), 30)
        self.raw = RawTcpSender([b.payload for b in blocks])
        self.ceiling_server, self.ceiling_address = self.loop.run(
            _start_ceiling_server([os.urandom(min(1 << 20, total - i)) for i in range(0, total, 1 << 20)]), 30)

    def export(self, hs: list[BlockHash]) -> list[Any]:
        out = []
        for h in hs:
            if h not in self.by_hash:
                break
            out.append(self.by_hash[h])
        return out

    def addresses(self) -> tuple[str, tuple[str, int], str]:
        return self.transfer_address, self.raw.address, self.ceiling_address

    def close(self) -> None:
        self.raw.close()
        self.loop.run(self.server.stop(0), 10)
        self.loop.run(self.ceiling_server.stop(0), 10)
        self.loop.stop()


def _peer_process_main(conn: Any, num_blocks: int, nbytes: int) -> None:
    """Entry point of the spawned serving process: report the addresses, serve until told to stop."""
    peer = TransferPeer(num_blocks, nbytes)
    try:
        conn.send(peer.addresses())
        conn.recv()  # anything (or EOF when the parent dies) means stop
    except EOFError:
        pass
    finally:
        peer.close()
        conn.close()


def _spawn_peer(target: Any, *args: Any) -> tuple[Any, Any, Any]:
    """(process, pipe, what it sent first) of a spawned serving process ``target(pipe, *args)``."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child_conn, *args), daemon=True)
    proc.start()
    child_conn.close()
    try:
        if not parent_conn.poll(60):
            raise RuntimeError("the benchmark's serving process did not start within 60 s")
        return proc, parent_conn, parent_conn.recv()
    except (EOFError, RuntimeError) as exc:
        proc.kill()
        proc.join(5)
        raise RuntimeError(f"the benchmark's serving process failed to start (exit code {proc.exitcode})") from exc


def _stop_peer(proc: Any, conn: Any) -> None:
    try:
        conn.send("stop")
    except OSError:
        pass
    proc.join(15)
    if proc.is_alive():
        proc.kill()
        proc.join(5)


def bench_transfer(num_blocks: int, nbytes: int, reps: int, *, out_of_process: bool = True,
                   chunk_bytes: int | None = None) -> dict[str, Any]:
    """Alternates a BlockTransfer fetch, a raw TCP transfer of the same bytes and the grpcio ceiling ``reps``
    times (after one warm-up round): on a shared machine the ratio of each adjacent pair is steadier than
    either rate alone. ``out_of_process``: the serving side runs in a spawned process."""
    from cache_service.transfer_settings import DEFAULT_CHUNK_BYTES

    chunk_bytes = chunk_bytes or DEFAULT_CHUNK_BYTES
    expected = make_blocks(num_blocks, nbytes)
    hashes = [b.block_hash for b in expected]
    total = num_blocks * nbytes
    proc = parent_conn = peer = None
    if out_of_process:
        proc, parent_conn, (address, raw_address, ceiling_address) = _spawn_peer(
            _peer_process_main, num_blocks, nbytes)
    else:
        peer = TransferPeer(num_blocks, nbytes)
        address, raw_address, ceiling_address = peer.addresses()
    client_loop = LoopThread("bench-client").start()
    client = TransferClient("bench", max_chunk_bytes=chunk_bytes)  # as deployed: the raw block stream
    grpc_client = TransferClient("bench", max_chunk_bytes=chunk_bytes, raw_stream=False)  # gRPC stream only
    raw = RawTcpReceiver(raw_address, total)

    async def open_channel() -> Any:
        import grpc

        return grpc.aio.insecure_channel(ceiling_address, options=[("grpc.max_receive_message_length", 8 << 20)])

    ceiling_channel = client_loop.run(open_channel(), 10)
    bt_rates, grpc_rates, raw_rates, ceiling_rates = [], [], [], []
    try:
        for i in range(reps + 1):
            t0 = time.perf_counter()
            got, num_bytes = client_loop.run(client.fetch_blocks(address, hashes, timeout_s=60), 120)
            bt_s = time.perf_counter() - t0
            assert len(got) == num_blocks and num_bytes == total, (len(got), num_bytes)
            if i <= 1:  # every byte, outside the timed part
                assert all(bytes(g.payload) == e.payload for g, e in zip(got, expected)), "payload mismatch"
            del got
            t0 = time.perf_counter()
            got, num_bytes = client_loop.run(grpc_client.fetch_blocks(address, hashes, timeout_s=60), 120)
            grpc_s = time.perf_counter() - t0
            assert len(got) == num_blocks and num_bytes == total, (len(got), num_bytes)
            if i <= 1:
                assert all(bytes(g.payload) == e.payload for g, e in zip(got, expected)), "payload mismatch"
            del got
            raw_s = raw.fetch_s()
            t0 = time.perf_counter()
            assert client_loop.run(_ceiling_fetch(ceiling_channel), 120) == total
            ceiling_s = time.perf_counter() - t0
            if i:  # the first round warms up connections and allocators
                bt_rates.append(total / bt_s / 1e6)
                grpc_rates.append(total / grpc_s / 1e6)
                raw_rates.append(total / raw_s / 1e6)
                ceiling_rates.append(total / ceiling_s / 1e6)
        assert client.num_raw_fetches == reps + 1 and grpc_client.num_raw_fetches == 0  # each path as named
        client_loop.run(client.close(), 10)
        client_loop.run(grpc_client.close(), 10)
        client_loop.run(ceiling_channel.close(), 10)
    finally:
        raw.close()
        client_loop.stop()
        if peer is not None:
            peer.close()
        if proc is not None:
            _stop_peer(proc, parent_conn)
    return {"out_of_process": out_of_process, "bytes": total, "block_bytes": nbytes, "chunk_bytes": chunk_bytes,
            "reps": reps,
            "block_transfer_mb_s": statistics.median(bt_rates), "raw_tcp_mb_s": statistics.median(raw_rates),
            "grpc_stream_mb_s": statistics.median(grpc_rates),
            "grpc_ceiling_mb_s": statistics.median(ceiling_rates),
            "ratio": statistics.median([b / r for b, r in zip(bt_rates, raw_rates)]),
            "grpc_stream_ratio": statistics.median([g / r for g, r in zip(grpc_rates, raw_rates)]),
            "grpc_stream_ratio_to_ceiling": statistics.median([g / c for g, c in zip(grpc_rates, ceiling_rates)]),
            "ceiling_ratio": statistics.median([c / r for c, r in zip(ceiling_rates, raw_rates)])}


# ---- 3b: BlockTransfer under the cluster's credentials ---------------------------------------------------
AUTH_MODES = ("open", "secret", "mtls")


def _members(mode: str, identity: str, secret: bytes, tls: tuple[str, str, str]) -> Any:
    from common.cluster_auth import Member, SharedSecret, TlsFiles

    if mode == "open":
        return None
    return Member(identity, SharedSecret(secret) if mode == "secret" else TlsFiles(*tls))


class SecuredPeer:
    """The serving side of the credential benchmark: one BlockTransfer server per mode (worker-0 in each
    cluster) over the same blocks, and the raw TCP sender, on one loop."""

    def __init__(self, num_blocks: int, nbytes: int, secret: bytes, tls: tuple[str, str, str]) -> None:
        blocks = make_blocks(num_blocks, nbytes)
        self.by_hash = {b.block_hash: b for b in blocks}
        self.loop = LoopThread("bench-secured-peer").start()
        self.servers = {mode: TransferServer(BlockTransferServicer(self.export, "bench"),
                                             member=_members(mode, "worker-0", secret, tls))
                        for mode in AUTH_MODES}
        self.addresses = {mode: self.loop.run(server.start(), 30) for mode, server in self.servers.items()}
        self.raw = RawTcpSender([b.payload for b in blocks])

    def export(self, hs: list[BlockHash]) -> list[Any]:
        return [self.by_hash[h] for h in hs if h in self.by_hash]

    def close(self) -> None:
        self.raw.close()
        for server in self.servers.values():
            self.loop.run(server.stop(0), 10)
        self.loop.stop()


def _secured_peer_main(conn: Any, num_blocks: int, nbytes: int, secret: bytes, tls: tuple[str, str, str]) -> None:
    peer = SecuredPeer(num_blocks, nbytes, secret, tls)
    try:
        conn.send((peer.addresses, peer.raw.address))
        conn.recv()
    except EOFError:
        pass
    finally:
        peer.close()
        conn.close()


def bench_transfer_auth(num_blocks: int, nbytes: int, reps: int) -> dict[str, Any]:
    """Alternates a fetch in each mode and a raw TCP transfer of the same bytes ``reps`` times (after a
    warm-up round), the serving side in a spawned process; ratios of adjacent measurements."""
    from benchmarks.pki import ThrowawayPki

    expected = make_blocks(num_blocks, nbytes)
    hashes = [b.block_hash for b in expected]
    total = num_blocks * nbytes
    with tempfile.TemporaryDirectory() as tmp:
        pki = ThrowawayPki(tmp)
        pki.issue_all(["worker-0", "worker-1"])
        tls, secret = pki.template(), os.urandom(32)
        proc, parent_conn, (addresses, raw_address) = _spawn_peer(_secured_peer_main, num_blocks, nbytes, secret,
                                                                  tls)
        loop = LoopThread("bench-secured-client").start()
        clients = {mode: TransferClient("worker-1", member=_members(mode, "worker-1", secret, tls))
                   for mode in AUTH_MODES}
        raw = RawTcpReceiver(raw_address, total)
        rates: dict[str, list[float]] = {mode: [] for mode in (*AUTH_MODES, "raw_tcp")}
        try:
            for i in range(reps + 1):
                for mode, client in clients.items():
                    t0 = time.perf_counter()
                    got, num_bytes = loop.run(client.fetch_blocks(addresses[mode], hashes, peer="worker-0",
                                                                  timeout_s=60), 120)
                    elapsed = time.perf_counter() - t0
                    assert len(got) == num_blocks and num_bytes == total, (mode, len(got), num_bytes)
                    if i <= 1:
                        assert all(bytes(g.payload) == e.payload for g, e in zip(got, expected)), mode
                    del got
                    if i:
                        rates[mode].append(total / elapsed / 1e6)
                raw_s = raw.fetch_s()
                if i:
                    rates["raw_tcp"].append(total / raw_s / 1e6)
            assert all(c.num_raw_fetches == reps + 1 for c in clients.values())  # the raw stream, in every mode
            for client in clients.values():
                loop.run(client.close(), 10)
        finally:
            raw.close()
            loop.stop()
            _stop_peer(proc, parent_conn)
    out: dict[str, Any] = {"bytes": total, "block_bytes": nbytes, "reps": reps}
    for mode, r in rates.items():
        out[f"{mode}_mb_s"] = statistics.median(r)
    for mode in AUTH_MODES:
        out[f"{mode}_ratio"] = statistics.median([m / t for m, t in zip(rates[mode], rates["raw_tcp"])])
        out[f"{mode}_vs_open"] = statistics.median([m / o for m, o in zip(rates[mode], rates["open"])])
    return out


# ---- 4: transfer + import vs recompute on a ~50M Llama ---------------------------------------------
def build_llama_50m(folder: Path) -> None:
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=2, intermediate_size=1536, max_position_embeddings=4096,
                         bos_token_id=0, eos_token_id=1, tie_word_embeddings=False, torch_dtype="float32")
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    vocab = {f"t{i}": i for i in range(32000)}
    Tokenizer(models.WordLevel(vocab, unk_token="t2")).save(str(folder / "tokenizer.json"))


def bench_model(num_tokens: int, reps: int) -> dict[str, Any]:
    from cache_service.local_node import LocalCacheNode
    from cache_service.peer_trust import TrustConfig
    from cache_service.prefix_fetcher import FetcherConfig, FetchOutcome
    from cache_service.records import PeerHint
    from cache_service.cache_node import CacheNodeConfig
    from workers.engine import Engine, EngineConfig
    from workers.model import load_model
    from cache_service.records import SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "llama-50m"
        build_llama_50m(folder)
        loaded = load_model(folder)
    num_blocks = num_tokens // 16 + 8
    cfg = EngineConfig(model=str(folder), block_size=16, num_blocks=num_blocks, max_num_batched_tokens=4096)
    prompt = [(i * 7919) % 31000 + 3 for i in range(num_tokens + 1)]  # 2048 cacheable + the last token
    params = SamplingParams(max_tokens=1)
    # Transfer + import alone, every round alike (the default policy would verify the first two rounds only);
    # what verification adds is bench_verify.py's.
    trust = TrustConfig(verify_first=0, sample_every=0)
    node_cfg = CacheNodeConfig(fetcher=FetcherConfig(always_transfer=True, max_deadline_s=120, trust=trust))
    a = LocalCacheNode(Engine(cfg, loaded=loaded), "A", config=node_cfg).start()
    b = LocalCacheNode(Engine(cfg, loaded=loaded), "B", config=node_cfg).start()
    try:
        a.call(lambda e: e.generate([prompt], params))  # warm-up + A holds the prefix
        recompute, transfer, ttft_transfer = [], [], []
        n_blocks = num_tokens // 16
        hint = PeerHint("A", a.transfer_address, n_blocks)
        for _ in range(reps):
            assert b.call(lambda e: e.reset_cache())
            t0 = time.perf_counter()
            out = b.call(lambda e: e.generate([prompt], params))[0]
            recompute.append(time.perf_counter() - t0)
            assert out.cached_tokens == 0
            assert b.call(lambda e: e.reset_cache())
            t0 = time.perf_counter()
            f = b.fetch_prefix(prompt, peer=hint, peer_known=True)
            transfer.append(time.perf_counter() - t0)
            assert f.outcome == FetchOutcome.TRANSFERRED and f.num_tokens == num_tokens, f
            out2 = b.call(lambda e: e.generate([prompt], params))[0]
            ttft_transfer.append(time.perf_counter() - t0)
            assert out2.cached_tokens == num_tokens and out2.new_token_ids == out.new_token_ids
        block_nbytes = a.engine.block_nbytes
    finally:
        a.stop()
        b.stop()
    r, t, tt = statistics.median(recompute), statistics.median(transfer), statistics.median(ttft_transfer)
    return {
        "num_params": loaded.num_params, "num_tokens": num_tokens, "bytes": n_blocks * block_nbytes,
        "recompute_s": r, "transfer_import_s": t, "ttft_with_transfer_s": tt,
        "speedup_transfer_vs_recompute": r / t, "speedup_ttft": r / tt,
    }


def print_transfer_auth(ta: dict[str, Any]) -> None:
    print(f"BlockTransfer with cluster credentials, serving side in another process ({ta['bytes'] >> 20} MiB, "
          f"median of {ta['reps']} alternating rounds; raw TCP {ta['raw_tcp_mb_s']:.0f} MB/s):")
    for mode, what in (("open", "no credential"), ("secret", "shared secret (authenticated, not encrypted)"),
                       ("mtls", "mutual TLS (encrypted)")):
        print(f"  {what:<46}{ta[f'{mode}_mb_s']:>7.0f} MB/s = {ta[f'{mode}_ratio'] * 100:>4.0f}% of raw TCP, "
              f"{ta[f'{mode}_vs_open'] * 100:>4.0f}% of no credential")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run)")
    parser.add_argument("--skip-model", action="store_true", help="skip the 50M Llama section")
    parser.add_argument("--auth-only", action="store_true", help="only BlockTransfer with cluster credentials (3b)")
    args = parser.parse_args(argv)
    q = args.quick
    out: dict[str, Any] = {}
    if args.auth_only:
        out["transfer_auth"] = bench_transfer_auth(num_blocks=32 if q else 128, nbytes=128 << 10, reps=3 if q else 15)
        if args.json:
            print(json.dumps(out, indent=2))
        else:
            print_transfer_auth(out["transfer_auth"])
        return 0
    out["index"] = asyncio.run(bench_index(iters=100 if q else 1000, memory_blocks=20_000 if q else 100_000))
    # Blocks of 128 KiB: one block of the 50M Llama below (8 layers x K,V x 16 tokens x 2 heads x 64 x fp32).
    out["transfer"] = bench_transfer(num_blocks=32 if q else 128, nbytes=128 << 10, reps=3 if q else 15)
    out["transfer_in_process"] = bench_transfer(num_blocks=32 if q else 128, nbytes=128 << 10,
                                                reps=3 if q else 9, out_of_process=False)
    out["transfer_auth"] = bench_transfer_auth(num_blocks=32 if q else 128, nbytes=128 << 10, reps=3 if q else 15)
    if not args.skip_model:
        out["model"] = bench_model(num_tokens=2048, reps=1 if q else 3)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    lk = out["index"]["lookup_512_blocks"]
    print("Lookup of a 512-block prompt (8 nodes), embedded Valkey")
    print(f"  {'method':<22}{'p50 ms':>9}{'p99 ms':>9}{'lookups/s':>11}")
    for name, s in lk.items():
        print(f"  {name:<22}{s['p50_ms']:>9.3f}{s['p99_ms']:>9.3f}{s['lookups_per_s']:>11.0f}")
    print(f"  script vs per-key sequential: {lk['per_key_sequential']['p50_ms'] / lk['script']['p50_ms']:.1f}x "
          f"lower p50; vs pipelined: {lk['per_key_pipelined']['p50_ms'] / lk['script']['p50_ms']:.1f}x")
    mem = out["index"]["memory"]
    print(f"Redis memory per (block, holder) entry ({out['index']['memory_blocks']} blocks): "
          + ", ".join(f"{k.split('_')[3]} holder(s) {v:.0f} B" for k, v in mem.items() if k.startswith("bytes")))
    for key, where in [("transfer", "serving side in another process"),
                       ("transfer_in_process", "server and client in one process")]:
        tr = out[key]
        print(f"BlockTransfer over loopback, {where} ({tr['bytes'] >> 20} MiB in {tr['block_bytes'] >> 10} KiB "
              f"blocks, median of {tr['reps']} alternating rounds): {tr['block_transfer_mb_s']:.0f} MB/s vs raw TCP "
              f"{tr['raw_tcp_mb_s']:.0f} MB/s = {tr['ratio'] * 100:.0f}% (raw block stream, as deployed); "
              f"gRPC stream only ({tr['chunk_bytes'] >> 10} KiB messages) {tr['grpc_stream_mb_s']:.0f} MB/s = "
              f"{tr['grpc_stream_ratio'] * 100:.0f}%; grpcio's own ceiling (pre-serialized 1 MiB messages) "
              f"{tr['grpc_ceiling_mb_s']:.0f} MB/s = {tr['ceiling_ratio'] * 100:.0f}%")
    print_transfer_auth(out["transfer_auth"])
    if "model" in out:
        m = out["model"]
        print(f"{m['num_tokens']}-token prefix of a {m['num_params'] / 1e6:.0f}M Llama ({m['bytes'] >> 20} MiB of KV): "
              f"recompute {m['recompute_s'] * 1e3:.0f} ms, transfer+import {m['transfer_import_s'] * 1e3:.0f} ms "
              f"({m['speedup_transfer_vs_recompute']:.1f}x faster); TTFT {m['ttft_with_transfer_s'] * 1e3:.0f} ms "
              f"({m['speedup_ttft']:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
