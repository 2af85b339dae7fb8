"""OpenAI response bodies: completions, stream chunks, usage, errors (shapes of the OpenAI API reference).

    non-stream   {"id", "object": "chat.completion" | "text_completion", "created", "model", "choices", "usage"}
    stream       data: {"object": "chat.completion.chunk" | "text_completion", "choices": [{"delta"|"text"}]}\\n\\n
                 ... the last choice chunk has finish_reason; with include_usage one more chunk with
                 "choices": [] and the usage; then data: [DONE]
    error        {"error": {"message", "type", "param", "code"}}

``usage.prompt_tokens_details.cached_tokens`` is always present (0 when nothing hit): it is how a client sees
the prefix cache work. With the ``return_token_ids`` extension (vLLM's) a chat response carries
``prompt_token_ids`` and its choice ``token_ids``; a completion choice carries both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from cache_service.records import Usage

DONE = b"data: [DONE]\n\n"


@dataclass(slots=True, frozen=True)
class ResponseHead:
    """What every body and chunk of one response repeats."""

    id: str
    created: int
    model: str
    chat: bool

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"


def usage_json(u: Usage) -> dict[str, Any]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


def completion_body(head: ResponseHead, text: str, finish_reason: str, usage: Usage,
                    prompt_ids: list[int] | None = None, token_ids: list[int] | None = None) -> dict[str, Any]:
    """A whole answer; ``prompt_ids`` / ``token_ids`` only with ``return_token_ids``."""
    choice: dict[str, Any] = {"index": 0}
    if head.chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    choice["logprobs"] = None
    choice["finish_reason"] = finish_reason
    body: dict[str, Any] = {"id": head.id, "object": head.object, "created": head.created, "model": head.model,
                            "choices": [choice], "usage": usage_json(usage)}
    if token_ids is not None:
        choice["token_ids"] = token_ids
        if head.chat:
            body["prompt_token_ids"] = prompt_ids
        else:
            choice["prompt_token_ids"] = prompt_ids
    return body


def chunk(head: ResponseHead, text: str | None, finish_reason: str | None, *, include_usage: bool,
          role: bool = False, token_ids: list[int] | None = None, prompt_ids: list[int] | None = None) -> bytes:
    """One SSE event with one choice: ``text`` (None in a chat's closing chunk: an empty delta),
    ``finish_reason`` on the last. With include_usage every choice chunk says ``"usage": null``, as OpenAI's.
    ``token_ids`` / ``prompt_ids`` (``return_token_ids``; the prompt's in the first chunk only) as in
    ``completion_body``."""
    choice: dict[str, Any] = {"index": 0}
    if head.chat:
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    choice["logprobs"] = None
    choice["finish_reason"] = finish_reason
    if token_ids is not None:
        choice["token_ids"] = token_ids
    body: dict[str, Any] = {"id": head.id, "object": head.chunk_object, "created": head.created, "model": head.model,
                            "choices": [choice]}
    if prompt_ids is not None:
        if head.chat:
            body["prompt_token_ids"] = prompt_ids
        else:
            choice["prompt_token_ids"] = prompt_ids
    if include_usage:
        body["usage"] = None
    return sse(body)


def usage_chunk(head: ResponseHead, usage: Usage) -> bytes:
    return sse({"id": head.id, "object": head.chunk_object, "created": head.created, "model": head.model,
                "choices": [], "usage": usage_json(usage)})


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def sse(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
