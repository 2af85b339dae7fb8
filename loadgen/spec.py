"""A standard workload (workloads.py) scaled for a live stack and turned into the driver's BenchRequests.

Scaling: ``scale`` multiplies every token length (system prompt, question, suffix, answer, and the Mooncake
block size: scale 1/32 makes each 512-token Mooncake block 16 tokens, i.e. exactly one prefixcache block, so
the trace's sharing structure survives at block granularity); ``num_requests`` sets the request count (through
the number of groups/sessions where the generator counts those); ``time_scale`` multiplies arrival offsets
(0.1 replays a trace ten times faster). Token ids are drawn from ``[first_token_id, vocab_size)``: the demo
model's byte tokenizer takes 0..255.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from loadgen import workloads as wl
from loadgen.driver import BenchRequest
from loadgen.workloads import default_workloads_dir

SYNTHETIC = ("sgl-shared-prefix", "prefix-repetition", "multi-turn")
MOONCAKE = {"mooncake-conversation": "conversation_trace.jsonl", "mooncake-synthetic": "synthetic_trace.jsonl"}
WORKLOAD_NAMES = (*SYNTHETIC, *MOONCAKE)

# Generator arguments that are token lengths (multiplied by scale).
_LENGTH_PARAMS = ("system_prompt_len", "question_len", "output_len", "prefix_len", "suffix_len",
                  "user_len", "answer_len")


@dataclass(slots=True)
class WorkloadSpec:
    name: str
    num_requests: int | None = None
    scale: float = 1.0
    time_scale: float = 1.0
    vocab_size: int = 256
    first_token_id: int = 0
    seed: int = 0
    num_tenants: int = 1
    max_prompt_tokens: int | None = None
    max_tokens: int | None = None
    trace_path: str | None = None
    params: dict | None = None  # overrides of the generator's keyword arguments


def _scaled(value: int, scale: float) -> int:
    return max(1, round(value * scale))


def _generator_kwargs(spec: WorkloadSpec) -> dict:
    """Effective keyword arguments of the synthetic generator: defaults, scaled, count set, overrides applied."""
    import inspect

    gen = wl.WORKLOADS[spec.name]
    defaults = {k: p.default for k, p in inspect.signature(gen).parameters.items()
                if p.default is not inspect.Parameter.empty}
    kwargs: dict = {}
    for key in _LENGTH_PARAMS:
        if key in defaults:
            kwargs[key] = _scaled(defaults[key], spec.scale)
    overrides = dict(spec.params or {})
    for key in overrides:
        if key not in defaults:
            raise ValueError(f"workload {spec.name} has no parameter {key!r}; it takes {', '.join(defaults)}")
    per = defaults | overrides  # the request count is split with the effective group/session sizes
    n = spec.num_requests
    if n is not None:
        if spec.name == "sgl-shared-prefix":
            kwargs["num_groups"] = max(1, math.ceil(n / per["prompts_per_group"]))
        elif spec.name == "prefix-repetition":
            # The generator makes num_prompts // num_prefixes per prefix: round up, then cut to n (shuffled).
            kwargs["num_prompts"] = math.ceil(n / per["num_prefixes"]) * per["num_prefixes"]
        elif spec.name == "multi-turn":
            kwargs["num_sessions"] = max(1, math.ceil(n / per["num_turns"]))
    kwargs.update(vocab_size=spec.vocab_size, first_token_id=spec.first_token_id, seed=spec.seed)
    kwargs.update(overrides)
    return kwargs


def _tenant(spec: WorkloadSpec, key: int) -> str:
    return "" if spec.num_tenants <= 1 else f"tenant-{key % spec.num_tenants}"


def _clip(tokens: list[int], spec: WorkloadSpec) -> list[int]:
    # Cutting the tail keeps the shared prefix (and its block hashes) intact.
    return tokens if spec.max_prompt_tokens is None else tokens[: spec.max_prompt_tokens]


def _max_tokens(n: int, spec: WorkloadSpec) -> int:
    n = max(1, n)
    return n if spec.max_tokens is None else min(n, spec.max_tokens)


def build_requests(spec: WorkloadSpec) -> tuple[list[BenchRequest], dict]:
    """The workload's requests and the effective parameters (for the results file)."""
    if spec.scale <= 0 or spec.time_scale <= 0:
        raise ValueError("scale and time_scale must be > 0")
    if spec.name in MOONCAKE:
        return _mooncake(spec)
    if spec.name not in SYNTHETIC:
        raise ValueError(f"unknown workload {spec.name!r}; choose one of {', '.join(WORKLOAD_NAMES)}")
    kwargs = _generator_kwargs(spec)
    reqs = wl.make_workload(spec.name, **kwargs)
    if spec.num_requests is not None and spec.name != "multi-turn":
        reqs = reqs[: spec.num_requests]
    open_loop = any(r.arrival_s > 0 for r in reqs)
    out: list[BenchRequest] = []
    prev_turn: dict[str, tuple[str, int, int]] = {}  # session -> (request id, prompt length, answer length)
    for r in reqs:
        prompt = r.prompt_token_ids
        assert prompt is not None
        follows = None
        if r.session_id is not None and r.session_id in prev_turn:
            # Turn k = turn k-1 prompt + the answer the stack really generated + the new user message: send only
            # the new message and let the runner splice in the real answer.
            follows, prev_len, answer_len = prev_turn[r.session_id]
            prompt = prompt[prev_len + answer_len:]
        group = r.group if r.group is not None else 0
        out.append(BenchRequest(
            request_id=r.request_id, token_ids=prompt if follows else _clip(prompt, spec),
            max_tokens=_max_tokens(r.output_len, spec),
            arrival_s=r.arrival_s * spec.time_scale if open_loop else None, follows=follows,
            session_id=r.session_id or "", cache_salt=_tenant(spec, group), group=str(group)))
        if r.session_id is not None:
            prev_turn[r.session_id] = (r.request_id, len(r.prompt_token_ids), r.output_len)
    return out, dict(kwargs)


def _mooncake(spec: WorkloadSpec) -> tuple[list[BenchRequest], dict]:
    path = Path(spec.trace_path) if spec.trace_path else default_workloads_dir() / "mooncake" / MOONCAKE[spec.name]
    if not path.is_file():
        raise ValueError(f"Mooncake trace not found at {path} (pass --trace PATH or set PREFIXCACHE_WORKLOADS_DIR)")
    records = wl.load_mooncake(path, limit=spec.num_requests)
    block = _scaled(wl.MOONCAKE_BLOCK_SIZE, spec.scale)
    t_first = records[0].timestamp_ms if records else 0
    out = []
    for i, rec in enumerate(records):
        # Scale the length with the block size, staying within what the ids describe.
        n_ids = len(rec.hash_ids)
        length = min(n_ids * block, max((n_ids - 1) * block + 1, round(rec.input_length * spec.scale)))
        tokens = wl.expand_mooncake_tokens(rec.hash_ids, length, block, vocab_size=spec.vocab_size,
                                           first_token_id=spec.first_token_id, seed=spec.seed)
        out.append(BenchRequest(
            request_id=f"{spec.name}-{i}", token_ids=_clip(tokens, spec),
            max_tokens=_max_tokens(_scaled(rec.output_length, spec.scale), spec),
            arrival_s=(rec.timestamp_ms - t_first) / 1000.0 * spec.time_scale,
            cache_salt=_tenant(spec, i), group=str(rec.hash_ids[0])))
    params = {"trace": str(path), "num_records": len(records), "tokens_per_hash_id": block,
              "time_scale": spec.time_scale, "vocab_size": spec.vocab_size, "seed": spec.seed}
    return out, params
