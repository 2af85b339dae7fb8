"""The router's view of the model: its tokenizer, vocabulary, context length and block hashing.

The router never loads weights: it needs only what decides a request's validity and its block hashes,
and those must be *exactly* what the workers compute (same tokenizer, same ``model_id`` in the hash
root), or every lookup would miss. So it reads the same files through the same loader functions the
workers use (``load_tokenizer`` / ``checkpoint_model_id``) and hashes with the one canonical function.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cache_service.block_hash import BlockHash, hash_prompt_blocks, num_reusable_blocks
# The torch-free modules of workers.model: the router never loads weights and must not import torch.
from workers.model.checkpoint import checkpoint_model_id, load_tokenizer
from workers.model.config import ModelConfig, load_model_config
from workers.model.demo import DEMO_MODEL_ID, demo_config
from workers.model.tokenizer import Tokenizer


@dataclass(slots=True, frozen=True)
class ModelInfo:
    model_id: str
    vocab_size: int
    max_context: int  # prompt + completion tokens the model can attend over


def load_model_info(model: str) -> ModelInfo:
    config: ModelConfig = demo_config() if model == DEMO_MODEL_ID else load_model_config(Path(model).expanduser())
    return ModelInfo(
        model_id=checkpoint_model_id(model),
        vocab_size=config.vocab_size,
        max_context=config.max_position_embeddings,
    )


class PromptEncoder:
    """Text -> token ids -> block hashes, as the workers would compute them."""

    def __init__(self, model: str, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.model = model
        self.block_size = block_size
        self.info = load_model_info(model)
        self.tokenizer: Tokenizer = load_tokenizer(model)

    @property
    def model_id(self) -> str:
        return self.info.model_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(token_ids)

    def block_hashes(self, token_ids: Sequence[int], cache_salt: str = "") -> list[BlockHash]:
        return hash_prompt_blocks(token_ids, self.block_size, self.info.model_id, cache_salt)

    def cacheable_tokens(self, num_prompt_tokens: int, num_cached_blocks: int) -> int:
        """Tokens a worker holding ``num_cached_blocks`` of the prompt's chain will report as cached.

        The engine always recomputes at least the prompt's last token (it needs its logits), so a
        prompt whose every block is cached still prefills its last block's final position: that block
        cannot count as a hit.
        """
        max_blocks = num_reusable_blocks(num_prompt_tokens, self.block_size)
        return min(num_cached_blocks, max_blocks) * self.block_size
