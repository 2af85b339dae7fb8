"""Which cache salt a vLLM chain's first block was computed under, so that its canonical hash can be rooted.

A canonical hash (DESIGN section 2) starts from ``root_hash(model_id, cache_salt)``; vLLM's own chain starts
from its ``NONE_HASH`` and mixes the salt into the *first block only* (as an extra key). A ``BlockStored``
event whose ``parent_block_hash`` is None therefore tells us the block's tokens but not, by itself, which of
our roots it hangs from. The worker knows every request it admitted (its first block's tokens and its salt),
so the candidates are the salts admitted with exactly these first-block tokens:

    no candidate             drop the block (we never asked for it: the index must not claim it)
    the event names a salt   vLLM 0.32 publishes the salt in ``extra_keys[0]`` (untagged: ``(salt,)``;
                             ``None`` for no salt): take it if it is a candidate, else drop
    one candidate            (a publisher without extra keys) take it
    several candidates       (two tenants sent the same first block; no extra keys) compute vLLM's own hash
                             of the block under each candidate salt (``vllm_hash``, when the worker could build
                             one from vLLM's hash function) and take the one that equals the event's hash;
                             no function, or not exactly one match: drop

Dropping a root drops its whole chain (every descendant needs its parent's canonical hash): the index then
misses blocks vLLM holds, which costs hits, never correctness. Guessing would be worse: a block indexed under
the wrong tenant's root would route that tenant's requests to a worker that cannot hit them.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Hashable, Sequence

__all__ = ["RootSalts", "UNKNOWN_SALT", "salt_of_extra_keys"]

UNKNOWN_SALT = object()  # the event does not say (a publisher without extra keys)
_NOT_A_SALT = object()  # the event's extra keys hold something else (LoRA, multimodal): we cannot map it

VllmHashFn = Callable[[Sequence[int], str], Hashable]  # (first-block tokens, salt) -> vLLM's hash of that block


def salt_of_extra_keys(extra_keys: list[Any] | None, index: int) -> object:
    """What a ``BlockStored`` event says about block ``index``'s salt: a ``str`` ("" for none),
    ``UNKNOWN_SALT``, or ``_NOT_A_SALT`` (anything but a lone salt: the caller drops the block)."""
    if extra_keys is None:
        return UNKNOWN_SALT
    if index >= len(extra_keys):
        return _NOT_A_SALT
    keys = extra_keys[index]
    if keys is None:
        return ""
    if isinstance(keys, (tuple, list)) and len(keys) == 1 and isinstance(keys[0], str):
        return keys[0]
    return _NOT_A_SALT


class RootSalts:
    """A bounded memory of admitted (first-block tokens -> salts), and the resolution of a root block's salt.

    Bounded by ``capacity`` distinct first blocks, least recently admitted forgotten first: a root block is
    stored while its request runs, so only the requests of the last moments matter.
    """

    def __init__(self, block_size: int, capacity: int = 8192, vllm_hash: VllmHashFn | None = None) -> None:
        if block_size <= 0 or capacity <= 0:
            raise ValueError("block_size and capacity must be positive")
        self.block_size = block_size
        self.capacity = capacity
        self.vllm_hash = vllm_hash
        self._salts: OrderedDict[tuple[int, ...], set[str]] = OrderedDict()
        self.num_dropped = 0  # root blocks that could not be resolved

    def __len__(self) -> int:
        return len(self._salts)

    def admit(self, prompt_ids: Sequence[int], cache_salt: str) -> None:
        """Remember a request handed to vLLM (before vLLM can store its first block)."""
        if len(prompt_ids) < self.block_size:
            return  # no full block: vLLM stores no root for it
        key = tuple(int(t) for t in prompt_ids[: self.block_size])
        salts = self._salts.get(key)
        if salts is None:
            self._salts[key] = {cache_salt}
            if len(self._salts) > self.capacity:
                self._salts.popitem(last=False)
        else:
            salts.add(cache_salt)
            self._salts.move_to_end(key)

    def candidates(self, tokens: Sequence[int]) -> set[str]:
        return set(self._salts.get(tuple(int(t) for t in tokens), ()))

    def resolve(self, tokens: Sequence[int], event_salt: object, vllm_block_hash: Hashable) -> str | None:
        """The salt a root block with ``tokens`` was computed under, or None (drop it); see the module doc."""
        salt = self._resolve(self.candidates(tokens), tokens, event_salt, vllm_block_hash)
        if salt is None:
            self.num_dropped += 1
        return salt

    def _resolve(self, candidates: set[str], tokens: Sequence[int], event_salt: object,
                 vllm_block_hash: Hashable) -> str | None:
        if not candidates or event_salt is _NOT_A_SALT:
            return None
        if isinstance(event_salt, str):
            return event_salt if event_salt in candidates else None
        if len(candidates) == 1:
            return next(iter(candidates))
        if self.vllm_hash is None:
            return None
        matches = [s for s in sorted(candidates) if self.vllm_hash(tokens, s) == vllm_block_hash]
        return matches[0] if len(matches) == 1 else None
