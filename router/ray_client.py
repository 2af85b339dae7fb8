"""The ``WorkerClient`` of a Ray worker actor: calls through its handle, Ray's errors as ``WorkerCallError``.

The router imports this module (and Ray) but never the actor's module: the handle is created by the
launcher (``deploy/``), and everything that crosses it is a ``cache_service.records`` record.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Sequence

import ray

from cache_service.records import Delta, GenerateCall, InvalidRequestError, UnsupportedFeatureError, WorkerPoll
from router.worker_client import WorkerCallError


def _call_error(exc: BaseException) -> Exception:
    name = type(exc).__name__
    if isinstance(exc, ray.exceptions.RayTaskError):  # the actor's method raised: report its own error
        cause = exc.cause
        if isinstance(cause, InvalidRequestError):
            return InvalidRequestError(str(cause))
        if isinstance(cause, UnsupportedFeatureError):  # the engine cannot do it (pins on vLLM): say so as it is
            return UnsupportedFeatureError(str(cause))
        return WorkerCallError(f"the worker failed: {type(cause).__name__}: {cause}")
    if isinstance(exc, ray.exceptions.ActorDiedError):
        return WorkerCallError(f"the worker process died ({name})", dead=True)
    if isinstance(exc, ray.exceptions.ActorUnavailableError):
        # Its process died and Ray is restarting it (or it is briefly unreachable).
        return WorkerCallError(f"the worker is unavailable, restarting ({name})", restarting=True)
    return WorkerCallError(f"the worker is unreachable ({name})")


class RayWorkerClient:
    def __init__(self, worker_id: str, handle: Any) -> None:
        self.worker_id = worker_id
        self.handle = handle  # ray.actor.ActorHandle of a workers.ray_worker.WorkerActor

    async def generate(self, call: GenerateCall) -> AsyncIterator[Delta]:
        try:
            refs = self.handle.generate.options(num_returns="streaming").remote(call)
            async for ref in refs:
                yield await ref
        except ray.exceptions.RayError as exc:
            raise _call_error(exc) from None

    async def poll(self, feed_epoch: str, feed_seq: int) -> WorkerPoll:
        return await self._call(self.handle.poll.remote(feed_epoch, feed_seq))

    async def pin(self, pin_id: str, token_ids: Sequence[int], cache_salt: str) -> int:
        return await self._call(self.handle.pin.remote(pin_id, list(token_ids), cache_salt))

    async def unpin(self, pin_id: str) -> int:
        return await self._call(self.handle.unpin.remote(pin_id))

    def abort(self, request_id: str) -> None:
        try:
            self.handle.abort.remote(request_id)  # fire and forget: the worker frees the request's blocks
        except Exception:  # noqa: BLE001 - the worker may be gone; nothing to free then
            pass

    @staticmethod
    async def _call(ref: Any) -> Any:
        try:
            return await ref
        except ray.exceptions.RayError as exc:
            raise _call_error(exc) from None
