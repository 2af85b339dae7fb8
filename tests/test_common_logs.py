"""common/logs.py: JSON lines with component, request id (per asyncio task) and extra fields."""

import asyncio
import io
import json
import logging

import pytest
from valkey_fixtures import valkey  # noqa: F401  (pytest fixture)

from common.logs import configure_logging, get_logger, request_context


@pytest.fixture
def stream():
    buf = io.StringIO()
    configure_logging(level="DEBUG", fmt="json", stream=buf)
    yield buf
    configure_logging(level="INFO", fmt="json")  # back to stderr


def _lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_json_line_has_component_request_id_and_extra_fields(stream):
    log = get_logger("router")
    with request_context("req-1"):
        log.info("routed %s", "ok", extra={"worker": "worker-1", "predicted_cached_tokens": 48, "raw": b"\x01\xff"})
    log.warning("no request")
    first, second = _lines(stream)
    assert {k: first[k] for k in ("level", "component", "msg", "request_id", "worker", "predicted_cached_tokens",
                                  "raw")} == {
        "level": "info", "component": "router", "msg": "routed ok", "request_id": "req-1", "worker": "worker-1",
        "predicted_cached_tokens": 48, "raw": "01ff"}
    assert first["ts"].endswith("Z")
    assert second["component"] == "router" and second["level"] == "warning" and "request_id" not in second


def test_request_ids_do_not_leak_between_concurrent_tasks(stream):
    log = get_logger("worker")

    async def handle(rid: str) -> None:
        with request_context(rid):
            for step in range(3):
                log.debug("step", extra={"step": step})
                await asyncio.sleep(0)

    async def main() -> None:
        await asyncio.gather(*(handle(f"r{i}") for i in range(4)))

    asyncio.run(main())
    lines = _lines(stream)
    assert len(lines) == 12
    for i in range(4):
        assert [line["step"] for line in lines if line["request_id"] == f"r{i}"] == [0, 1, 2]


def test_exception_is_logged_and_text_format_works():
    buf = io.StringIO()
    configure_logging(level="INFO", fmt="text", stream=buf)
    try:
        log = get_logger("cache_service")
        with request_context("abc"):
            try:
                raise RuntimeError("boom")
            except RuntimeError:
                log.exception("lookup failed", extra={"num_blocks": 3})
        text = buf.getvalue()
        assert "cache_service [abc] lookup failed num_blocks=3" in text
        assert "RuntimeError: boom" in text
    finally:
        configure_logging(level="INFO", fmt="json")


def test_bad_configuration_is_a_clear_error():
    with pytest.raises(ValueError, match="log format"):
        configure_logging(fmt="xml")
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging(level="LOUD")
    with pytest.raises(ValueError, match="component"):
        get_logger("")
    assert not logging.getLogger("prefixcache").propagate


def test_request_id_crosses_a_grpc_hop(stream):
    """Client metadata from request_id_metadata() -> server interceptor -> bound in unary and streaming handlers."""
    import grpc

    from common.logs import RequestIdInterceptor, current_request_id, request_id_metadata

    log = get_logger("cache_service")

    async def unary(request: bytes, context) -> bytes:
        log.info("lookup")
        return (current_request_id() or "-").encode()

    async def streaming(request: bytes, context):
        for i in range(3):
            await asyncio.sleep(0)
            yield f"{i}:{current_request_id() or '-'}".encode()

    async def own_id(request: bytes, context):
        # A handler that binds the request's own id (as the router does with the body's request_id) keeps it
        # across yields: the interceptor must not put the metadata's id back after each one.
        with request_context("body-id"):
            for i in range(3):
                await asyncio.sleep(0)
                yield f"{i}:{current_request_id() or '-'}".encode()

    handler = grpc.method_handlers_generic_handler("t.Svc", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.unary_stream_rpc_method_handler(streaming),
        "OwnId": grpc.unary_stream_rpc_method_handler(own_id),
    })

    async def main() -> list:
        server = grpc.aio.server(interceptors=[RequestIdInterceptor()])
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                unary_call = ch.unary_unary("/t.Svc/Unary")
                stream_call = ch.unary_stream("/t.Svc/Stream")
                with request_context("req-9"):
                    got = [await unary_call(b"", metadata=request_id_metadata())]
                got.append(await unary_call(b"", metadata=request_id_metadata()))  # none bound: no metadata
                got.append([m async for m in stream_call(b"", metadata=request_id_metadata("req-10"))])
                own_call = ch.unary_stream("/t.Svc/OwnId")
                got.append([m async for m in own_call(b"", metadata=request_id_metadata("meta-id"))])
                return got
        finally:
            await server.stop(None)

    assert asyncio.run(main()) == [b"req-9", b"-", [b"0:req-10", b"1:req-10", b"2:req-10"],
                                   [b"0:body-id", b"1:body-id", b"2:body-id"]]
    assert [(line["msg"], line.get("request_id")) for line in _lines(stream)] == [("lookup", "req-9"), ("lookup", None)]


# ---- the project's own servers bind the id from metadata ----------------------------------------------


def test_cache_service_binds_the_request_id_of_the_call_metadata(stream, valkey):
    """The CacheService server (cache_service/server.py) is built with RequestIdInterceptor: its
    servicer's own log line of a RegisterNode call carries the caller's x-request-id."""
    import grpc

    from cache_service.server import CacheServiceConfig, CacheServiceThread
    from common.logs import request_id_metadata
    from protos.prefixcache.v1 import cache_pb2 as pb
    from protos.prefixcache.v1 import cache_pb2_grpc

    svc = CacheServiceThread(CacheServiceConfig(redis_url=valkey.url, port=0))
    svc.start()
    try:
        with grpc.insecure_channel(svc.address) as channel:
            stub = cache_pb2_grpc.CacheServiceStub(channel)
            for node_id, metadata in (("A", request_id_metadata("req-cs-1")), ("B", ())):
                node = pb.NodeInfo(node_id=node_id, transfer_address="127.0.0.1:7000", model_id="m", block_size=16)
                assert stub.RegisterNode(pb.RegisterNodeRequest(node=node), timeout=10, metadata=metadata).epoch == 1
    finally:
        svc.stop()
    registered = [line for line in _lines(stream) if line["msg"] == "registered node"]
    assert [(line["component"], line.get("request_id"), line["node_id"], line["epoch"]) for line in registered] == [
        ("cache_service", "req-cs-1", "A", 1), ("cache_service", None, "B", 1)]


def test_block_transfer_fetch_carries_the_bound_request_id_to_the_peer(stream):
    """TransferClient.fetch_blocks sends the bound request id as metadata; the TransferServer
    (cache_service/transfer_server.py) binds it while it serves the fetch (here: the worker's export)."""
    from cache_service.transfer_client import TransferClient
    from cache_service.transfer_server import BlockTransferServicer, TransferServer
    from common.logs import current_request_id

    log = get_logger("transfer")
    seen: list[str | None] = []

    def export(hashes):
        seen.append(current_request_id())
        log.info("export", extra={"num_blocks": len(hashes)})
        return []  # holds none of them: the stream ends at once

    async def main() -> list:
        server = TransferServer(BlockTransferServicer(export, "m"), raw_stream=False)
        address = await server.start()
        client = TransferClient("B", raw_stream=False)
        try:
            with request_context("req-tx-1"):
                got = [await client.fetch_blocks(address, [bytes(range(16))], timeout_s=10.0)]
            got.append(await client.fetch_blocks(address, [bytes(range(16))], timeout_s=10.0))  # none bound
            return got
        finally:
            await client.close()
            await server.stop()

    assert asyncio.run(main()) == [([], 0), ([], 0)]
    assert seen == ["req-tx-1", None]
    assert [(line["component"], line.get("request_id"), line["num_blocks"]) for line in _lines(stream)
            if line["msg"] == "export"] == [("transfer", "req-tx-1", 1), ("transfer", None, 1)]
