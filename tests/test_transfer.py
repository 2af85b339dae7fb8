"""Block transfer between two real engines (each a cache node with a BlockTransfer server on loopback),
the transfer protocol, the transfer-vs-recompute policy, and the worker-side pieces around them."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from cache_fixtures import (  # noqa: F401  (pytest fixtures)
    PARAMS,
    cache_service,
    cold_output,
    demo_model,
    make_node,
    prompt_of,
    wait_until,
)
from valkey_fixtures import expire_node, valkey_module  # noqa: F401  (pytest fixtures)

from cache_service.block_hash import hash_prompt_blocks
from cache_service.event_queue import EventQueue
from cache_service.prefix_fetcher import FetchOutcome
from cache_service.records import PeerHint
from cache_service.replica_mirror import ReplicaMirror
from cache_service.transfer_client import TransferClient, TransferError, _Assembler
from cache_service.transfer_policy import TransferPolicy
from protos.prefixcache.v1 import cache_pb2 as pb
from protos.prefixcache.v1 import cache_pb2_grpc
from cache_service.records import BlockRemoved, BlockStored
from workers.block_pool import BlockPool


def lookup(node, prompt, salt=""):
    hashes = node.engine.block_hashes(prompt, salt)
    return [(m.node_id, m.num_blocks) for m in node.loop.run(node.node.lookup(hashes), 10)]


def test_prefix_held_by_a_is_transferred_to_b_and_output_is_identical(make_node, demo_model, cache_service):
    a, b = make_node("A"), make_node("B")
    prompt = prompt_of(16 * 6 + 5)  # 6 full blocks + a tail
    expected = cold_output(demo_model, prompt)
    (out_a,), (fa,) = a.generate([prompt], PARAMS)
    assert (out_a.new_token_ids, out_a.cached_tokens, fa.outcome) == (expected, 0, FetchOutcome.NO_PEER)
    assert a.flush()
    assert lookup(b, prompt) == [("A", 6)]
    (out_b,), (fb,) = b.generate([prompt], PARAMS)
    assert fb.outcome == FetchOutcome.TRANSFERRED and fb.error is None
    assert (fb.peer, fb.num_local_blocks, fb.num_blocks, fb.num_tokens) == ("A", 0, 6, 96)
    assert fb.num_bytes == 6 * len(a.engine.export_blocks(a.engine.block_hashes(prompt)[:1])[0].payload)
    assert out_b.cached_tokens == 96  # the transferred tokens count as cached
    assert out_b.new_token_ids == expected
    # B now holds the prefix too, and both sides know the blocks are replicated.
    assert b.flush()
    assert lookup(a, prompt) == [("A", 6), ("B", 6)]
    hashes = a.engine.block_hashes(prompt)
    assert all(a.node.advisor.is_replicated(h) for h in hashes)
    assert all(b.node.advisor.is_replicated(h) for h in hashes)
    # The transfer is counted cluster-wide (delivered with B's next heartbeat).
    stub = cache_pb2_grpc.CacheServiceStub(grpc.insecure_channel(cache_service.address))
    wait_until(lambda: stub.GetStats(pb.GetStatsRequest()).counters.get("transferred_blocks") == 6,
               what="the transfer counters")
    counters = stub.GetStats(pb.GetStatsRequest()).counters
    assert (counters["transfers"], counters.get("transfers_failed", 0)) == (1, 0)
    a.engine.check_integrity()
    b.engine.check_integrity()
    # The bytes came over A's raw block stream, after one gRPC answer that named it.
    assert a.node.servicer.stats.num_raw_requests == 1
    assert b.node.transfer_client.raw_address(a.transfer_address) == a.node.servicer.raw_stream_address != ""


def test_only_missing_blocks_are_fetched_after_a_local_hit(make_node, demo_model):
    a, b = make_node("A"), make_node("B")
    prompt = prompt_of(16 * 5 + 3, seed=1)
    a.generate([prompt], PARAMS)
    assert a.flush()
    b.generate([prompt[: 16 * 2 + 1]], PARAMS)  # B computes the first 2 blocks itself
    (out,), (f,) = b.generate([prompt], PARAMS)
    assert (f.outcome, f.num_local_blocks, f.num_peer_blocks, f.num_blocks) == (FetchOutcome.TRANSFERRED, 2, 5, 3), f
    assert out.cached_tokens == 80
    assert out.new_token_ids == cold_output(demo_model, prompt)


def test_salted_prefixes_are_never_shared_across_tenants(make_node):
    a, b = make_node("A"), make_node("B")
    prompt = prompt_of(16 * 3 + 1, seed=2)
    a.generate([prompt], PARAMS, cache_salt="tenant-1")
    assert a.flush()
    (out,), (f,) = b.generate([prompt], PARAMS, cache_salt="tenant-2")
    assert (f.outcome, out.cached_tokens) == (FetchOutcome.NO_PEER, 0), f
    (out,), (f,) = b.generate([prompt], PARAMS, cache_salt="tenant-1")
    assert (f.outcome, f.num_blocks, out.cached_tokens) == (FetchOutcome.TRANSFERRED, 3, 48), f


def test_policy_recomputes_when_transfer_is_predicted_slower(make_node):
    a, b = make_node("A"), make_node("B", always_transfer=False)
    prompt = prompt_of(16 * 4 + 1, seed=3)
    a.generate([prompt], PARAMS)
    assert a.flush()
    b.node.policy.bandwidth_bytes_per_s = 1.0  # a hopeless network
    (out,), (f,) = b.generate([prompt], PARAMS)
    assert (f.outcome, f.peer, f.num_peer_blocks, out.cached_tokens) == (FetchOutcome.RECOMPUTE, "A", 4, 0), f
    assert f.predicted_transfer_s > f.predicted_recompute_s
    b.node.policy.bandwidth_bytes_per_s = 1e12  # a free network
    other = prompt_of(16 * 4 + 2, seed=30)
    a.generate([other], PARAMS)
    assert a.flush()
    (out,), (f,) = b.generate([other], PARAMS)
    assert (f.outcome, f.num_blocks) == (FetchOutcome.TRANSFERRED, 4), f


def test_index_tracks_stores_evictions_and_expiry_of_real_engines(make_node, valkey_module):
    a = make_node("A", num_blocks=12)
    b = make_node("B")
    p1, p2 = prompt_of(16 * 6 + 1, seed=4), prompt_of(16 * 8 + 1, seed=5)
    a.generate([p1], PARAMS)
    assert a.flush()
    assert lookup(b, p1) == [("A", 6)]
    a.generate([p2], PARAMS)  # 12 blocks: p1's blocks are evicted to make room
    assert a.flush()
    for prompt in (p1, p2):
        held = a.call(lambda e, p=prompt: e.num_cached_prefix_blocks(e.block_hashes(p)))
        assert lookup(b, prompt) == ([("A", held)] if held else [])
    assert a.call(lambda e: e.num_cached_prefix_blocks(e.block_hashes(p1))) < 6  # p1 lost blocks to p2
    a.stop()  # no more heartbeats: A's TTL would run out; its heartbeat key goes now
    assert 0 < expire_node(valkey_module, "A")
    wait_until(lambda: lookup(b, p2) == [], what="A's entries to leave lookups")


def test_chunked_stream_reassembles_exactly(make_node):
    a = make_node("A")
    prompt = prompt_of(16 * 3 + 1, seed=6)
    a.generate([prompt], PARAMS)
    hashes = a.engine.block_hashes(prompt)
    exported = a.call(lambda e: e.export_blocks(hashes))
    # payloads of ~64 KiB: 17 chunks each, on the gRPC stream (the raw stream does not chunk)
    client = TransferClient("test", max_chunk_bytes=4096, raw_stream=False)

    async def fetch():
        try:
            return await client.fetch_blocks(a.transfer_address, hashes, model_id="demo")
        finally:
            await client.close()

    blocks, num_bytes = a.loop.run(fetch(), 30)  # any loop works; reuse A's
    assert blocks == exported and num_bytes == sum(len(b.payload) for b in exported)
    assert a.node.servicer.stats.num_blocks == 3 and a.node.servicer.stats.num_raw_requests == 0
    # A plain protobuf client (no bundles): one message per chunk, in order, token ids on chunk 0 only.
    with grpc.insecure_channel(a.transfer_address) as channel:
        stub = cache_pb2_grpc.BlockTransferStub(channel)
        request = pb.FetchBlocksRequest(block_hashes=hashes, max_chunk_bytes=32 << 10)
        chunks = list(stub.FetchBlocks(request, timeout=10))
        n = -(-len(exported[0].payload) // (32 << 10))
        assert [(c.block_index, c.chunk_index, c.num_chunks) for c in chunks] == \
            [(i, j, n) for i in range(3) for j in range(n)]
        assert all(list(c.token_ids) == (list(exported[c.block_index].token_ids) if c.chunk_index == 0 else [])
                   for c in chunks)
        assert b"".join(c.data for c in chunks if c.block_index == 1) == exported[1].payload
        # With bundles, small blocks share messages (up to max_chunk_bytes).
        request = pb.FetchBlocksRequest(block_hashes=hashes, max_chunk_bytes=4 << 20, accept_bundles=True)
        (message,) = list(stub.FetchBlocks(request, timeout=10))
        assert [(c.block_index, c.data) for c in [message, *message.bundled]] == \
            [(i, b.payload) for i, b in enumerate(exported)]


def test_raw_stream_carries_the_blocks_and_grpc_is_the_fallback(make_node):
    a = make_node("A", cache_address=None)
    prompt = prompt_of(16 * 3 + 1, seed=8)
    a.generate([prompt], PARAMS)
    hashes = a.engine.block_hashes(prompt)
    exported = a.call(lambda e: e.export_blocks(hashes))
    stats, raw_address = a.node.servicer.stats, a.node.servicer.raw_stream_address
    client = TransferClient("test")

    def fetch(want=hashes, address=a.transfer_address):
        return a.loop.run(client.fetch_blocks(address, want, model_id="demo"), 30)

    # First contact: gRPC names the raw stream, the blocks come over it.
    assert fetch() == (exported, sum(len(b.payload) for b in exported))
    assert client.raw_address(a.transfer_address) == raw_address
    assert (client.num_grpc_fetches, client.num_raw_fetches, stats.num_raw_requests) == (1, 1, 1)
    # Then straight to the raw stream, on the same connection; a chain that ends early ends early.
    blocks, _ = fetch(hashes[:2] + [b"\x01" * 16])
    assert blocks == exported[:2]
    assert (client.num_grpc_fetches, client.num_raw_fetches, stats.num_raw_requests) == (1, 2, 2)
    # The raw stream goes away (its pooled connection with it): this fetch, and the next ones, use gRPC.
    a.loop.run(a.node.transfer_server.raw.stop(), 10)
    assert fetch()[0] == exported
    assert fetch()[0] == exported
    assert (client.num_grpc_fetches, client.num_raw_fetches, stats.num_raw_requests) == (3, 3, 2)
    # A worker without a raw stream answers on gRPC, and the client remembers that.
    c = make_node("C", cache_address=None, raw_stream=False)
    c.generate([prompt], PARAMS)
    assert fetch(address=c.transfer_address)[0] == exported
    assert client.raw_address(c.transfer_address) == "" and c.node.servicer.raw_stream_address == ""
    a.loop.run(client.close(), 10)


def test_raw_stream_rejects_bad_frames_and_requests(make_node):
    import socket
    import struct

    from cache_service.raw_frames import HEADER, KIND_ERROR, KIND_REQUEST

    a = make_node("A", cache_address=None)
    host, port = a.node.servicer.raw_stream_address.rsplit(":", 1)

    def exchange(frame: bytes) -> tuple[int, str, bytes]:
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(frame)
            answer = b""
            while chunk := sock.recv(65536):  # the worker closes the connection after an error
                answer += chunk
        kind, meta_len, _ = HEADER.unpack_from(answer)
        return kind, answer[HEADER.size : HEADER.size + meta_len].decode(), answer[HEADER.size + meta_len :]

    def request(req: pb.FetchBlocksRequest) -> bytes:
        meta = req.SerializeToString()
        return HEADER.pack(KIND_REQUEST, len(meta), 0) + meta

    http = b"GET / HTTP/1.1\r\n\r\n"  # 18 bytes: a header that makes no sense, and 2 more
    meta_len, data_len = struct.unpack_from("<IQ", http, 4)
    assert exchange(http)[:2] == (
        KIND_ERROR, f"INVALID_ARGUMENT: malformed request frame (kind 71, meta {meta_len} B, data {data_len} B)")
    assert exchange(HEADER.pack(KIND_REQUEST, 3, 0) + b"\xff\xff\xff")[:2] == (
        KIND_ERROR, "INVALID_ARGUMENT: the request is not a FetchBlocksRequest")
    kind, message, rest = exchange(request(pb.FetchBlocksRequest(block_hashes=[b"\x00" * 16], model_id="llama")))
    assert (kind, message, rest) == (
        KIND_ERROR, "INVALID_ARGUMENT: model_id 'llama' does not match this worker's model 'demo'", b"")
    kind, message, _ = exchange(request(pb.FetchBlocksRequest(block_hashes=[b"\x00" * 15])))
    assert kind == KIND_ERROR and "block_hashes[0] is 15 bytes" in message
    # Through the client: a clear TransferError; and the worker still serves good requests.
    client = TransferClient("test")
    with pytest.raises(TransferError, match="INVALID_ARGUMENT: model_id 'llama' does not match"):
        a.loop.run(client.fetch_blocks(a.transfer_address, [b"\x00" * 16], model_id="llama"), 30)
    prompt = prompt_of(16 * 2, seed=9)
    a.generate([prompt], PARAMS)
    blocks, _ = a.loop.run(client.fetch_blocks(a.transfer_address, a.engine.block_hashes(prompt)), 30)
    assert len(blocks) == 2 and client.num_raw_fetches >= 1
    a.loop.run(client.close(), 10)


def test_fetch_blocks_rejects_bad_requests(make_node):
    a = make_node("A", cache_address=None)
    with grpc.insecure_channel(a.transfer_address) as channel:
        stub = cache_pb2_grpc.BlockTransferStub(channel)
        for request, message in [
            (pb.FetchBlocksRequest(block_hashes=[b"\x00" * 15]), "block_hashes[0] is 15 bytes"),
            (pb.FetchBlocksRequest(block_hashes=[b"\x00" * 16], model_id="llama"),
             "model_id 'llama' does not match this worker's model 'demo'"),
            (pb.FetchBlocksRequest(block_hashes=[b"\x00" * 16] * 10_000), "the limit is 8192"),
        ]:
            with pytest.raises(grpc.RpcError) as info:
                list(stub.FetchBlocks(request, timeout=5))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in info.value.details()
        # Unknown hashes: an empty stream, not an error.
        assert list(stub.FetchBlocks(pb.FetchBlocksRequest(block_hashes=[b"\x01" * 16]), timeout=5)) == []


def test_router_hint_skips_the_lookup(make_node, demo_model):
    a = make_node("A")
    b = make_node("B", cache_address=None)  # no cache service at all: only the hint
    prompt = prompt_of(16 * 2 + 1, seed=7)
    a.generate([prompt], PARAMS)
    f = b.fetch_prefix(prompt, peer=PeerHint("A", a.transfer_address, 2), peer_known=True)
    assert (f.outcome, f.num_blocks) == (FetchOutcome.TRANSFERRED, 2), f
    out = b.call(lambda e: e.generate([prompt], PARAMS))[0]
    assert (out.cached_tokens, out.new_token_ids) == (32, cold_output(demo_model, prompt))


# ---- protocol, policy and bookkeeping units ------------------------------------------------
def _chunk(i, h, c, n, data=b"x", tokens=(1, 2)):
    return pb.BlockChunk(block_index=i, block_hash=h, chunk_index=c, num_chunks=n, data=data,
                         token_ids=tokens if c == 0 else ())


def test_assembler_rejects_protocol_violations():
    h = hash_prompt_blocks(list(range(32)), 16, "demo")
    ok = _Assembler(h)
    for chunk in [_chunk(0, h[0], 0, 2, b"ab"), _chunk(0, h[0], 1, 2, b"cd"), _chunk(1, h[1], 0, 1, b"ef")]:
        ok.add(chunk)
    assert [(b.payload, b.token_ids) for b in ok.finish()] == [(b"abcd", (1, 2)), (b"ef", (1, 2))]
    cases = [
        ([_chunk(1, h[1], 0, 1)], "peer sent block 1 while block 0 was expected"),
        ([_chunk(0, h[1], 0, 1)], "block 0: peer sent hash"),
        ([_chunk(0, h[0], 1, 2)], "chunk 1 arrived while chunk 0 was expected"),
        ([_chunk(0, h[0], 0, 1, tokens=())], "the first chunk carries no token ids"),
        ([_chunk(0, h[0], 0, 2), _chunk(0, h[0], 1, 3)], "num_chunks changed from 2 to 3"),
        ([_chunk(0, h[0], 0, 1), _chunk(1, h[1], 0, 1), _chunk(2, h[1], 0, 1)], "more blocks than the 2 requested"),
    ]
    for chunks, message in cases:
        asm = _Assembler(h)
        with pytest.raises(TransferError, match=message):
            for chunk in chunks:
                asm.add(chunk)
    asm = _Assembler(h)
    asm.add(_chunk(0, h[0], 0, 3))
    with pytest.raises(TransferError, match="stream ended after 1 of 3 chunks"):
        asm.finish()


def test_transfer_policy_predicts_and_learns():
    policy = TransferPolicy(bandwidth_bytes_per_s=100e6, latency_s=0.001, prefill_tokens_per_s=1000, margin=1.0)
    d = policy.decide(num_tokens=100, num_bytes=1_000_000)  # 0.011 s vs 0.1 s
    assert d.transfer and d.predicted_transfer_s == pytest.approx(0.011) and d.predicted_recompute_s == 0.1
    assert not policy.decide(num_tokens=1, num_bytes=1_000_000).transfer
    assert not policy.decide(num_tokens=0, num_bytes=0).transfer
    policy.observe_transfer(10_000_000, 1.001)  # the first measurement replaces the seed
    assert policy.bandwidth_bytes_per_s == pytest.approx(10e6)
    policy.observe_transfer(10_000_000, 0.501)
    assert policy.bandwidth_bytes_per_s == pytest.approx(0.7 * 10e6 + 0.3 * 20e6)
    policy.observe_prefill_rate(0.0)  # unknown: ignored
    policy.observe_prefill_rate(5000.0)
    assert policy.prefill_tokens_per_s == 5000.0


def test_event_queue_overflow_drops_and_requests_a_snapshot():
    h = hash_prompt_blocks(list(range(16 * 4)), 16, "demo")
    q = EventQueue(capacity=3)
    assert q.resync_needed  # a fresh client starts with a snapshot
    assert q.cut() == 0 and not q.resync_needed
    assert q.offer([BlockStored(h[0], None, (), 0), BlockStored(h[1], h[0], (), 1)])
    assert [s for s, _ in q.peek(10)] == [1, 2]
    q.ack(1)
    assert [s for s, _ in q.peek(10)] == [2]
    assert not q.offer([BlockRemoved(h[2]), BlockRemoved(h[3]), BlockRemoved(h[0])])  # 4 > 3: dropped
    assert (len(q), q.resync_needed, q.num_dropped) == (0, True, 4)
    assert q.offer([BlockRemoved(h[1])])
    cut = q.cut()
    assert cut == 6 and [s for s, _ in q.peek(10)] == [6]
    q.ack(cut)
    assert len(q) == 0


def test_replica_mirror_steers_eviction_to_replicated_blocks():
    h = hash_prompt_blocks(list(range(16 * 4)), 16, "demo")
    mirror = ReplicaMirror(ttl_s=60.0, capacity=3)
    pool = BlockPool(4, 16, eviction_advisor=mirror)
    blocks = pool.allocate(4)
    for i, block in enumerate(blocks):
        pool.cache_block(block, h[i], [i] * 16, h[i - 1] if i else None)
    pool.free(blocks)  # LRU head is the chain's tail block (3), then 2, 1, 0
    mirror.mark_replicated([h[1]])
    (victim,) = pool.allocate(1)
    assert victim is blocks[1]  # the replicated block goes before the LRU head
    (victim,) = pool.allocate(1)
    assert victim is blocks[3]  # nothing replicated left: plain LRU
    mirror.mark_replicated(h)  # capacity 3: the oldest entry (h[0]) is dropped
    assert [mirror.is_replicated(x) for x in h] == [False, True, True, True]
    assert mirror.prune(now=1e18) == 3 and len(mirror) == 0
    pool.check_integrity()


def test_lookup_and_fetch_degrade_without_a_cache_service(make_node):
    a = make_node("A", cache_address=None)
    prompt = prompt_of(40)
    assert a.loop.run(a.node.lookup(a.engine.block_hashes(prompt)), 5) == []
    assert a.fetch_prefix(prompt).outcome == FetchOutcome.NO_PEER
    assert a.fetch_prefix(prompt[:10]).outcome == FetchOutcome.LOCAL  # shorter than a block: nothing to share
    assert asyncio.iscoroutinefunction(a.node.fetch_prefix)


def test_chunk_codec_matches_protobuf_byte_for_byte():
    from cache_service.chunk_codec import ChunkDecodeError, bundle, chunk_parts, decode_chunks, encode_chunk

    h = bytes(range(16))
    for args in [(0, h, 0, 1, b"payload", (1, 2, 300, 2**32 - 1)), (7, h, 2, 3, b"x" * 70_000, ()),
                 (0, b"", 0, 0, b"", ())]:
        ref = pb.BlockChunk(block_index=args[0], block_hash=args[1], chunk_index=args[2], num_chunks=args[3],
                            data=args[4], token_ids=args[5])
        raw = encode_chunk(*args)
        assert raw == ref.SerializeToString()
        (view,) = decode_chunks(raw)
        assert (view.block_index, view.block_hash, view.chunk_index, view.num_chunks, bytes(view.data),
                view.token_ids) == args
    parts = [chunk_parts(i, h, 0, 1, bytes([i]) * 10, (i, i + 1)) for i in range(3)]
    raw = bundle(parts)
    ref = pb.BlockChunk.FromString(raw)  # protobuf reads a bundle as chunk 0 + bundled chunks 1, 2
    assert [c.block_index for c in [ref, *ref.bundled]] == [0, 1, 2]
    assert [(v.block_index, bytes(v.data), v.token_ids) for v in decode_chunks(raw)] == \
        [(i, bytes([i]) * 10, (i, i + 1)) for i in range(3)]
    # An unknown field is skipped; malformed messages raise.
    assert decode_chunks(b"\x48\x05" + encode_chunk(1, h, 0, 1, b"d"))[0].block_index == 1
    for bad in [b"\x2a\x10abc", b"\x08", b"\x0f"]:
        with pytest.raises(ChunkDecodeError):
            decode_chunks(bad)


def test_raw_frames_round_trip_and_reject_what_breaks_the_format():
    from cache_service.raw_frames import (
        BLOCK_META,
        HEADER,
        KIND_BLOCK,
        KIND_END,
        KIND_ERROR,
        KIND_REQUEST,
        MAX_BLOCK_BYTES,
        MAX_META_BYTES,
        FrameError,
        answer_header,
        block_meta,
        error_frame,
        error_message,
        frame,
        read_block_meta,
        request_header,
    )

    h = bytes(range(16))
    meta = block_meta(3, h, (1, 2, 2**32 - 1))
    raw = frame(KIND_BLOCK, meta, 100)
    assert answer_header(raw[: HEADER.size]) == (KIND_BLOCK, len(meta), 100)
    assert read_block_meta(memoryview(raw[HEADER.size :]), len(meta)) == (3, h, (1, 2, 2**32 - 1))
    assert request_header(frame(KIND_REQUEST, b"abc")[: HEADER.size]) == 3
    raw = error_frame("INVALID_ARGUMENT", "bad")
    assert answer_header(raw[: HEADER.size]) == (KIND_ERROR, len(raw) - HEADER.size, 0)
    assert error_message(raw[HEADER.size :]) == "INVALID_ARGUMENT: bad"
    for head, message in [
        (HEADER.pack(KIND_BLOCK, MAX_META_BYTES + 1, 0), "over the limits"),
        (HEADER.pack(KIND_BLOCK, BLOCK_META.size, MAX_BLOCK_BYTES + 1), "over the limits"),
        (HEADER.pack(ord("Q"), 0, 0), "unknown frame kind 81"),
        (HEADER.pack(KIND_BLOCK, BLOCK_META.size - 1, 0), f"block header of {BLOCK_META.size - 1} bytes$"),
    ]:
        with pytest.raises(FrameError, match=message):
            answer_header(head)
    with pytest.raises(FrameError, match=f"block header of {len(meta) - 4} bytes for 3 tokens"):
        read_block_meta(memoryview(meta), len(meta) - 4)
    for head in [HEADER.pack(KIND_END, 0, 0), HEADER.pack(KIND_REQUEST, 0, 1),
                 HEADER.pack(KIND_REQUEST, MAX_META_BYTES + 1, 0)]:
        with pytest.raises(FrameError, match="malformed request frame"):
            request_header(head)


def test_transfer_benchmark_moves_the_same_bytes_on_every_path():
    """A smoke run of benchmarks/bench_cache.py's transfer section (its figures are not asserted: speed is
    for benchmarks). It checks every byte of each path itself, and that each client took the path it names."""
    from benchmarks.bench_cache import bench_transfer

    out = bench_transfer(num_blocks=8, nbytes=64 << 10, reps=1, out_of_process=False)
    assert out["bytes"] == 8 * (64 << 10)
    assert all(out[k] > 0 for k in ("block_transfer_mb_s", "grpc_stream_mb_s", "raw_tcp_mb_s", "grpc_ceiling_mb_s"))


def _read_until_closed(sock) -> bytes:
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    return answer


def test_raw_stream_caps_its_connections_and_closes_idle_ones(make_node, demo_model):
    import socket

    from cache_service.raw_frames import error_frame

    a, b = make_node("A"), make_node("B")
    prompt = prompt_of(16 * 4 + 1, seed=60)
    a.generate([prompt], PARAMS)
    assert a.flush()
    raw = a.node.transfer_server.raw
    raw.max_connections, raw.idle_timeout_s = 64, 3.0  # (defaults 256 and 30 s) long enough to open all 100
    host, port = raw.address.rsplit(":", 1)
    socks = [socket.create_connection((host, int(port)), timeout=30) for _ in range(100)]
    try:
        # Accepted in order: the 36 beyond the cap are told why and closed at once ...
        refused = error_frame("RESOURCE_EXHAUSTED", "64 raw stream connections are open; the limit is 64")
        assert [_read_until_closed(s) for s in socks[64:]] == [refused] * 36
        # ... and the 64 that never send a request are closed, without a frame, once idle for the timeout.
        assert [_read_until_closed(s) for s in socks[:64]] == [b""] * 64
    finally:
        for s in socks:
            s.close()
    assert (raw.num_refused, raw.num_timed_out) == (36, 64)
    # The worker's real fetches still come over its raw stream.
    (out,), (fetch,) = b.generate([prompt], PARAMS)
    assert (fetch.outcome, fetch.num_blocks) == (FetchOutcome.TRANSFERRED, 4), fetch
    assert out.new_token_ids == cold_output(demo_model, prompt)
    assert a.node.servicer.stats.num_raw_requests == 1


def test_raw_stream_bounds_what_a_request_may_buffer(make_node):
    import socket

    from cache_service.raw_frames import HEADER, KIND_REQUEST, error_frame
    from cache_service.raw_listener import MAX_REQUEST_BYTES

    a = make_node("A", cache_address=None)
    raw = a.node.transfer_server.raw
    raw.idle_timeout_s = 1.0
    host, port = raw.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(HEADER.pack(KIND_REQUEST, MAX_REQUEST_BYTES + 1, 0))
        assert _read_until_closed(sock) == error_frame(
            "INVALID_ARGUMENT", f"a request frame of {MAX_REQUEST_BYTES + 1} bytes is over the limit of "
                                f"{MAX_REQUEST_BYTES} bytes")
    # Half a request, then nothing: closed once the timeout passes, without a frame.
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(HEADER.pack(KIND_REQUEST, 1000, 0) + b"\x0a" * 10)
        assert _read_until_closed(sock) == b""
    assert raw.num_timed_out == 1
