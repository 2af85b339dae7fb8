"""The load driver's HTTP endpoint: one request as ``POST /v1/completions`` (stream, token ids), measured as the
gRPC one is (``loadgen/driver.py``), so that `prefixcache bench --endpoint http` figures compare with gRPC's.

    await run_requests("127.0.0.1:8000", requests, concurrency, calls=http_calls)   # loadgen/driver.py

The body carries the prompt's token ids, ``stream`` with ``include_usage`` (the last event has the usage,
``cached_tokens`` in ``prompt_tokens_details``) and the ``return_token_ids`` extension, so that a multi-turn
session's next prompt is built from the tokens the stack actually generated, exactly as over gRPC. What the
OpenAI shape does not carry (the worker, predicted and transferred tokens) stays empty.

The client is a minimal asyncio HTTP/1.1 one (keep-alive, chunked responses): the runtime has no HTTP
client library, and a thin one measures the server rather than the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

from loadgen.driver import BenchRequest, RequestResult, RunOne

COMPLETIONS = "/v1/completions"
MAX_LINE_BYTES = 1 << 20


class HttpError(Exception):
    """A non-200 answer (its status and body), or a broken connection."""


class HttpConnection:
    """One keep-alive HTTP/1.1 connection: POST a JSON body; read the answer whole or as it comes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.broken = False  # an exchange failed half way: the connection's state is unknown, never reuse it

    @classmethod
    async def open(cls, host: str, port: int) -> HttpConnection:
        return cls(*await asyncio.open_connection(host, port, limit=MAX_LINE_BYTES))

    async def post(self, path: str, body: bytes) -> bytes:
        """The whole answer body (raises ``HttpError`` for a status other than 200)."""
        return b"".join([part async for part in self.post_stream(path, body)])

    async def post_stream(self, path: str, body: bytes) -> AsyncIterator[bytes]:
        """The answer body, chunk by chunk as the server sends it."""
        self.writer.write(b"POST %s HTTP/1.1\r\nhost: prefixcache\r\ncontent-type: application/json\r\n"
                          b"content-length: %d\r\n\r\n%s" % (path.encode(), len(body), body))
        status = await self.reader.readline()
        if not status:
            raise HttpError("the server closed the connection")
        length, chunked = None, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        ok = status.split(b" ", 2)[1:2] == [b"200"]
        if length is not None:
            data = await self.reader.readexactly(length)
            if not ok:
                raise HttpError(f"{status.decode(errors='replace').strip()}: {data[:300].decode(errors='replace')}")
            yield data
            return
        if not chunked:
            raise HttpError(f"{status.decode(errors='replace').strip()}: neither content-length nor chunked")
        error = []
        while True:
            size = int((await self.reader.readline()).split(b";")[0], 16)
            data = await self.reader.readexactly(size + 2)  # the chunk and its CRLF
            if size == 0:
                break
            if ok:
                yield data[:-2]
            else:
                error.append(data[:-2])
        if not ok:
            body_text = b"".join(error)[:300].decode(errors="replace")
            raise HttpError(f"{status.decode(errors='replace').strip()}: {body_text}")

    def close(self) -> None:
        self.writer.close()


def completions_body(req: BenchRequest, prompt: list[int]) -> bytes:
    body = {"prompt": prompt, "max_tokens": req.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, "return_token_ids": True}
    if req.cache_salt:
        body["cache_salt"] = req.cache_salt
    if req.session_id:
        body["session_id"] = req.session_id
    return json.dumps(body).encode()


async def run_one_http(conn: HttpConnection, req: BenchRequest, prompt: list[int], t0: float,
                       timeout_s: float) -> RequestResult:
    start = time.perf_counter()
    res = RequestResult(req.request_id, req.group, req.cache_salt, start_s=start - t0)
    last_token_at: float | None = None
    gaps: list[float] = []
    pending = b""
    try:
        async with asyncio.timeout(timeout_s):
            async for part in conn.post_stream(COMPLETIONS, completions_body(req, prompt)):
                pending += part
                *events, pending = pending.split(b"\n\n")
                now = time.perf_counter()
                for event in events:
                    if not event.startswith(b"data: ") or event == b"data: [DONE]":
                        continue
                    msg = json.loads(event[6:])
                    if "error" in msg:
                        res.error = f"{msg['error'].get('code') or 'error'}: {msg['error'].get('message')}"
                        continue
                    for choice in msg.get("choices") or ():
                        ids = choice.get("token_ids") or []
                        if ids:
                            if res.ttft_s is None:
                                res.ttft_s = now - start
                            elif last_token_at is not None:
                                gaps.append(now - last_token_at)
                            last_token_at = now
                            res.output_token_ids.extend(ids)
                        if choice.get("finish_reason"):
                            res.finish_reason = choice["finish_reason"]
                    usage = msg.get("usage")
                    if usage:
                        res.prompt_tokens = usage["prompt_tokens"]
                        res.completion_tokens = usage["completion_tokens"]
                        res.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        res.latency_s = time.perf_counter() - start
        if not res.finish_reason and res.error is None:
            res.error = "stream ended without a finish_reason"
    except (HttpError, OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
        conn.broken = True
        res.error = f"{type(exc).__name__}: {exc}"
        res.latency_s = time.perf_counter() - start
    if gaps:
        res.itl_s = sum(gaps) / len(gaps)
    return res


class HttpPool:
    """Keep-alive connections to one HTTP front door, reused call after call (the driver's concurrency bounds
    how many are open at once)."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self.host, self.port = host, int(port)
        self._idle: list[HttpConnection] = []

    async def run(self, req: BenchRequest, prompt: list[int], t0: float, timeout_s: float) -> RequestResult:
        try:
            conn = self._idle.pop() if self._idle else await HttpConnection.open(self.host, self.port)
        except OSError as exc:
            return RequestResult(req.request_id, req.group, req.cache_salt, start_s=time.perf_counter() - t0,
                                 error=f"cannot connect to {self.host}:{self.port}: {exc}")
        res = await run_one_http(conn, req, prompt, t0, timeout_s)
        if conn.broken:
            conn.close()
        else:
            self._idle.append(conn)
        return res

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


@contextlib.asynccontextmanager
async def http_calls(target: str, timeout_s: float) -> AsyncIterator[RunOne]:
    """``run_requests``' calls through the HTTP front door at ``target`` (host:port)."""
    pool = HttpPool(target)
    try:
        yield lambda req, prompt, t0: pool.run(req, prompt, t0, timeout_s)
    finally:
        await pool.close()
