"""Property-based fuzz of every RPC of the project's gRPC services, and of the raw block stream.

What an attacker with no credentials can send, to each server the project runs:

    Generation     Generate GenerateStream Pin Unpin     the router (router/server.py RouterThread) over one
                                                         in-process worker (workers/ray_worker.py WorkerActor)
    CacheService   RegisterNode Heartbeat PublishEvents  a cache service of its own on the module's Valkey
                   Lookup Pin Unpin GetStats             (key prefix "fuzz:", apart from the worker's one)
    BlockTransfer  FetchBlocks                           the worker's data plane (its TransferServer)
    raw block stream                                     the worker's raw_stream_address (raw_listener.py)

(a) random bytes through a generic channel (identity serializers), a valid message cut short or with a
byte flipped, and valid messages with an invalid UTF-8 string field spliced in; (b) valid messages with
extreme values (INT64/UINT64 limits, NaN and infinities, empty and 100k-element repeated fields, 100k-
character strings). Every answer is a status that says what is wrong: never UNKNOWN or INTERNAL, never a
traceback or an exception repr. After the fuzz each service still serves a normal request, exactly.
``pytest --hypothesis-show-statistics`` prints the codes each RPC answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import socket
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator

import grpc
import pytest
from cache_fixtures import cache_service  # noqa: F401  (module-scoped pytest fixture)
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from valkey_fixtures import valkey_module  # noqa: F401  (module-scoped pytest fixture)

from cache_service.block_hash import hash_prompt_blocks
from cache_service.raw_frames import (
    BLOCK_META,
    HEADER,
    KIND_BLOCK,
    KIND_END,
    KIND_ERROR,
    KIND_REQUEST,
    MAX_META_BYTES,
    answer_header,
    error_message,
    frame,
)
from cache_service.server import CacheServiceConfig, CacheServiceThread
from protos.prefixcache.v1 import cache_pb2, generation_pb2
from router.metrics import anonymous_tenant
from router.server import RouterConfig, RouterThread, WorkerEndpoint
from router.worker_client import InProcessWorkerClient
from workers.ray_worker import WorkerActor, WorkerConfig

pytestmark = pytest.mark.timeout(240)

BS = 16
PROMPT = [(i * 7) % 250 + 3 for i in range(50)]  # 3 full blocks and a tail
PARAMS = generation_pb2.SamplingParams(max_tokens=8, ignore_eos=True)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
RPC_TIMEOUT_S = 60.0


# ---- the RPCs, from the generated protos ---------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Rpc:
    service: str
    name: str
    request: Descriptor
    streaming: bool

    @property
    def path(self) -> str:
        return f"/prefixcache.v1.{self.service}/{self.name}"

    def __str__(self) -> str:
        return f"{self.service}.{self.name}"


def _rpcs(module: Any, service: str) -> list[Rpc]:
    return [Rpc(service, m.name, m.input_type, m.server_streaming)
            for m in module.DESCRIPTOR.services_by_name[service].methods]


RPCS = _rpcs(generation_pb2, "Generation") + _rpcs(cache_pb2, "CacheService") + _rpcs(cache_pb2, "BlockTransfer")


def test_the_fuzz_covers_every_rpc_of_the_contract():
    assert [str(r) for r in RPCS] == [
        "Generation.Generate", "Generation.GenerateStream", "Generation.Pin", "Generation.Unpin",
        "CacheService.RegisterNode", "CacheService.Heartbeat", "CacheService.PublishEvents", "CacheService.Lookup",
        "CacheService.Pin", "CacheService.Unpin", "CacheService.GetStats", "BlockTransfer.FetchBlocks",
    ]


# ---- extreme values, by field type ---------------------------------------------------------------------
T = FieldDescriptor
_U32 = [0, 1, 2, BS, 2**31 - 1, 2**31, 2**32 - 1]
_U64 = [0, 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]
_I32 = [0, 1, -1, 2**31 - 1, -(2**31)]
_I64 = [0, 1, -1, 2**63 - 1, -(2**63)]
_FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-45, 3.4e38, math.nan, math.inf, -math.inf]
_STRINGS = ["", "a", "demo", "worker-0", "x" * 100_000, "\x00", "\x1f\x1f", "é" * 700, "\U0001f600" * 50,
            "../../etc/passwd", "%s%n{0}"]
_BYTES = [b"", bytes(16), b"\xff" * 16, b"\x01" * 15, b"\x02" * 17, b"z" * 100_000]
_SCALARS: dict[int, list] = {
    T.TYPE_UINT32: _U32, T.TYPE_FIXED32: _U32, T.TYPE_UINT64: _U64, T.TYPE_FIXED64: _U64,
    T.TYPE_INT32: _I32, T.TYPE_SINT32: _I32, T.TYPE_SFIXED32: _I32,
    T.TYPE_INT64: _I64, T.TYPE_SINT64: _I64, T.TYPE_SFIXED64: _I64,
    T.TYPE_FLOAT: _FLOATS, T.TYPE_DOUBLE: _FLOATS + [1e308, 5e-324], T.TYPE_BOOL: [False, True],
    T.TYPE_STRING: _STRINGS, T.TYPE_BYTES: _BYTES,
}
HUGE_REPEATED = 100_000


def _scalar(field: FieldDescriptor) -> st.SearchStrategy:
    if field.type == T.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values])
    return st.sampled_from(_SCALARS[field.type])


def _small(field: FieldDescriptor) -> st.SearchStrategy:
    """Elements cheap enough to repeat 100k times (no 100k-character strings 100k times over)."""
    if field.type == T.TYPE_MESSAGE:
        return st.builds(GetMessageClass(field.message_type))
    if field.type == T.TYPE_STRING:
        return st.sampled_from(["", "a", "\x00"])
    if field.type == T.TYPE_BYTES:
        return st.sampled_from([b"", bytes(16)])
    return _scalar(field)


def _value(field: FieldDescriptor, depth: int, huge: int) -> st.SearchStrategy:
    return messages(field.message_type, depth + 1, huge) if field.type == T.TYPE_MESSAGE else _scalar(field)


@st.composite
def messages(draw: st.DrawFn, desc: Descriptor, depth: int = 0, huge: int = HUGE_REPEATED) -> Any:
    """A valid message of type ``desc``, each field left unset or set to an extreme value (a repeated
    field: 1-3 of them, or ``huge`` copies of a small one)."""
    msg = GetMessageClass(desc)()
    for field in desc.fields:
        if not draw(st.booleans(), label=f"set {field.name}"):
            continue
        if field.is_repeated:
            values = draw(st.one_of(
                st.lists(_value(field, depth, huge), min_size=1, max_size=3),
                _small(field).map(lambda v: [v] * huge),
            ), label=field.name)
            getattr(msg, field.name).extend(values)
        elif field.type == T.TYPE_MESSAGE:
            if depth < 2:
                getattr(msg, field.name).CopyFrom(draw(messages(field.message_type, depth + 1, huge)))
        else:
            setattr(msg, field.name, draw(_scalar(field), label=field.name))
    return msg


# ---- undecodable bytes ---------------------------------------------------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _string_paths(desc: Descriptor, depth: int = 0) -> list[tuple[int, ...]]:
    """Field-number paths to every string field (nested messages included, two levels down)."""
    paths: list[tuple[int, ...]] = []
    for field in desc.fields:
        if field.type == T.TYPE_STRING:
            paths.append((field.number,))
        elif field.type == T.TYPE_MESSAGE and depth < 2:
            paths += [(field.number, *p) for p in _string_paths(field.message_type, depth + 1)]
    return paths


def _bad_utf8(path: tuple[int, ...], garbage: bytes) -> bytes:
    """The wire bytes of a message whose string at ``path`` is ``garbage`` (not UTF-8)."""
    payload = garbage
    for number in reversed(path):
        payload = _length_delimited(number, payload)
    return payload


_NOT_UTF8 = st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"ok\xfe\xfdok", b"\xf4\x90\x80\x80"])


def _cut(wire: bytes, at: int) -> bytes:
    return wire[: at % (len(wire) + 1)]


def _flip(wire: bytes, at: int, mask: int) -> bytes:
    if not wire:  # an empty message (every field unset): a lone byte is no message either
        return bytes([mask])
    i = at % len(wire)
    return wire[:i] + bytes([wire[i] ^ mask]) + wire[i + 1:]


def raw_requests(desc: Descriptor) -> st.SearchStrategy[bytes]:
    valid = messages(desc).map(lambda m: m.SerializeToString())
    strategies = [
        st.binary(max_size=512),  # noise
        st.builds(_cut, valid, st.integers(min_value=0)),  # a valid message cut short
        st.builds(_flip, valid, st.integers(min_value=0), st.integers(1, 255)),  # one byte flipped
    ]
    paths = _string_paths(desc)
    if paths:  # a valid message, then a string field that is not UTF-8 (the last occurrence wins)
        strategies.append(st.builds(lambda wire, path, garbage: wire + _bad_utf8(path, garbage),
                                    valid, st.sampled_from(paths), _NOT_UTF8))
    return st.one_of(strategies)


# ---- the servers ---------------------------------------------------------------------------------------
class RayLikeWorker:
    """The worker actor behind a boundary like Ray's: its ``generate`` generator runs in a task of its own.

    Ray drives an actor's streaming generator from one task of the actor's process; the dispatcher pulls
    each delta through a fresh task (``ensure_future(__anext__())``), so driving the actor's generator
    directly from there would run its ``request_context`` in several contexts, which Ray never does."""

    def __init__(self, actor: WorkerActor) -> None:
        self.actor = actor

    def __getattr__(self, name: str) -> Any:
        return getattr(self.actor, name)

    async def generate(self, call: Any) -> AsyncIterator[Any]:
        queue: asyncio.Queue = asyncio.Queue()

        async def pump() -> None:
            try:
                async for delta in self.actor.generate(call):
                    await queue.put((delta, None))
                await queue.put((None, None))
            except Exception as exc:  # noqa: BLE001 - handed to the consumer, as Ray would
                await queue.put((None, exc))

        task = asyncio.ensure_future(pump())
        try:
            while True:
                delta, error = await queue.get()
                if error is not None:
                    raise error
                if delta is None:
                    return
                yield delta
        finally:
            task.cancel()  # the consumer closed the stream: Ray cancels the actor's generator


@dataclass(slots=True)
class Servers:
    router: RouterThread
    actor: WorkerActor
    cache: CacheServiceThread  # the fuzzed cache service (not the worker's)
    channels: dict[str, grpc.Channel]  # by service name
    raw_address: tuple[str, int]
    reference: generation_pb2.GenerateResponse | None = None  # PROMPT's answer, before any fuzz


@pytest.fixture(scope="module")
def servers(cache_service, valkey_module) -> Iterator[Servers]:  # noqa: F811
    with contextlib.ExitStack() as cleanup:  # undone in reverse order, from wherever a start failed
        fuzzed = CacheServiceThread(CacheServiceConfig(redis_url=valkey_module.url, port=0, key_prefix="fuzz:",
                                                       sweep_interval_s=0.2))
        fuzzed.start()
        cleanup.callback(fuzzed.stop)
        actor = WorkerActor(WorkerConfig("worker-0", num_blocks=1024, block_size=BS,
                                         cache_service_address=cache_service.address, transfer_host="127.0.0.1",
                                         heartbeat_interval_s=0.2, heartbeat_ttl_s=5))
        router = RouterThread(RouterConfig(block_size=BS, port=0, metrics_port=None,
                                           cache_service_address=cache_service.address),
                              [WorkerEndpoint(InProcessWorkerClient("worker-0", RayLikeWorker(actor)))])
        router.start()
        cleanup.callback(router.stop)
        # The worker's cache node (heartbeats, BlockTransfer, the raw stream) runs on the router's loop.
        router.call(actor.start())
        cleanup.callback(lambda: router.call(actor.shutdown()))
        host, port = actor.cache_node.servicer.raw_stream_address.rsplit(":", 1)
        channels = {"Generation": grpc.insecure_channel(router.address),
                    "CacheService": grpc.insecure_channel(fuzzed.address),
                    "BlockTransfer": grpc.insecure_channel(actor.cache_node.transfer_address)}
        for channel in channels.values():
            cleanup.callback(channel.close)
        out = Servers(router, actor, fuzzed, channels, (host, int(port)))
        out.reference = _generate(out)
        yield out


def call(channel: grpc.Channel, rpc: Rpc, request: bytes) -> tuple[grpc.StatusCode, str, list[bytes]]:
    """Sends ``request`` as it is (no serializer); (code, details, the response messages' bytes)."""
    try:
        if rpc.streaming:
            got = list(channel.unary_stream(rpc.path)(request, timeout=RPC_TIMEOUT_S))
        else:
            got = [channel.unary_unary(rpc.path)(request, timeout=RPC_TIMEOUT_S)]
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", []
    return grpc.StatusCode.OK, "", got


def assert_clean(rpc: Rpc, code: grpc.StatusCode, details: str) -> None:
    event(f"{rpc}: {code.name}")
    assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), f"{rpc}: {code.name} {details!r}"
    assert "Traceback" not in details and "<class " not in details, f"{rpc}: {details!r}"
    # A message over the client's 16 KiB trailer limit arrives as RESOURCE_EXHAUSTED "Stream removed".
    assert "Stream removed" not in details, f"{rpc}: {details!r}"


# Cache salts of the Generation requests the fuzz sent, by outcome (the tenant-label check below).
SALTS: dict[str, set[str]] = {"served": set(), "refused": set()}


def _note_salt(rpc: Rpc, request: bytes, code: grpc.StatusCode) -> None:
    if rpc.service != "Generation" or not rpc.name.startswith("Generate"):
        return
    try:
        salt = generation_pb2.GenerateRequest.FromString(request).cache_salt
    except Exception:  # noqa: BLE001 - undecodable: it never had a salt
        return
    SALTS["served" if code == grpc.StatusCode.OK else "refused"].add(salt)


def _fuzz(servers: Servers, rpc: Rpc, request: bytes) -> None:
    code, details, _ = call(servers.channels[rpc.service], rpc, request)
    _note_salt(rpc, request, code)
    assert_clean(rpc, code, details)
    if str(rpc) == "Generation.Pin" and code == grpc.StatusCode.OK:
        # Let it go again: the pins of one example must not crowd out the worker's pool for the next.
        unpinned = call(servers.channels["Generation"], RPCS[3], request)[0]
        assert unpinned == grpc.StatusCode.OK


@pytest.mark.parametrize("rpc", RPCS, ids=str)
@FUZZ
@given(data=st.data())
def test_undecodable_requests_are_invalid_argument(servers, rpc, data):
    request = data.draw(raw_requests(rpc.request), label="request")
    _fuzz(servers, rpc, request)


@pytest.mark.parametrize("rpc", RPCS, ids=str)
@FUZZ
@given(data=st.data())
def test_extreme_values_get_a_status_that_says_what_is_wrong(servers, rpc, data):
    request = data.draw(messages(rpc.request), label="request").SerializeToString()
    _fuzz(servers, rpc, request)


def test_a_message_that_is_not_utf8_names_its_type(servers):
    """The exact answer of each server to a string field that is not UTF-8 (the fuzz checks only the code)."""
    cases = [(RPCS[0], (2,)), (RPCS[4], (1, 1)), (RPCS[11], (4,))]  # Generate.text, node.node_id, requester
    assert [call(servers.channels[rpc.service], rpc, _bad_utf8(path, b"\xff"))[:2] for rpc, path in cases] == [
        (grpc.StatusCode.INVALID_ARGUMENT,
         f"request is not a valid prefixcache.v1.{name} message (String field had bad UTF-8)")
        for name in ("GenerateRequest", "RegisterNodeRequest", "FetchBlocksRequest")
    ]


def test_a_message_quoting_a_huge_field_is_cut_not_lost(servers):
    """Messages that quote the request (stop=[""] * 100k; a 100k-character model_id) keep their code."""
    generate = generation_pb2.GenerateRequest(token_ids=[5], sampling=generation_pb2.SamplingParams(
        stop=[""] * HUGE_REPEATED))
    fetch = cache_pb2.FetchBlocksRequest(block_hashes=[bytes(16)], model_id="x" * 100_000)
    answers = [call(servers.channels[rpc.service], rpc, m.SerializeToString())[:2]
               for rpc, m in ((RPCS[0], generate), (RPCS[11], fetch))]
    assert [(code, details[:48], details[-19:], len(details.encode())) for code, details in answers] == [
        (grpc.StatusCode.INVALID_ARGUMENT, "stop must be a list of non-empty strings, got ['",
         "(400046 bytes, cut)", 2048),
        (grpc.StatusCode.INVALID_ARGUMENT, "model_id '" + "x" * 38,
         "(100053 bytes, cut)", 2048),
    ]


def test_a_denormal_temperature_is_refused_at_the_edge(servers):
    request = generation_pb2.GenerateRequest(token_ids=PROMPT[:5], sampling=generation_pb2.SamplingParams(
        temperature=1e-45, max_tokens=2))
    code, details, _ = call(servers.channels["Generation"], RPCS[0], request.SerializeToString())
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details


# ---- relayed errors (Pin through the router) ----------------------------------------------------------
def _pin(servers: Servers, **fields: Any) -> tuple[str, str]:
    code, details, _ = call(servers.channels["Generation"], RPCS[2],
                            generation_pb2.PinRequest(**fields).SerializeToString())
    return code.name, details


def test_pin_relays_the_cache_services_code_and_a_workers_failure_is_unavailable(servers, monkeypatch):
    assert _pin(servers, token_ids=PROMPT, cache_salt="s" * 2000) == (
        "INVALID_ARGUMENT", "cache service Pin: cache_salt is 2000 characters long; the limit is 1024")

    async def broken_pin(pin_id: str, token_ids: list[int], cache_salt: str = "") -> int:
        raise RuntimeError("the disk is on fire\nTraceback (most recent call last): ...")

    monkeypatch.setattr(servers.actor, "pin", broken_pin)
    assert _pin(servers, token_ids=PROMPT, cache_salt="broken") == (
        "UNAVAILABLE", "the worker failed: RuntimeError: the disk is on fire")


# ---- tenant labels ------------------------------------------------------------------------------------
def _tenant_labels(servers: Servers) -> set[str]:
    text = generate_latest(servers.router.server.metrics.registry).decode()
    return set(re.findall(r'tenant="([^"]*)"', text))


def test_refused_requests_add_no_tenant_label_and_no_salt_shows(servers):
    stub = servers.channels["Generation"].unary_unary("/prefixcache.v1.Generation/Generate")
    before = _tenant_labels(servers)
    for i in range(200):  # no prompt: refused at the edge, each with a salt of its own
        with pytest.raises(grpc.RpcError) as err:
            stub(generation_pb2.GenerateRequest(cache_salt=f"secret-{i}").SerializeToString(), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = _tenant_labels(servers)
    assert after - before <= {"other"}
    served = stub(generation_pb2.GenerateRequest(token_ids=PROMPT[:20], sampling=PARAMS,
                                                 cache_salt="secret-served").SerializeToString(), timeout=60)
    assert served
    SALTS["served"].add("secret-served")
    text = generate_latest(servers.router.server.metrics.registry).decode()
    assert anonymous_tenant("secret-served") in _tenant_labels(servers) and "secret-" not in text


def test_after_the_fuzz_tenant_labels_are_digests_of_served_salts_only(servers):
    allowed = {"default", "unauthenticated", "other"} | {anonymous_tenant(s) for s in SALTS["served"]}
    labels = _tenant_labels(servers)
    assert labels <= allowed
    text = generate_latest(servers.router.server.metrics.registry).decode()
    for salt in SALTS["served"] | SALTS["refused"]:
        if len(salt) >= 8 and salt != "worker-0":  # shorter ones could be any label's value by chance
            assert f'"{salt}"' not in text  # no salt verbatim as a label value


# ---- the raw block stream -----------------------------------------------------------------------------
def _raw_exchange(address: tuple[str, int], data: bytes) -> list[tuple[int, bytes, int]]:
    """Sends ``data``, half-closes, reads until the worker closes: the answer's frames (kind, meta, data_len)."""
    with socket.create_connection(address, timeout=30) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it stopped reading (after an error frame): what it answered is still there to read
        buf = bytearray()
        while chunk := sock.recv(1 << 16):
            buf += chunk
    frames, view = [], memoryview(bytes(buf))
    while view:
        kind, meta_len, data_len = answer_header(view[: HEADER.size])
        end = HEADER.size + meta_len + data_len
        assert len(view) >= end, f"a frame cut short: {bytes(view[:64])!r}"
        frames.append((kind, bytes(view[HEADER.size: HEADER.size + meta_len]), data_len))
        view = view[end:]
    return frames


def _request_frame(request: cache_pb2.FetchBlocksRequest | bytes) -> bytes:
    meta = request if isinstance(request, bytes) else request.SerializeToString()
    return frame(KIND_REQUEST, meta)


def _raw_garbage() -> st.SearchStrategy[bytes]:
    # 9,000 hashes are over the fetch limit (8,192) and well under MAX_META_BYTES: after an error frame the
    # worker drains at most MAX_META_BYTES before it closes, so more could reset the connection first.
    fetch = messages(cache_pb2.FetchBlocksRequest.DESCRIPTOR, huge=9_000).map(_request_frame)
    absurd = st.tuples(st.sampled_from(b"RBEX\x00\xff"), st.sampled_from([0, 1, MAX_META_BYTES, MAX_META_BYTES + 1,
                                                                           2**32 - 1]),
                       st.sampled_from([0, 1, 2**63, 2**64 - 1])).map(lambda t: HEADER.pack(*t))
    return st.one_of(
        st.binary(max_size=256),  # noise
        fetch.flatmap(lambda f: st.integers(0, len(f) - 1).map(lambda n: f[:n])),  # a request cut short
        absurd,  # headers with absurd lengths or kinds
        st.binary(min_size=1, max_size=64).map(_request_frame),  # a request frame whose meta is not a request
        st.lists(fetch, min_size=2, max_size=3).map(b"".join),  # several valid requests in a row
    ).filter(lambda data: len(data) <= MAX_META_BYTES)


@FUZZ
@given(data=_raw_garbage())
def test_raw_stream_answers_garbage_with_invalid_argument_or_a_clean_close(servers, data):
    frames = _raw_exchange(servers.raw_address, data)
    kinds = [k for k, _, _ in frames]
    # Valid requests get their blocks and an E each; the first bad one gets one X, and the stream ends.
    assert all(k in (KIND_BLOCK, KIND_END) for k in kinds[:-1]), kinds
    if kinds and kinds[-1] == KIND_ERROR:
        message = error_message(frames[-1][1])
        event("raw: X " + message.split(":", 1)[0])
        assert message.startswith("INVALID_ARGUMENT: ") and "Traceback" not in message, message
    else:
        event("raw: close" if not kinds else "raw: answered")


# ---- after the fuzz: every service still serves a normal request, exactly --------------------------------
def _generate(servers: Servers) -> generation_pb2.GenerateResponse:
    stub = servers.channels["Generation"].unary_unary(
        "/prefixcache.v1.Generation/Generate", generation_pb2.GenerateRequest.SerializeToString,
        generation_pb2.GenerateResponse.FromString)
    return stub(generation_pb2.GenerateRequest(token_ids=PROMPT, sampling=PARAMS), timeout=60)


def test_after_the_fuzz_the_router_generates_as_before(servers):
    before, after = servers.reference, _generate(servers)
    assert (after.finish_reason, after.usage.prompt_tokens, after.usage.completion_tokens) == ("length", 50, 8)
    assert list(after.token_ids) == list(before.token_ids) and after.text == before.text
    assert after.usage.cached_tokens == 3 * BS  # the prompt's 3 full blocks, computed before the fuzz


def test_after_the_fuzz_the_worker_serves_its_blocks_on_both_streams(servers):
    hashes = hash_prompt_blocks(PROMPT, BS, "demo")
    request = cache_pb2.FetchBlocksRequest(block_hashes=hashes, model_id="demo", requester="test")
    code, details, chunks = call(servers.channels["BlockTransfer"], RPCS[11], request.SerializeToString())
    assert (code, details) == (grpc.StatusCode.OK, "")
    parsed = [cache_pb2.BlockChunk.FromString(c) for c in chunks]
    assert [(c.block_index, c.block_hash) for c in parsed if c.chunk_index == 0] == list(enumerate(hashes))
    frames = _raw_exchange(servers.raw_address, _request_frame(request))
    assert [k for k, _, _ in frames] == [KIND_BLOCK] * 3 + [KIND_END]
    assert [BLOCK_META.unpack_from(meta)[:2] for _, meta, _ in frames[:3]] == list(enumerate(hashes))


def test_after_the_fuzz_the_cache_service_indexes_and_looks_up_exactly(servers):
    channel = servers.channels["CacheService"]

    def unary(name: str, request: Any, response: Any) -> Any:
        return channel.unary_unary(f"/prefixcache.v1.CacheService/{name}", type(request).SerializeToString,
                                   response.FromString)(request, timeout=30)

    node = cache_pb2.NodeInfo(node_id="after-fuzz", transfer_address="127.0.0.1:7001", model_id="after-model",
                              block_size=BS)
    epoch = unary("RegisterNode", cache_pb2.RegisterNodeRequest(node=node, ttl_seconds=30),
                  cache_pb2.RegisterNodeResponse).epoch
    hashes = hash_prompt_blocks(PROMPT, BS, "after-model")
    events = [cache_pb2.BlockEvent(stored=cache_pb2.BlockStoredEvent(block_hash=h, parent_hash=p))
              for h, p in zip(hashes, [b""] + hashes[:-1])]
    applied = unary("PublishEvents", cache_pb2.PublishEventsRequest(node_id="after-fuzz", epoch=epoch, events=events),
                    cache_pb2.PublishEventsResponse).num_applied
    found = unary("Lookup", cache_pb2.LookupRequest(block_hashes=hashes, model_id="after-model"),
                  cache_pb2.LookupResponse)
    assert applied == 3
    assert [(m.node_id, m.num_blocks, m.transfer_address) for m in found.matches] == [
        ("after-fuzz", 3, "127.0.0.1:7001")]
