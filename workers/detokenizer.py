"""Incremental detokenization, stop strings, and the text delta each step reports.

Decoding one token at a time is wrong for real tokenizers: a character can span several byte-level tokens, and
some tokenizers drop or add a leading space depending on the neighbour. So each step decodes a short window

    output ids   [ ... | prefix_offset ... read_offset | new ids ]
                         `-- already turned into text --'

twice (with and without the new ids) and appends the difference; text ending in U+FFFD is an incomplete
character and waits for the next token (unless the sequence is finishing).

Stop strings: the text is cut *before* the first stop string and the request finishes with "stop" (the
token that completed it stays in token_ids). While a stop string could still be completing, the last
``max(len(stop)) - 1`` characters are held back, so streamed text never has to be taken back.
"""

from __future__ import annotations

from workers.model.tokenizer import Tokenizer
from workers.sequence import Sequence


def update_text(seq: Sequence, tokenizer: Tokenizer) -> None:
    """Extend ``seq.output_text`` with the newest token(s); may set ``finish_reason = "stop"`` (stop string)."""
    out = seq.token_ids[seq.num_prompt_tokens :]
    prefix_text = tokenizer.decode(out[seq.prefix_offset : seq.read_offset])
    full_text = tokenizer.decode(out[seq.prefix_offset :])
    finishing = seq.finish_reason is not None
    if len(full_text) <= len(prefix_text) or (full_text.endswith("\ufffd") and not finishing):
        return
    before = len(seq.output_text)
    seq.output_text += full_text[len(prefix_text) :]
    seq.prefix_offset, seq.read_offset = seq.read_offset, len(out)
    stops = seq.params.stop
    if stops:
        # Only a window reaching into the new text can hold a new match.
        start = max(0, before - max(len(s) for s in stops) + 1)
        found = [i for i in (seq.output_text.find(s, start) for s in stops) if i >= 0]
        if found:
            seq.output_text = seq.output_text[: min(found)]
            seq.finish_reason = "stop"


def take_delta(seq: Sequence) -> tuple[list[int], str]:
    """The token ids and text not reported yet (text that may still become a stop string is held back)."""
    text_end = len(seq.output_text)
    if seq.finish_reason is None and seq.params.stop:
        text_end = max(seq.num_emitted_chars, text_end - (max(len(s) for s in seq.params.stop) - 1))
    new_text = seq.output_text[seq.num_emitted_chars : text_end]
    new_ids = seq.token_ids[seq.num_prompt_tokens + seq.num_emitted_tokens :]
    seq.num_emitted_chars = text_end
    seq.num_emitted_tokens = seq.num_output_tokens
    return new_ids, new_text
