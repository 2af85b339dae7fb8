"""`prefixcache generate`: offline batch generation on one engine (JSONL in, JSONL out; no Ray, no Redis).

Every input line is a JSON object with exactly one of ``token_ids`` / ``text``, plus optional ``max_tokens``
(default 16), ``temperature`` (default 0: greedy), ``top_p``, ``top_k``, ``seed``, ``stop`` (a string or a
list), ``ignore_eos``. All requests are submitted together, so continuous batching and prefix caching apply
across lines. The output has one line per non-blank input line, in input order: the result, or
``{"error": "... (line N)"}`` for a line that cannot be served; the other lines are still served.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from cache_service.records import InvalidRequestError, SamplingParams

_FIELDS: dict[str, tuple[type, ...]] = {
    "token_ids": (list,),
    "text": (str,),
    "max_tokens": (int,),
    "temperature": (int, float),
    "top_p": (int, float),
    "top_k": (int,),
    "seed": (int,),
    "stop": (str, list),
    "ignore_eos": (bool,),
}
_TYPE_NAMES = {list: "a list", str: "a string", int: "an integer", float: "a number", bool: "a boolean"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="demo", help="Hugging Face checkpoint folder, or 'demo' (default)")
    parser.add_argument("--input", required=True, help="JSONL file of requests ('-' for stdin)")
    parser.add_argument("--output", required=True, help="JSONL file to write ('-' for stdout)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="default: the checkpoint's dtype (float32 for demo)")
    parser.add_argument("--num-blocks", type=int, default=None, help="KV cache blocks (default: 256 MiB worth)")
    parser.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
                        help="KV cache storage: 'auto' = the model's dtype, 'fp8' = float8 e4m3 with per-token "
                             "scales (~4x the blocks of float32 in the same memory)")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="sequences per step (default 64)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens per step (default 2048)")
    add_tier_arguments(parser)


def add_tier_arguments(parser: argparse.ArgumentParser) -> None:
    """The tiers under the device pool (``generate`` and ``serve`` alike)."""
    parser.add_argument("--host-cache-gb", type=float, default=0.0, metavar="G",
                        help="host memory under the device pool: evicted KV blocks move there, hits load back "
                             "(default 0: none)")
    parser.add_argument("--disk-cache", default=None, metavar="DIR",
                        help="a local folder under the host tier: blocks evicted from it are kept as checksummed "
                             "files, found again after a restart (default: none)")
    parser.add_argument("--disk-cache-gb", type=float, default=16.0, metavar="G",
                        help="the most the disk cache keeps, least recently used files deleted first (default 16)")


def check_tier_arguments(args: argparse.Namespace) -> None:
    """ValueError naming the flag for a negative size."""
    if args.host_cache_gb < 0:
        raise ValueError(f"--host-cache-gb must be >= 0, got {args.host_cache_gb}")
    if args.disk_cache_gb <= 0:
        raise ValueError(f"--disk-cache-gb must be > 0, got {args.disk_cache_gb}")


class LineError(ValueError):
    pass


def parse_line(raw: str, tokenizer) -> tuple[list[int], SamplingParams]:
    """One JSONL request -> (prompt ids, params); raises LineError / InvalidRequestError with the reason."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise LineError(f"malformed JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(obj, dict):
        raise LineError(f"expected a JSON object, got {type(obj).__name__}")
    for key, value in obj.items():
        if key not in _FIELDS:
            raise LineError(f"unknown field {key!r} (known: {', '.join(_FIELDS)})")
        types = _FIELDS[key]
        if value is None and key == "seed":
            continue
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            want = " or ".join(_TYPE_NAMES[t] for t in types)
            raise LineError(f"field {key!r} must be {want}, got {json.dumps(value)}")
    if ("text" in obj) == ("token_ids" in obj):
        raise LineError("give exactly one of 'text' or 'token_ids'")
    if "text" in obj:
        if not obj["text"]:
            raise InvalidRequestError("prompt is empty: 'text' is an empty string")
        prompt = tokenizer.encode(obj["text"], add_special_tokens=True)
    else:
        prompt = obj["token_ids"]
        bad = next((t for t in prompt if isinstance(t, bool) or not isinstance(t, int)), None)
        if bad is not None:
            raise LineError(f"token_ids must be a list of integers, found {json.dumps(bad)}")
    stop = obj.get("stop", ())
    if isinstance(stop, str):
        stop = (stop,)
    elif not all(isinstance(s, str) for s in stop):
        raise LineError("field 'stop' must be a string or a list of strings")
    params = SamplingParams(
        max_tokens=obj.get("max_tokens", 16),
        temperature=float(obj.get("temperature", 0.0)),
        top_p=float(obj.get("top_p", 1.0)),
        top_k=obj.get("top_k", 0),
        seed=obj.get("seed"),
        stop=tuple(stop),
        ignore_eos=obj.get("ignore_eos", False),
    )
    return list(prompt), params


def _read_lines(path: str) -> list[str]:
    if path == "-":
        return sys.stdin.read().splitlines()
    return Path(path).read_text(encoding="utf-8").splitlines()


def run(args: argparse.Namespace) -> int:
    from workers.engine import Engine, EngineConfig  # torch is imported only when the command runs
    from workers.model import ModelLoadError

    try:
        lines = _read_lines(args.input)
    except (OSError, UnicodeDecodeError) as exc:
        print(f"prefixcache generate: cannot read --input {args.input}: {exc}", file=sys.stderr)
        return 2
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    config = EngineConfig(model=args.model, dtype=args.dtype, device=device, block_size=args.block_size,
                          num_blocks=args.num_blocks, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_dtype=args.kv_cache_dtype,
                          host_cache_gb=args.host_cache_gb, disk_cache_dir=args.disk_cache,
                          disk_cache_gb=args.disk_cache_gb)
    try:
        check_tier_arguments(args)
        engine = Engine(config)
    except ModelLoadError as exc:
        print(f"prefixcache generate: cannot load model {args.model!r}: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:  # bad engine settings (block size, blocks, a disk cache folder...)
        print(f"prefixcache generate: {exc}", file=sys.stderr)
        return 2

    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    prompts: list[list[int]] = []
    params: list[SamplingParams] = []
    slots: list[tuple[int, int]] = []  # (index in results, line number) of each submitted request
    for line_no, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            prompt, p = parse_line(raw, engine.tokenizer)
            engine.validate(prompt, p)
        except (LineError, InvalidRequestError) as exc:
            results.append({"error": f"{exc} (line {line_no})"})
            continue
        slots.append((len(results), line_no))
        results.append({})
        prompts.append(prompt)
        params.append(p)

    outputs = engine.generate(prompts, params) if prompts else []
    num_errors = sum(1 for r in results if "error" in r)
    for (index, line_no), out in zip(slots, outputs):
        if out.error is not None:
            results[index] = {"error": f"{out.error} (line {line_no})"}
            num_errors += 1
        else:
            results[index] = {
                "token_ids": out.new_token_ids,
                "text": out.new_text,
                "prompt_tokens": out.prompt_tokens,
                "completion_tokens": out.completion_tokens,
                "cached_tokens": out.cached_tokens,
                "finish_reason": out.finish_reason,
            }
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    try:
        if args.output == "-":
            sys.stdout.write(text)
        else:
            Path(args.output).write_text(text, encoding="utf-8")
    except OSError as exc:
        print(f"prefixcache generate: cannot write --output {args.output}: {exc}", file=sys.stderr)
        return 2
    stats = engine.load()
    elapsed = time.perf_counter() - started
    num_out = sum(o.completion_tokens for o in outputs)
    print(
        f"prefixcache generate: {len(results) - num_errors}/{len(results)} requests served, {num_errors} errors; "
        f"{num_out} tokens in {elapsed:.2f}s; prefix cache hit {stats.prefix_hit_tokens}/{stats.prefix_query_tokens} "
        f"prompt tokens; model {engine.model_id} on {device}, KV cache {engine.kv_cache.dtype_name} "
        f"({engine.num_blocks} blocks)",
        file=sys.stderr,
    )
    return 0
