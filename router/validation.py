"""Validation of a generation request before it is routed.

Everything a worker would reject is rejected here, at the edge, with a message naming the field: a
bad request must never occupy a worker, be retried on another one, or count against a worker's
health. The servicer converts the proto into ``GenerateArgs`` (plain values, ``None`` for an unset
optional field) and turns ``InvalidRequestError`` into INVALID_ARGUMENT. The sampling parameters' rules
(what can be computed: the temperature, top_p, top_k and stop bounds) are ``SamplingParams.validate``'s,
the same that ``Engine.add_request`` and ``prefixcache generate`` apply.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from router.tokenize import PromptEncoder
from cache_service.records import InvalidRequestError, SamplingParams

DEFAULT_MAX_TOKENS = 16
MAX_ID_CHARS = 256  # request_id, session_id, cache_salt, target_worker


@dataclass(slots=True)
class GenerateArgs:
    """A GenerateRequest as plain Python values (``None``: the optional field was not set)."""

    request_id: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    cache_salt: str = ""
    session_id: str = ""
    target_worker: str = ""


@dataclass(slots=True)
class ValidRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    cache_salt: str
    session_id: str
    target_worker: str


def _check_id(name: str, value: str) -> None:
    if len(value) > MAX_ID_CHARS:
        raise InvalidRequestError(f"{name} is {len(value)} characters long; at most {MAX_ID_CHARS} are allowed")


def check_prompt_ids(prompt_ids: list[int], encoder: PromptEncoder) -> None:
    if not prompt_ids:
        raise InvalidRequestError("the prompt is empty after tokenization")
    vocab = encoder.info.vocab_size
    for pos, t in enumerate(prompt_ids):
        if not 0 <= t < vocab:
            raise InvalidRequestError(
                f"token id {t} at position {pos} is outside the vocabulary of {encoder.model_id!r} (0..{vocab - 1})"
            )


def encode_prompt(text: str, token_ids: list[int], encoder: PromptEncoder, what: str = "prompt") -> list[int]:
    """Exactly one of ``text`` / ``token_ids`` -> checked token ids."""
    if text and token_ids:
        raise InvalidRequestError(f"both text and token_ids are set; give the {what} as exactly one of them")
    if not text and not token_ids:
        raise InvalidRequestError(f"no {what}: set text or token_ids")
    prompt_ids = encoder.encode(text) if text else [int(t) for t in token_ids]
    check_prompt_ids(prompt_ids, encoder)
    return prompt_ids


def validate_generate(args: GenerateArgs, encoder: PromptEncoder) -> ValidRequest:
    for name in ("request_id", "cache_salt", "session_id", "target_worker"):
        _check_id(name, getattr(args, name))
    prompt_ids = encode_prompt(args.text, args.token_ids, encoder)
    if args.max_tokens is not None and args.max_tokens == 0:
        raise InvalidRequestError("max_tokens must be a positive integer, got 0 (leave it unset for the default)")
    params = SamplingParams(
        max_tokens=DEFAULT_MAX_TOKENS if args.max_tokens is None else int(args.max_tokens),
        temperature=float(args.temperature),
        top_p=1.0 if args.top_p is None else float(args.top_p),
        top_k=int(args.top_k),
        seed=args.seed,
        stop=tuple(args.stop),
        ignore_eos=bool(args.ignore_eos),
    )
    params.validate()
    max_context = encoder.info.max_context
    if len(prompt_ids) + params.max_tokens > max_context:
        raise InvalidRequestError(
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = "
            f"{len(prompt_ids) + params.max_tokens} exceeds the model's context length of {max_context} tokens"
        )
    return ValidRequest(
        request_id=args.request_id or uuid.uuid4().hex,
        prompt_ids=prompt_ids,
        params=params,
        cache_salt=args.cache_salt,
        session_id=args.session_id,
        target_worker=args.target_worker,
    )
