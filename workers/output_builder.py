"""Per-token bookkeeping: a sampled token -> is the request done? -> text -> the ``RequestOutput`` delta.

A request finishes on the first of: an EOS token (unless ``ignore_eos``), ``max_tokens`` output tokens, the
model's context, or a stop string in its text (``detokenizer.py``). The token that finished it stays in its
output. An internal sequence (a pin's warm-up) only needed its prefill: it finishes after its first token
and is never detokenized or reported.

The engine decides *when* (after the forward, for each sequence that sampled); this module decides *what*.
"""

from __future__ import annotations

from dataclasses import dataclass

from cache_service.records import FailureKind
from workers.detokenizer import take_delta, update_text
from workers.model.tokenizer import Tokenizer
from workers.sequence import RequestOutput, Sequence


@dataclass(slots=True)
class OutputBuilder:
    tokenizer: Tokenizer
    eos_token_ids: frozenset[int]
    max_model_len: int

    def append_token(self, seq: Sequence, token: int) -> None:
        """Add the sampled token; sets ``seq.finish_reason`` when it ends the request."""
        seq.token_ids.append(token)
        params = seq.params
        if token in self.eos_token_ids and not params.ignore_eos:
            seq.finish_reason = "stop"
        elif seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"
        if seq.internal:
            if seq.finish_reason is None:
                seq.finish_reason = "length"  # an internal warm-up only needs its prefill
            return
        update_text(seq, self.tokenizer)


def emit(seq: Sequence) -> RequestOutput:
    """What the request produced since its last output (text that may become a stop string waits)."""
    new_ids, new_text = take_delta(seq)
    return request_output(seq, new_ids, new_text)


def request_output(seq: Sequence, new_ids: list[int], new_text: str) -> RequestOutput:
    return RequestOutput(
        request_id=seq.request_id,
        new_token_ids=new_ids,
        new_text=new_text,
        finished=seq.is_finished,
        finish_reason=seq.finish_reason,
        prompt_tokens=seq.num_prompt_tokens,
        completion_tokens=seq.num_output_tokens,
        cached_tokens=seq.num_cached_tokens or 0,
        error=seq.error,
        error_kind=seq.error_kind if seq.error is not None else None,
        host_cached_tokens=seq.num_host_hit_tokens,
        disk_cached_tokens=seq.num_disk_hit_tokens,
    )


def rejected_output(request_id: str, num_prompt_tokens: int, error: str) -> RequestOutput:
    """The whole output of a request refused at admission (``Engine.generate`` reports it in place)."""
    return RequestOutput(request_id, [], "", True, "error", num_prompt_tokens, 0, 0, error, FailureKind.INVALID)


def accumulate(total: RequestOutput, delta: RequestOutput) -> RequestOutput:
    """``total`` extended by the next step's ``delta`` (the counters are cumulative: the latest wins)."""
    total.new_token_ids = total.new_token_ids + delta.new_token_ids
    total.new_text += delta.new_text
    total.finished, total.finish_reason, total.error = delta.finished, delta.finish_reason, delta.error
    total.error_kind = delta.error_kind
    total.completion_tokens, total.cached_tokens = delta.completion_tokens, delta.cached_tokens
    total.host_cached_tokens, total.disk_cached_tokens = delta.host_cached_tokens, delta.disk_cached_tokens
    return total
