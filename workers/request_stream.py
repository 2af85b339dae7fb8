"""One request's stream on a worker: engine outputs (per step) -> ``Delta`` records (per burst).

The engine loop thread hands every ``RequestOutput`` of a request (or an ``EngineFailure`` when the engine
failed it) to the request's sink, which puts it on an asyncio queue; the actor's ``generate`` drains
whatever is ready into one ``Delta`` so that a fast engine does not create one Ray object per token:

    engine loop thread: sink(out) --call_soon_threadsafe--> queue --next_delta()--> Delta --> router
"""

from __future__ import annotations

import asyncio

from cache_service.records import Delta, EngineFailure, FailureKind, Usage
from workers.sequence import RequestOutput


class RequestStream:
    def __init__(self, worker_id: str, num_transferred_tokens: int = 0) -> None:
        self.worker_id = worker_id
        self.num_transferred_tokens = num_transferred_tokens
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[RequestOutput | EngineFailure] = asyncio.Queue()
        self.finished = False

    def sink(self, out: RequestOutput | EngineFailure) -> None:
        """Called in the engine loop thread."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, out)

    async def next_delta(self) -> Delta:
        """What is ready now, coalesced (waits for at least one output)."""
        batch = [await self._queue.get()]
        while not self._queue.empty():
            batch.append(self._queue.get_nowait())
        delta = Delta(worker_id=self.worker_id)
        for out in batch:
            if isinstance(out, EngineFailure):
                delta.finish_reason, delta.failure = "error", out
                break
            delta.token_ids.extend(out.new_token_ids)
            delta.text += out.new_text
            if out.finished:
                delta.finish_reason = out.finish_reason or "stop"
                delta.usage = Usage(out.prompt_tokens, out.completion_tokens, out.cached_tokens,
                                    min(self.num_transferred_tokens, out.cached_tokens),
                                    host_cached_tokens=out.host_cached_tokens,
                                    disk_cached_tokens=out.disk_cached_tokens)
                if out.error:
                    delta.finish_reason = "error"
                    # The kind travels to the router, which retries only ENGINE failures elsewhere.
                    delta.failure = EngineFailure(out.error_kind or FailureKind.ENGINE, out.error)
                break
        self.finished = delta.finished
        return delta
