"""Request admission: what the engine can never serve is rejected up front, naming the field.

A request that passes can always run to completion on this engine: its tokens are in the vocabulary, it fits
the model's context, and its longest sequence fits the KV cache alone (it may still have to wait, or be
preempted, while others hold blocks; pins that take the room make the scheduler fail it later instead).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Sequence

from cache_service.records import InvalidRequestError, SamplingParams
from workers.kv_manager import cdiv


@dataclass(slots=True, frozen=True)
class RequestLimits:
    vocab_size: int
    max_model_len: int  # prompt + output tokens the model can attend over
    block_size: int
    num_blocks: int  # the whole KV cache

    def validate(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise ``InvalidRequestError`` (naming the field) for a request that can never be served."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params must be SamplingParams, got {type(params).__name__}")
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequestError("prompt is empty: give at least one token")
        params.validate()
        vocab = self.vocab_size
        for t in prompt_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise InvalidRequestError(
                    f"prompt token id {t!r} is outside the vocabulary (vocab_size {vocab}: ids 0..{vocab - 1})"
                )
        if n + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) = {n + params.max_tokens} tokens is "
                f"longer than the model's context ({self.max_model_len} tokens)"
            )
        # The last sampled token never needs KV, so the longest sequence occupies n + max_tokens - 1 slots.
        need = cdiv(n + params.max_tokens - 1, self.block_size)
        if need > self.num_blocks:
            raise InvalidRequestError(
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) needs {need} KV blocks of "
                f"{self.block_size} tokens but the KV cache has only {self.num_blocks} blocks"
            )


def normalize_ids(xs: Sequence[object]) -> list:
    """Plain ints where possible (numpy / torch integer scalars too); anything else is left for validate()."""
    out = []
    for x in xs:
        if isinstance(x, bool) or isinstance(x, int):
            out.append(x)
        else:
            try:
                out.append(operator.index(x))
            except TypeError:
                out.append(x)
    return out
