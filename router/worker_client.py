"""How the router talks to a worker: the ``WorkerClient`` protocol, its failure type, and an in-process client.

    Dispatcher / WorkerRegistry / PinManager  --WorkerClient-->  RayWorkerClient (router/ray_client.py)
                                                                 InProcessWorkerClient (here: tests, one process)

The router's algorithms (failover, polling, pins) see only this protocol and ``WorkerCallError``, so they
are tested without Ray against in-process workers; the Ray client turns Ray's exceptions into the same
error. Records are ``cache_service.records``: ``GenerateCall`` in, ``Delta`` / ``WorkerPoll`` out.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Protocol, Sequence

from cache_service.records import Delta, GenerateCall, InvalidRequestError, UnsupportedFeatureError, WorkerPoll


class WorkerCallError(Exception):
    """A call failed because of the worker, not the request.

    ``dead``: the worker process is gone for good (never call it again). ``restarting``: its process died
    and is being restarted (out of rotation now, back when it answers). Neither: unreachable or slow, for
    now.
    """

    def __init__(self, message: str, *, dead: bool = False, restarting: bool = False) -> None:
        super().__init__(message)
        self.dead = dead
        self.restarting = restarting


class WorkerClient(Protocol):
    worker_id: str

    def generate(self, call: GenerateCall) -> AsyncIterator[Delta]:
        """The request's deltas; the last has ``finish_reason`` (raises ``WorkerCallError``)."""
        ...

    async def poll(self, feed_epoch: str, feed_seq: int) -> WorkerPoll: ...

    async def pin(self, pin_id: str, token_ids: Sequence[int], cache_salt: str) -> int: ...

    async def unpin(self, pin_id: str) -> int: ...

    def abort(self, request_id: str) -> None:
        """Fire and forget: free the request's blocks on the worker (it may be gone already)."""
        ...


class InProcessWorkerClient:
    """A ``WorkerClient`` over an object in this process with the worker's methods (``generate`` an async
    generator; ``poll``, ``pin``, ``unpin``, ``abort`` coroutines), e.g. a ``WorkerActor`` without Ray.

    Any exception the worker raises becomes a ``WorkerCallError`` (as a failed Ray call would), except an
    ``InvalidRequestError`` (the request's fault, relayed as it is) and one that already is one: a test's worker can raise ``WorkerCallError(dead=True)`` to play a dead process.
    """

    def __init__(self, worker_id: str, worker: Any) -> None:
        self.worker_id = worker_id
        self.worker = worker
        self._aborts: set[Any] = set()

    async def generate(self, call: GenerateCall) -> AsyncIterator[Delta]:
        gen = self.worker.generate(call)
        try:
            while True:
                try:
                    delta = await gen.__anext__()
                except StopAsyncIteration:
                    return
                except (WorkerCallError, InvalidRequestError):
                    raise
                except Exception as exc:  # noqa: BLE001 - the worker's failure, as Ray would report it
                    raise WorkerCallError(f"the worker failed: {type(exc).__name__}: {exc}") from None
                yield delta
        finally:
            await gen.aclose()

    async def poll(self, feed_epoch: str, feed_seq: int) -> WorkerPoll:
        return await self._call(self.worker.poll(feed_epoch, feed_seq))

    async def pin(self, pin_id: str, token_ids: Sequence[int], cache_salt: str) -> int:
        return await self._call(self.worker.pin(pin_id, list(token_ids), cache_salt))

    async def unpin(self, pin_id: str) -> int:
        return await self._call(self.worker.unpin(pin_id))

    def abort(self, request_id: str) -> None:
        import asyncio

        task = asyncio.ensure_future(self._call(self.worker.abort(request_id)))
        self._aborts.add(task)  # keep a reference until it is done (the loop holds only weak ones)
        task.add_done_callback(lambda t: (self._aborts.discard(t), t.cancelled() or t.exception()))

    @staticmethod
    async def _call(coro: Any) -> Any:
        try:
            return await coro
        except (WorkerCallError, InvalidRequestError, UnsupportedFeatureError):
            raise
        except Exception as exc:  # noqa: BLE001 - the worker's failure, as Ray would report it
            raise WorkerCallError(f"the worker failed: {type(exc).__name__}: {exc}") from None
