"""Status codes at the edge: common/grpc_edge.py's interceptor, the router's relay of cache-service and
worker failures (router/cache_link.py, router/servicer.py), and the bounded tenant labels (router/metrics.py).

The interceptor runs on a small in-test server hosting handlers under the project's real message types;
tests/test_fuzz_rpcs.py drives the project's own three servers."""

from __future__ import annotations

import asyncio
import io
import json

import grpc
import pytest

from common.grpc_edge import INTERNAL_MESSAGE, EdgeInterceptor
from common.logs import RequestIdInterceptor, configure_logging, current_request_id, get_logger, request_id_metadata
from protos.prefixcache.v1 import cache_pb2 as pb
from router.cache_link import CacheLink, CacheServiceError
from router.metrics import OTHER_TENANT, RouterMetrics, TenantLabels, anonymous_tenant
from router.servicer import _status_of
from router.worker_client import WorkerCallError

LOOKUP = "/prefixcache.v1.CacheService/Lookup"
PIN = "/prefixcache.v1.CacheService/Pin"
UNPIN = "/prefixcache.v1.CacheService/Unpin"
FETCH = "/prefixcache.v1.BlockTransfer/FetchBlocks"
BAD_UTF8_MODEL_ID = b"\x12\x03\xff\xfe\xfd"  # LookupRequest.model_id (field 2, length 3): not UTF-8


@pytest.fixture
def stream():
    buf = io.StringIO()
    configure_logging(level="INFO", fmt="json", stream=buf)
    yield buf
    configure_logging(level="INFO", fmt="json")


def _lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


async def _lookup(request: pb.LookupRequest, context) -> pb.LookupResponse:
    # Echoes what it was given, and the request id bound while it runs.
    return pb.LookupResponse(matches=[pb.NodeMatch(node_id=f"{request.model_id}|{current_request_id()}",
                                                   num_blocks=len(request.block_hashes))])


async def _pin(request: pb.PinBlocksRequest, context) -> pb.PinBlocksResponse:
    raise RuntimeError("redis at 10.1.2.3:6379 said no")  # an unexpected failure, with internals in it


async def _unpin(request: pb.PinBlocksRequest, context) -> pb.PinBlocksResponse:
    await context.abort(grpc.StatusCode.NOT_FOUND, f"no pin {request.pin_id}")


async def _fetch(request: pb.FetchBlocksRequest, context):
    for i in range(2):
        yield pb.BlockChunk(block_index=i, data=(current_request_id() or "-").encode())
    if request.requester == "boom":
        raise KeyError("block table")


def _handlers() -> tuple:
    def unary(fn, req, resp):
        return grpc.unary_unary_rpc_method_handler(fn, req.FromString, resp.SerializeToString)

    return (
        grpc.method_handlers_generic_handler("prefixcache.v1.CacheService", {
            "Lookup": unary(_lookup, pb.LookupRequest, pb.LookupResponse),
            "Pin": unary(_pin, pb.PinBlocksRequest, pb.PinBlocksResponse),
            "Unpin": unary(_unpin, pb.PinBlocksRequest, pb.PinBlocksResponse),
        }),
        grpc.method_handlers_generic_handler("prefixcache.v1.BlockTransfer", {
            "FetchBlocks": grpc.unary_stream_rpc_method_handler(_fetch, pb.FetchBlocksRequest.FromString,
                                                                pb.BlockChunk.SerializeToString),
        }),
    )


def _serve(calls):
    """Runs ``calls(channel)`` against a server built as the project's are; returns its result."""

    async def main():
        server = grpc.aio.server(interceptors=[RequestIdInterceptor(), EdgeInterceptor(get_logger("test_edge"))])
        server.add_generic_rpc_handlers(_handlers())
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                return await calls(channel)
        finally:
            await server.stop(None)

    return asyncio.run(main())


async def _status(call) -> tuple[str, str]:
    try:
        if isinstance(call, grpc.aio.UnaryStreamCall):
            [m async for m in call]
        else:
            await call
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, exc.details()
    return "OK", ""


def test_undecodable_and_invalid_utf8_requests_are_invalid_argument():
    async def calls(channel):
        raw = channel.unary_unary(LOOKUP)
        fetch = channel.unary_stream(FETCH)
        return [await _status(raw(b"\xff\xff\xff")), await _status(raw(BAD_UTF8_MODEL_ID)),
                await _status(fetch(b"\x0a\x05ab")), await _status(channel.unary_unary(PIN)(b"\x08"))]

    assert _serve(calls) == [
        ("INVALID_ARGUMENT", "request is not a valid prefixcache.v1.LookupRequest message (Wire format was corrupt)"),
        ("INVALID_ARGUMENT",
         "request is not a valid prefixcache.v1.LookupRequest message (String field had bad UTF-8)"),
        ("INVALID_ARGUMENT",
         "request is not a valid prefixcache.v1.FetchBlocksRequest message (Wire format was corrupt)"),
        ("INVALID_ARGUMENT",
         "request is not a valid prefixcache.v1.PinBlocksRequest message (Wire format was corrupt)"),
    ]


def test_valid_requests_pass_through_with_their_request_id_bound():
    async def calls(channel):
        lookup = channel.unary_unary(LOOKUP, pb.LookupRequest.SerializeToString, pb.LookupResponse.FromString)
        fetch = channel.unary_stream(FETCH, pb.FetchBlocksRequest.SerializeToString, pb.BlockChunk.FromString)
        got = await lookup(pb.LookupRequest(model_id="m", block_hashes=[b"x" * 16] * 3),
                           metadata=request_id_metadata("rid-1"))
        chunks = [c async for c in fetch(pb.FetchBlocksRequest(), metadata=request_id_metadata("rid-2"))]
        return got, chunks

    got, chunks = _serve(calls)
    assert [(m.node_id, m.num_blocks) for m in got.matches] == [("m|rid-1", 3)]
    assert [(c.block_index, c.data) for c in chunks] == [(0, b"rid-2"), (1, b"rid-2")]


def test_an_escaping_exception_is_internal_with_a_generic_message_and_logged(stream):
    async def calls(channel):
        pin = channel.unary_unary(PIN, pb.PinBlocksRequest.SerializeToString, pb.PinBlocksResponse.FromString)
        fetch = channel.unary_stream(FETCH, pb.FetchBlocksRequest.SerializeToString, pb.BlockChunk.FromString)
        status = await _status(pin(pb.PinBlocksRequest(pin_id="p"), metadata=request_id_metadata("rid-3")))
        got: list = []
        try:
            async for chunk in fetch(pb.FetchBlocksRequest(requester="boom")):
                got.append(chunk.block_index)
        except grpc.aio.AioRpcError as exc:
            got.append((exc.code().name, exc.details()))
        return status, got

    status, fetched = _serve(calls)
    assert status == ("INTERNAL", INTERNAL_MESSAGE)
    assert fetched == [0, 1, ("INTERNAL", INTERNAL_MESSAGE)]  # what was sent before the failure arrives
    errors = [line for line in _lines(stream) if line["level"] == "error"]
    assert [(e["component"], e["msg"], e.get("request_id"), e["error_type"]) for e in errors] == [
        ("test_edge", f"unexpected error in {PIN}", "rid-3", "RuntimeError"),
        ("test_edge", f"unexpected error in {FETCH}", None, "KeyError"),
    ]
    assert "RuntimeError: redis at 10.1.2.3:6379 said no" in errors[0]["exc"]  # the operator sees it all


def test_a_handlers_own_abort_keeps_its_code_and_unknown_methods_stay_unimplemented():
    async def calls(channel):
        unpin = channel.unary_unary(UNPIN, pb.PinBlocksRequest.SerializeToString, pb.PinBlocksResponse.FromString)
        return [await _status(unpin(pb.PinBlocksRequest(pin_id="p7"))),
                await _status(channel.unary_unary("/prefixcache.v1.CacheService/Nope")(b""))]

    assert _serve(calls) == [("NOT_FOUND", "no pin p7"), ("UNIMPLEMENTED", "Method not found!")]


# ---- the router relays what the cache service and the workers said ------------------------------------
def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


@pytest.mark.parametrize("code, details, relayed", [
    (grpc.StatusCode.INVALID_ARGUMENT, "cache_salt is 300 characters long",
     ("INVALID_ARGUMENT", "cache service Pin: cache_salt is 300 characters long")),
    (grpc.StatusCode.NOT_FOUND, "node n1 is not registered", ("NOT_FOUND", "cache service Pin: node n1 is not registered")),
    (grpc.StatusCode.UNAVAILABLE, "Redis unavailable: Error 111 connecting to 10.0.0.5:6379",
     ("UNAVAILABLE", "the cache service is unavailable (Pin)")),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", ("DEADLINE_EXCEEDED",
                                                              "the cache service did not answer in time (Pin)")),
    (grpc.StatusCode.UNKNOWN, "Unexpected <class 'KeyError'>: 'x'", ("UNAVAILABLE",
                                                                     "the cache service failed (Pin: UNKNOWN)")),
    (grpc.StatusCode.INTERNAL, "internal error", ("UNAVAILABLE", "the cache service failed (Pin: INTERNAL)")),
])
def test_cache_service_errors_keep_their_code_and_hide_hosts(code, details, relayed):
    err = CacheServiceError.of("Pin", _rpc_error(code, details))
    assert (err.code.name, err.details) == relayed
    assert _status_of(err) == (err.code, err.details)
    assert err.cause == ("" if relayed[1].endswith(details) else f"{code.name}: {details}")  # kept for the log


def test_an_unreachable_cache_service_is_unavailable():
    async def main():
        link = CacheLink("127.0.0.1:1", "demo")  # nothing listens on port 1
        try:
            await link.unpin("p")
        finally:
            await link.close()

    with pytest.raises(CacheServiceError) as err:
        asyncio.run(main())
    assert (err.value.code, err.value.details) == (grpc.StatusCode.UNAVAILABLE,
                                                   "the cache service is unavailable (Unpin)")
    assert err.value.cause.startswith("UNAVAILABLE: ")


def test_worker_failures_are_unavailable_with_their_first_line():
    ray_like = WorkerCallError("the worker failed: RuntimeError: engine loop died\nTraceback (most recent call "
                               "last):\n  File \"/srv/workers/engine.py\", line 9")
    assert _status_of(ray_like) == (grpc.StatusCode.UNAVAILABLE, "the worker failed: RuntimeError: engine loop died")
    long = WorkerCallError("x" * 500)
    assert _status_of(long) == (grpc.StatusCode.UNAVAILABLE, "x" * 157 + "...")
    assert _status_of(TimeoutError()) == (grpc.StatusCode.UNAVAILABLE, "the workers did not answer in time")
    assert _status_of(KeyError("x")) is None  # INTERNAL, by the servicer


# ---- tenant labels ------------------------------------------------------------------------------------
def test_anonymous_tenants_are_stable_digests_never_the_salt():
    assert anonymous_tenant("") == "default"
    assert anonymous_tenant("tenant-a") == "salt-a51cb3c14729"
    assert anonymous_tenant("tenant-a") != anonymous_tenant("tenant-b")
    assert len(anonymous_tenant("s" * 100_000)) == len("salt-") + 12


def test_only_served_tenants_take_labels_up_to_the_bound():
    labels = TenantLabels(max_labels=2)
    assert labels.label("a") == OTHER_TENANT  # refused before it was ever served: no label of its own
    assert [labels.admit(t) for t in ("a", "b", "c", "a")] == ["a", "b", OTHER_TENANT, "a"]
    assert [labels.label(t) for t in ("a", "b", "c", "d")] == ["a", "b", OTHER_TENANT, OTHER_TENANT]
    assert [labels.admit(t) for t in ("default", "unauthenticated", "")] == ["default", "unauthenticated", "default"]


def test_router_metrics_bound_every_tenant_labelled_series():
    m = RouterMetrics(max_tenant_labels=1)
    for i in range(50):
        m.record_failed("none", anonymous_tenant(f"rejected-{i}"), "error")
    m.record_first_token("worker-0", "t1", 0.01)  # the first token of t1: t1 has a label now
    m.record_finished("worker-0", "t1", 32, 16, 16)
    m.record_finished("worker-0", "t2", 32, 0, 0)
    m.record_first_token("worker-0", "t3", 0.02)
    tenants = {s.labels["tenant"] for metric in m.registry.collect() for s in metric.samples if "tenant" in s.labels}
    assert tenants == {"other", "t1"}
    assert m.requests.labels("none", "other", "error")._value.get() == 50
    assert m.requests.labels("worker-0", "other", "ok")._value.get() == 1
