"""Test helpers: tiny random Hugging Face checkpoints (built with transformers, a fixed seed, no download) and
a transformers greedy oracle. transformers is imported here only, never by runtime code.

    path = build_tiny_checkpoint(tmp_path, "llama")             # config.json, model.safetensors, tokenizer.json,
                                                                 # generation_config.json
    ids  = hf_greedy(path, prompt_ids, max_new_tokens=20)        # transformers' own greedy generate (fp32, CPU)
    ids  = engine_greedy(load_model(path), [prompt_ids], 20)     # the same through CausalLM.forward directly
    path = build_trained_checkpoint(tmp_path)                    # a tiny Llama trained on counting sequences
    rows = teacher_forced_logits(loaded, prompts, continuations, kv_cache_dtype="fp8")  # logits along a path

Chat templates (``write_chat_template(path, style)``): real-looking ones of the three families, as their
instruct checkpoints ship them: "llama3" (header ids, ``| trim``, tokenizer_config.json), "mistral" ([INST], roles
must alternate, ``raise_exception``; chat_template.jinja) and "qwen2" (ChatML, a default system message).

Architectures: "llama" (plain RoPE), "llama3" (llama3 rope scaling, Llama-3 style theta), "mistral",
"qwen2" (q/k/v bias, tied embeddings by default). Weights use a wide init (``init_std``) and random norm
weights / biases so that greedy output varies from step to step: a near-uniform tiny model would produce ties
and repetitions that make token-exact comparison meaningless.
"""

from __future__ import annotations

import hashlib
import json
import random
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch

ARCHITECTURES = ("llama", "llama3", "mistral", "qwen2")
BOS, EOS, PAD = "<s>", "</s>", "<pad>"

_WORDS = (
    "the a cache block prefix token model router worker node hit miss evict pin transfer prompt decode "
    "prefill batch layer head key value query attention rope norm weight shard index hash tenant session "
    "alpha beta gamma delta one two three four five six seven eight nine ten hello world, quick brown fox."
).split()


@contextmanager
def single_thread():
    """Run torch ops on one thread, then restore. Tiny test models gain nothing from intra-op threads, and on a
    shared 2-core machine the OpenMP workers mostly spin-wait for each other."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _corpus(seed: int, num_lines: int = 400) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 16))) for _ in range(num_lines)]


def build_tokenizer(vocab_size: int, seed: int = 0):
    """A byte-level BPE ``tokenizers.Tokenizer`` with exactly ``vocab_size`` ids: <s>=0, </s>=1, <pad>=2,
    the 256 byte symbols, learned merges, and filler added tokens if the corpus runs out of merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < 3 + 256:
        raise ValueError("a byte-level tokenizer needs vocab_size >= 259")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    missing = vocab_size - tok.get_vocab_size(with_added_tokens=True)
    if missing > 0:
        tok.add_tokens([f"<extra_{i}>" for i in range(missing)])
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    return tok


# As Meta-Llama-3-8B-Instruct, Mistral-7B-Instruct-v0.1 and Qwen2-7B-Instruct ship them (tokenizer_config.json).
CHAT_TEMPLATES = {
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
        "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 "
        "== 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt "
        "%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] "
        "== 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant "
        "roles are supported!') }}{% endif %}{% endfor %}"
    ),
    "qwen2": (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
        "You are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
        "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>"
        "assistant\n' }}{% endif %}"
    ),
}


def write_chat_template(folder: Path | str, style: str, *, as_file: bool = False) -> Path:
    """Give a checkpoint a chat template and the tokenizer_config.json a transformers tokenizer loads from
    (special tokens, the fast tokenizer class). ``as_file``: the template goes to chat_template.jinja (the
    newer layout) instead of tokenizer_config.json's ``chat_template``."""
    folder = Path(folder)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
              "add_bos_token": False, "model_max_length": 1024, "clean_up_tokenization_spaces": False}
    if as_file:
        (folder / "chat_template.jinja").write_text(CHAT_TEMPLATES[style], encoding="utf-8")
    else:
        config["chat_template"] = CHAT_TEMPLATES[style]
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


def _hf_config(arch: str, *, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, head_dim, tie: bool,
               intermediate: int, max_pos: int, init_std: float, sliding_window, overrides: dict):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=intermediate, max_position_embeddings=max_pos,
        initializer_range=init_std, tie_word_embeddings=tie, bos_token_id=0, eos_token_id=1, pad_token_id=2,
        rms_norm_eps=1e-5,
    )
    if head_dim is not None:
        common["head_dim"] = head_dim
    if arch == "llama":
        kwargs = dict(common, rope_theta=10000.0)
        cls = LlamaConfig
    elif arch == "llama3":
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 128}
        kwargs = dict(common, rope_theta=500000.0, rope_scaling=scaling)
        cls = LlamaConfig
    elif arch == "mistral":
        kwargs = dict(common, rope_theta=10000.0, sliding_window=sliding_window)
        cls = MistralConfig
    elif arch == "qwen2":
        kwargs = dict(common, rope_theta=1000000.0, use_sliding_window=False)
        cls = Qwen2Config
    else:
        raise ValueError(f"unknown arch {arch!r}; choose from {ARCHITECTURES}")
    kwargs.update(overrides)  # e.g. rope_scaling={"rope_type": "linear", ...}, attention_bias=True, mlp_bias=True
    return cls(**kwargs)


def build_tiny_checkpoint(
    tmp_path: Path | str,
    arch: str = "llama",
    seed: int = 0,
    *,
    sharded: bool = False,
    tie: bool | None = None,
    head_dim: int | None = None,
    dtype: str = "float32",
    vocab: int = 320,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    max_pos: int = 1024,
    init_std: float = 0.3,
    sliding_window: int | None = None,
    name: str | None = None,
    **config_overrides,
) -> Path:
    """Write a tiny random checkpoint in Hugging Face layout under ``tmp_path/<name>`` and return the folder.

    Extra keyword arguments go to the transformers config (e.g. ``attention_bias=True``, ``mlp_bias=True``,
    ``rope_scaling={"rope_type": "linear", "factor": 2.0}``). ``tie=None`` uses the architecture's usual choice
    (tied for qwen2). ``dtype`` is both the stored tensor dtype and config.json's torch_dtype. ``sharded`` splits
    the weights over several safetensors files with a model.safetensors.index.json. The default folder name
    encodes every argument, so different checkpoints never overwrite each other. Same arguments -> same bytes.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    if tie is None:
        tie = arch == "qwen2"
    if name is None:
        args = dict(sharded=sharded, tie=tie, head_dim=head_dim, dtype=dtype, vocab=vocab, hidden=hidden, layers=layers,
                    heads=heads, kv_heads=kv_heads, intermediate=intermediate, max_pos=max_pos, init_std=init_std,
                    sliding_window=sliding_window, **config_overrides)
        digest = hashlib.sha256(repr(sorted(args.items())).encode()).hexdigest()[:8]
        name = f"{arch}-s{seed}{'-sharded' if sharded else ''}{'-tied' if tie else ''}-{digest}"
    folder = Path(tmp_path) / name
    folder.mkdir(parents=True, exist_ok=True)
    config = _hf_config(arch, vocab=vocab, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
                        head_dim=head_dim, tie=tie, intermediate=intermediate, max_pos=max_pos, init_std=init_std,
                        sliding_window=sliding_window, overrides=config_overrides)
    with torch.random.fork_rng(devices=[]):  # do not disturb the caller's global RNG
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            # transformers inits norms to 1 and biases to 0: randomize them so they are actually tested.
            if pname.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=gen))
            elif pname.endswith(".bias"):
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))
    model = model.to(getattr(torch, dtype))
    shard_size = "60KB" if sharded else "10GB"
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=shard_size)
    GenerationConfig(bos_token_id=0, eos_token_id=[1], pad_token_id=2).save_pretrained(folder)
    build_tokenizer(vocab, seed).save(str(folder / "tokenizer.json"))
    if sharded:
        assert (folder / "model.safetensors.index.json").is_file(), "expected a sharded checkpoint"
    raw = json.loads((folder / "config.json").read_text())
    raw["torch_dtype"] = dtype  # transformers 5 writes "dtype"; keep the older key too (we read both)
    raw["dtype"] = dtype
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    return folder


# ---- a tiny Llama trained until its greedy continuations are confident ------------------------------------
# Counting sequences: a step marker token (COUNT_MARKER + d, d in 1..4), then a, a+d, a+2d, ... mod
# COUNT_MODULUS (ids from COUNT_FIRST_ID). The next token depends on the marker at position 0 and on the
# previous token, so predictions go through attention over the KV cache; after the first number every token
# is determined (a trained model predicts it with a margin of several logits).
COUNT_MARKER, COUNT_MODULUS, COUNT_FIRST_ID = 300, 64, 3


def counting_sequence(rng: random.Random, length: int) -> list[int]:
    step, start = rng.randint(1, 4), rng.randrange(COUNT_MODULUS)
    return [COUNT_MARKER + step] + [COUNT_FIRST_ID + (start + i * step) % COUNT_MODULUS for i in range(length - 1)]


def build_trained_checkpoint(tmp_path: Path | str, steps: int = 250, seed: int = 0) -> Path:
    """A tiny Llama (vocab 320, hidden 64, 2 layers, GQA 4/2) trained with torch on counting sequences for
    ``steps`` steps (batch 32 x 48 tokens; ~10 s on one CPU thread), saved in Hugging Face layout. Same
    arguments -> same bytes (a fixed seed, one thread). Its greedy continuations of ``counting_sequence``
    prompts are right, unlike a random model's, whose near-ties make any perturbation flip tokens."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    folder = Path(tmp_path) / f"trained-counting-s{seed}-{steps}"
    if (folder / "config.json").is_file():
        return folder
    config = LlamaConfig(
        vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=256, initializer_range=0.02, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=1, pad_token_id=2, rms_norm_eps=1e-5, rope_theta=10000.0,
    )
    rng = random.Random(seed)
    with torch.random.fork_rng(devices=[]), single_thread():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
        model.train()
        for _ in range(steps):
            batch = torch.tensor([counting_sequence(rng, 48) for _ in range(32)])
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
    hf_logging.disable_progress_bar()
    model.eval().save_pretrained(folder, safe_serialization=True)
    GenerationConfig(bos_token_id=0, eos_token_id=[1], pad_token_id=2).save_pretrained(folder)
    build_tokenizer(320, seed).save(str(folder / "tokenizer.json"))
    return folder


def _hf_model(path: str):
    folder = Path(path)
    # Keyed on the config's mtime too, so a checkpoint rebuilt at the same path is reloaded.
    return _hf_model_cached(str(folder.resolve()), (folder / "config.json").stat().st_mtime_ns)


@lru_cache(maxsize=8)
def _hf_model_cached(path: str, config_mtime_ns: int):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


def hf_greedy(path: Path | str, prompt_ids: Sequence[int], max_new_tokens: int, *, stop_at_eos: bool = False) -> list[int]:
    """transformers' greedy ``generate`` (fp32, CPU): the new token ids only. By default EOS does not stop it,
    so exactly ``max_new_tokens`` come back."""
    model = _hf_model(str(path))
    gen = model.generation_config
    eos = gen.eos_token_id if stop_at_eos else None
    with torch.no_grad():
        out = model.generate(
            torch.tensor([list(prompt_ids)], dtype=torch.long),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=gen.pad_token_id if gen.pad_token_id is not None else 0,
        )
    return out[0, len(prompt_ids):].tolist()


def hf_last_logits(path: Path | str, token_ids: Sequence[int]) -> torch.Tensor:
    """transformers' fp32 logits of the last position of ``token_ids`` (no cache): [vocab]."""
    model = _hf_model(str(path))
    with torch.no_grad():
        return model(torch.tensor([list(token_ids)], dtype=torch.long)).logits[0, -1].float()


def engine_greedy(
    loaded,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    block_size: int = 4,
    chunk_size: int | None = None,
    kv_cache=None,
) -> list[list[int]]:
    """Greedy decoding straight through ``CausalLM.forward`` (no engine): every prompt is prefilled (whole, or
    in ``chunk_size`` chunks), then all sequences decode together in one batch per step. Blocks are assigned
    contiguously, sequence after sequence; returns the new token ids per prompt."""
    outs, _ = _paged_decode(loaded, prompts, max_new_tokens, lambda _, logits: logits.argmax(-1).tolist(),
                            block_size=block_size, chunk_size=chunk_size, kv_cache=kv_cache)
    return outs


def teacher_forced_logits(
    loaded,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    *,
    block_size: int = 4,
    kv_cache_dtype: str = "auto",
) -> list[torch.Tensor]:
    """Our model's fp32 logits before each continuation token (``[len(continuation), vocab]`` per prompt):
    as ``engine_greedy``, but the continuation is fed instead of the argmax, so two KV caches (say fp8 and
    float32) are compared along the same trajectory. The continuations must have equal lengths."""
    from workers.model import KVCache

    n = len(continuations[0])
    assert all(len(c) == n for c in continuations)
    max_len = max(len(p) for p in prompts) + n
    num_blocks = -(-max_len // block_size) * len(prompts)
    kv_cache = KVCache(loaded.config, num_blocks, block_size, loaded.dtype, loaded.device, kv_cache_dtype)
    _, logits = _paged_decode(loaded, prompts, n, lambda step, _: [c[step] for c in continuations],
                              block_size=block_size, kv_cache=kv_cache)
    return [torch.stack([step[i] for step in logits]) for i in range(len(prompts))]


def _paged_decode(loaded, prompts, max_new_tokens, choose, *, block_size, chunk_size=None, kv_cache=None):
    """Prefill each prompt, then decode all together; ``choose(step, logits [num_seqs, vocab])`` gives the next
    token ids. Returns (the chosen ids per prompt, the logits of every step)."""
    from workers.model import ForwardBatch, KVCache

    config = loaded.config
    max_len = max(len(p) for p in prompts) + max_new_tokens
    blocks_per_seq = -(-max_len // block_size)
    if kv_cache is None:
        kv_cache = KVCache(config, blocks_per_seq * len(prompts), block_size, loaded.dtype, loaded.device)
    tables = torch.arange(blocks_per_seq * len(prompts), dtype=torch.long).view(len(prompts), blocks_per_seq)

    def slots(seq: int, positions: list[int]) -> list[int]:
        return [int(tables[seq, p // block_size]) * block_size + p % block_size for p in positions]

    seqs = [list(p) for p in prompts]
    last_logits: list[torch.Tensor] = []
    for i, prompt in enumerate(prompts):  # prefill, one sequence per forward
        step = chunk_size or len(prompt)
        for start in range(0, len(prompt), step):
            pos = list(range(start, min(start + step, len(prompt))))
            batch = ForwardBatch(
                input_ids=torch.tensor([prompt[p] for p in pos]), positions=torch.tensor(pos),
                slot_mapping=torch.tensor(slots(i, pos)), query_lens=[len(pos)], context_lens=[pos[-1] + 1],
                block_tables=tables[i : i + 1],
            )
            logits = loaded.model(batch, kv_cache)
        last_logits.append(logits[0])
    outs: list[list[int]] = [[] for _ in prompts]
    logits = torch.stack(last_logits)
    all_logits = []
    for step in range(max_new_tokens):
        all_logits.append(logits)
        next_ids = choose(step, logits)
        for i, t in enumerate(next_ids):
            outs[i].append(t)
            seqs[i].append(t)
        if len(outs[0]) == max_new_tokens:
            break
        pos = [len(s) - 1 for s in seqs]
        batch = ForwardBatch(
            input_ids=torch.tensor(next_ids), positions=torch.tensor(pos),
            slot_mapping=torch.tensor([slots(i, [p])[0] for i, p in enumerate(pos)]),
            query_lens=[1] * len(seqs), context_lens=[p + 1 for p in pos], block_tables=tables,
        )
        logits = loaded.model(batch, kv_cache)
    return outs, all_logits
