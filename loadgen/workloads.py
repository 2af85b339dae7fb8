"""The standard prefix-sharing workloads as request generators (token ids), and the Mooncake traces.

Used by `prefixcache bench` (spec.py scales them for a live stack), by the
simulator and by the benchmarks. Every generator is deterministic for a given seed. Token ids are
drawn from ``[first_token_id, vocab_size)`` so that a small vocabulary (the
demo model's) and reserved ids (BOS/EOS) can be honoured.

Synthetic workloads (definitions in /work/shared/workloads/README.md):

    sgl_shared_prefix     SGLang generated-shared-prefix: G groups x P questions, system + question, shuffled
    prefix_repetition     vLLM prefix_repetition: N prefixes, each followed by random suffixes, shuffled
    llmd_shared_prefix    llm-d shared prefix guide: groups x prompts, Poisson arrivals ramping 3 -> 60 req/s
    multi_turn            chat sessions: turn k = turn k-1 prompt + answer + new user message

Mooncake traces carry no tokens: each hash id names one 512-token block with
its whole prefix. ``expand_mooncake_tokens`` turns ids into deterministic
tokens (equal ids -> equal tokens) for driving a real engine; the simulator
uses the ids directly (``WorkloadRequest.block_ids``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Sequence

import numpy as np

MOONCAKE_BLOCK_SIZE = 512
DEFAULT_VOCAB_SIZE = 32000


def default_workloads_dir() -> Path:
    """$PREFIXCACHE_WORKLOADS_DIR, else ../shared/workloads beside the repository (the Mooncake traces)."""
    env = os.environ.get("PREFIXCACHE_WORKLOADS_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "workloads"


class WorkloadError(ValueError):
    """A malformed trace line or impossible workload parameters."""


@dataclass(slots=True)
class WorkloadRequest:
    request_id: str
    arrival_s: float
    prompt_token_ids: list[int] | None  # None for trace requests described by block ids only
    output_len: int
    session_id: str | None = None
    group: int | None = None  # shared-prefix group (or Mooncake: None)
    block_ids: tuple[int, ...] | None = None  # Mooncake hash ids, one per (last possibly partial) block
    num_prompt_tokens: int = 0
    block_size: int = MOONCAKE_BLOCK_SIZE  # the size block_ids refer to

    def __post_init__(self) -> None:
        if self.prompt_token_ids is not None:
            self.num_prompt_tokens = len(self.prompt_token_ids)
        elif self.block_ids is None:
            raise WorkloadError(f"{self.request_id}: needs prompt_token_ids or block_ids")

    def token_ids(self, vocab_size: int = DEFAULT_VOCAB_SIZE, first_token_id: int = 0) -> list[int]:
        """The prompt's tokens, expanding block ids when the request has no tokens."""
        if self.prompt_token_ids is not None:
            return self.prompt_token_ids
        assert self.block_ids is not None
        return expand_mooncake_tokens(
            self.block_ids, self.num_prompt_tokens, self.block_size,
            vocab_size=vocab_size, first_token_id=first_token_id,
        )


# ---- random tokens -----------------------------------------------------------


def _check_vocab(vocab_size: int, first_token_id: int) -> None:
    if first_token_id < 0 or vocab_size <= first_token_id:
        raise WorkloadError(f"need 0 <= first_token_id < vocab_size, got {first_token_id} and {vocab_size}")


def _random_tokens(rng: np.random.Generator, n: int, vocab_size: int, first_token_id: int) -> list[int]:
    return rng.integers(first_token_id, vocab_size, size=n).tolist()


def _splitmix64(x: np.ndarray) -> np.ndarray:
    # Counter-based and vectorised: the tokens of an id never depend on other ids or on call order.
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def expand_mooncake_tokens(
    hash_ids: Sequence[int],
    input_length: int,
    block_size: int = MOONCAKE_BLOCK_SIZE,
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    first_token_id: int = 0,
    seed: int = 0,
) -> list[int]:
    """``block_size`` deterministic tokens per hash id (seeded by the id), cut to ``input_length``.

    Equal ids give equal tokens, so two prompts that share their first k ids
    share their first k*block_size tokens, and hence their first k block hashes.
    """
    _check_vocab(vocab_size, first_token_id)
    if block_size <= 0:
        raise WorkloadError(f"block_size must be positive, got {block_size}")
    if len(hash_ids) != math.ceil(input_length / block_size):
        raise WorkloadError(
            f"{len(hash_ids)} hash ids cannot describe {input_length} tokens in blocks of {block_size}"
        )
    ids = np.asarray(hash_ids, dtype=np.uint64)
    pos = np.arange(block_size, dtype=np.uint64)
    # One counter per (seed, id, position); ids are < 2^40 in practice, positions < 2^20.
    counters = (np.uint64(seed) << np.uint64(60)) ^ (ids[:, None] << np.uint64(20)) ^ pos[None, :]
    span = np.uint64(vocab_size - first_token_id)
    tokens = (_splitmix64(counters.reshape(-1)) % span + np.uint64(first_token_id))[:input_length]
    return tokens.astype(np.int64).tolist()


# ---- Mooncake traces -------------------------------------------------------------


class MooncakeRecord(NamedTuple):
    timestamp_ms: int
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def parse_mooncake_line(line: str, where: str = "line") -> MooncakeRecord:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise WorkloadError(f"{where}: not JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise WorkloadError(f"{where}: expected a JSON object")
    for key in ("timestamp", "input_length", "output_length", "hash_ids"):
        if key not in obj:
            raise WorkloadError(f"{where}: missing {key!r}")
    ts, n_in, n_out, ids = obj["timestamp"], obj["input_length"], obj["output_length"], obj["hash_ids"]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (ts, n_in, n_out)):
        raise WorkloadError(f"{where}: timestamp, input_length and output_length must be integers")
    if ts < 0 or n_in <= 0 or n_out < 0:
        raise WorkloadError(f"{where}: need timestamp >= 0, input_length > 0, output_length >= 0")
    if not isinstance(ids, list) or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in ids):
        raise WorkloadError(f"{where}: hash_ids must be a list of non-negative integers")
    if len(ids) != math.ceil(n_in / MOONCAKE_BLOCK_SIZE):
        raise WorkloadError(
            f"{where}: {len(ids)} hash_ids for input_length {n_in} (expected {math.ceil(n_in / MOONCAKE_BLOCK_SIZE)})"
        )
    return MooncakeRecord(ts, n_in, n_out, tuple(ids))


def load_mooncake(path: str | os.PathLike, limit: int | None = None) -> list[MooncakeRecord]:
    """The first ``limit`` records (all when None) of a Mooncake JSONL trace, in file order."""
    if limit is not None and limit < 0:
        raise WorkloadError(f"limit must be >= 0, got {limit}")
    records: list[MooncakeRecord] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(records) >= limit:
                break
            if not line.strip():
                continue
            records.append(parse_mooncake_line(line, f"{os.fspath(path)}:{lineno}"))
    for prev, cur in zip(records, records[1:]):
        if cur.timestamp_ms < prev.timestamp_ms:
            raise WorkloadError(
                f"{os.fspath(path)}: timestamps go backwards ({prev.timestamp_ms} -> {cur.timestamp_ms})"
            )
    return records


def mooncake_requests(
    records: Iterable[MooncakeRecord], *, time_scale: float = 1.0, prefix: str = "mc"
) -> list[WorkloadRequest]:
    """Trace records as requests (block ids, no tokens); ``time_scale`` < 1 compresses arrivals."""
    if not time_scale > 0:
        raise WorkloadError(f"time_scale must be > 0, got {time_scale}")
    return [
        WorkloadRequest(
            request_id=f"{prefix}-{i}",
            arrival_s=r.timestamp_ms / 1000.0 * time_scale,
            prompt_token_ids=None,
            output_len=r.output_length,
            block_ids=r.hash_ids,
            num_prompt_tokens=r.input_length,
        )
        for i, r in enumerate(records)
    ]


# ---- arrivals ------------------------------------------------------------------------


def _arrivals(rng: np.random.Generator, n: int, request_rate: float) -> list[float]:
    """All at 0 for an infinite rate (the benchmarks' default), else Poisson at ``request_rate``."""
    if request_rate == math.inf:
        return [0.0] * n
    if not request_rate > 0:
        raise WorkloadError(f"request_rate must be > 0, got {request_rate}")
    return np.cumsum(rng.exponential(1.0 / request_rate, size=n)).tolist()


def _ramping_arrivals(rng: np.random.Generator, n: int, rate_start: float, rate_end: float) -> list[float]:
    """Poisson arrivals whose rate ramps linearly from rate_start to rate_end over the n requests."""
    if not (rate_start > 0 and rate_end > 0):
        raise WorkloadError("rates must be > 0")
    rates = np.linspace(rate_start, rate_end, n) if n > 1 else np.array([rate_start])
    return np.cumsum(rng.exponential(1.0, size=n) / rates).tolist()


# ---- synthetic workloads -----------------------------------------------------------------



def _shuffled(rng: np.random.Generator, reqs: list[tuple[int, int, list[int]]], tag: str, output_len: int,
              request_rate: float) -> list[WorkloadRequest]:
    """(group, index, prompt) triples in a random order, with arrivals at request_rate."""
    order = rng.permutation(len(reqs))
    arrivals = _arrivals(rng, len(reqs), request_rate)
    return [
        WorkloadRequest(f"{tag}-{reqs[j][0]}-{reqs[j][1]}", arrivals[i], reqs[j][2], output_len, group=reqs[j][0])
        for i, j in enumerate(order)
    ]


def sgl_shared_prefix(
    num_groups: int = 64,
    prompts_per_group: int = 16,
    system_prompt_len: int = 2048,
    question_len: int = 128,
    output_len: int = 256,
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    first_token_id: int = 0,
    request_rate: float = math.inf,
    seed: int = 0,
) -> list[WorkloadRequest]:
    """SGLang generated-shared-prefix: each group's system prompt + its own question, all shuffled."""
    _check_vocab(vocab_size, first_token_id)
    rng = np.random.default_rng(seed)
    reqs = []
    for g in range(num_groups):
        system = _random_tokens(rng, system_prompt_len, vocab_size, first_token_id)
        for p in range(prompts_per_group):
            question = _random_tokens(rng, question_len, vocab_size, first_token_id)
            reqs.append((g, p, system + question))
    return _shuffled(rng, reqs, "sgl", output_len, request_rate)


def prefix_repetition(
    num_prompts: int = 1000,
    prefix_len: int = 256,
    suffix_len: int = 256,
    num_prefixes: int = 10,
    output_len: int = 128,
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    first_token_id: int = 0,
    request_rate: float = math.inf,
    seed: int = 0,
) -> list[WorkloadRequest]:
    """vLLM prefix_repetition: num_prompts // num_prefixes prompts per prefix, random suffixes, shuffled."""
    _check_vocab(vocab_size, first_token_id)
    if num_prefixes <= 0 or num_prompts < num_prefixes:
        raise WorkloadError("need num_prefixes > 0 and num_prompts >= num_prefixes")
    rng = np.random.default_rng(seed)
    reqs = []
    for g in range(num_prefixes):
        prefix = _random_tokens(rng, prefix_len, vocab_size, first_token_id)
        for p in range(num_prompts // num_prefixes):
            reqs.append((g, p, prefix + _random_tokens(rng, suffix_len, vocab_size, first_token_id)))
    return _shuffled(rng, reqs, "rep", output_len, request_rate)


def llmd_shared_prefix(
    num_groups: int = 150,
    prompts_per_group: int = 5,
    system_prompt_len: int = 6000,
    question_len: int = 1200,
    output_len: int = 1000,
    *,
    rate_start: float = 3.0,
    rate_end: float = 60.0,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    first_token_id: int = 0,
    seed: int = 0,
) -> list[WorkloadRequest]:
    """llm-d's shared-prefix guide: shuffled group prompts, Poisson arrivals ramping rate_start -> rate_end."""
    reqs = sgl_shared_prefix(
        num_groups, prompts_per_group, system_prompt_len, question_len, output_len,
        vocab_size=vocab_size, first_token_id=first_token_id, seed=seed,
    )
    arrivals = _ramping_arrivals(np.random.default_rng(seed + 1), len(reqs), rate_start, rate_end)
    for r, t in zip(reqs, arrivals):
        r.request_id = "llmd" + r.request_id[3:]
        r.arrival_s = t
    return reqs


def multi_turn(
    num_sessions: int = 32,
    num_turns: int = 6,
    system_prompt_len: int = 512,
    user_len: int = 128,
    answer_len: int = 256,
    *,
    session_rate: float = 2.0,
    turn_interval_s: float = 10.0,
    shared_system_prompt: bool = True,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    first_token_id: int = 0,
    seed: int = 0,
) -> list[WorkloadRequest]:
    """Chat sessions: turn k's prompt = turn k-1's prompt + its answer + a new user message.

    Sessions start as a Poisson process (``session_rate``/s) and send a turn
    every ``turn_interval_s`` (open loop). The answers are pre-drawn tokens
    standing in for the model's replies; ``output_len`` = ``answer_len``.
    Requests are returned in arrival order.
    """
    _check_vocab(vocab_size, first_token_id)
    rng = np.random.default_rng(seed)
    shared = _random_tokens(rng, system_prompt_len, vocab_size, first_token_id)
    starts = _arrivals(rng, num_sessions, session_rate)
    reqs = []
    for s in range(num_sessions):
        if shared_system_prompt:
            history = list(shared)
        else:
            history = _random_tokens(rng, system_prompt_len, vocab_size, first_token_id)
        for k in range(num_turns):
            history += _random_tokens(rng, user_len, vocab_size, first_token_id)
            reqs.append(
                WorkloadRequest(
                    f"chat-{s}-{k}", starts[s] + k * turn_interval_s, list(history), answer_len,
                    session_id=f"session-{s}", group=s,
                )
            )
            history += _random_tokens(rng, answer_len, vocab_size, first_token_id)
    reqs.sort(key=lambda r: (r.arrival_s, r.request_id))
    return reqs


WORKLOADS: dict[str, Callable[..., list[WorkloadRequest]]] = {
    "sgl-shared-prefix": sgl_shared_prefix,
    "prefix-repetition": prefix_repetition,
    "llmd-shared-prefix": llmd_shared_prefix,
    "multi-turn": multi_turn,
}


def make_workload(name: str, **kwargs) -> list[WorkloadRequest]:
    """A synthetic workload by name (``WORKLOADS``) with its generator's keyword arguments."""
    try:
        gen = WORKLOADS[name]
    except KeyError:
        raise WorkloadError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}") from None
    return gen(**kwargs)
