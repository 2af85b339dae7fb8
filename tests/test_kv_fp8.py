"""The fp8 KV cache end to end: engine outputs, the cascade kernel, a real transfer between two fp8 nodes,
refusal across KV dtypes, fp8 accuracy on a trained model, and the --kv-cache-dtype flags."""

from __future__ import annotations

import argparse
import json
import random

import pytest
import torch
from cache_fixtures import (  # noqa: F401  (pytest fixtures)
    PARAMS,
    cache_service,
    cold_output,
    demo_model,
    make_node,
    prompt_of,
)
from valkey_fixtures import valkey_module  # noqa: F401  (pytest fixtures)

from cache_service.block_wire import read_header
from cache_service.prefix_fetcher import FetchOutcome
from cache_service.records import SamplingParams
from model_fixtures import (
    build_trained_checkpoint,
    counting_sequence,
    single_thread,
    teacher_forced_logits,
)
from workers.engine import Engine, EngineConfig
from workers.model import KVCache, load_model


@pytest.fixture(autouse=True)
def one_thread():
    with single_thread():
        yield


def fp8_engine(loaded, **kw) -> Engine:
    return Engine(EngineConfig(**{"model": "demo", "num_blocks": 64, "kv_cache_dtype": "fp8", **kw}), loaded=loaded)


# ---- one engine ---------------------------------------------------------------------------------------------
def test_fp8_engine_sizes_its_pool_by_bytes(demo_model):
    auto = Engine(EngineConfig(model="demo"), loaded=demo_model)
    fp8 = Engine(EngineConfig(model="demo", kv_cache_dtype="fp8"), loaded=demo_model)
    # 256 MiB; demo: 4 layers x 2 x 16 slots x 2 kv heads x 64 dims: 65536 B (float32) vs 16384 + 1024 B of scales.
    assert (auto.num_blocks, auto.block_nbytes) == (4096, 65536)
    assert (fp8.num_blocks, fp8.block_nbytes) == (15420, 17408)
    assert fp8.kv_cache.dtype == torch.float8_e4m3fn and fp8.kv_cache.compute_dtype == torch.float32
    with pytest.raises(ValueError, match="unsupported kv_cache_dtype 'int4'; use one of auto, fp8"):
        Engine(EngineConfig(model="demo", kv_cache_dtype="int4"), loaded=demo_model)


def test_fp8_output_is_the_same_cold_cached_and_chunked(demo_model):
    """With fp8, attention always reads what the cache holds (a first prefill chunk too), so where a prompt's
    K/V came from never changes its output: cold, a local hit, or prefilled in small chunks while another
    sequence decodes in the same steps (mixed prefill + decode batches)."""
    prompt, short = prompt_of(16 * 5 + 7, seed=3), prompt_of(10, seed=9)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    engine = fp8_engine(demo_model)
    cold = engine.generate([prompt], params)[0]
    hit = engine.generate([prompt], params)[0]
    short_alone = engine.generate([short], params)[0]
    # Steps of 24 tokens: [10 of short + 14 of prompt], then [short's decode + 23 of prompt], ...
    chunked = fp8_engine(demo_model, max_num_batched_tokens=24).generate([short, prompt], params)
    assert (cold.cached_tokens, hit.cached_tokens) == (0, 80)
    assert hit.new_token_ids == cold.new_token_ids == chunked[1].new_token_ids
    assert chunked[0].new_token_ids == short_alone.new_token_ids
    engine.check_integrity()


def test_fp8_shared_prefix_decodes_through_cascade_match_one_at_a_time(demo_model):
    """Eight prompts sharing 6 cached blocks decode together (cascade attention reads the fp8 prefix once
    per group, as a view) and give what each gives alone."""
    system = prompt_of(16 * 6, seed=4)
    prompts = [system + prompt_of(5 + i, seed=10 + i) for i in range(8)]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    engine = fp8_engine(demo_model, num_blocks=128)
    engine.generate([system + [7]], SamplingParams(max_tokens=1))  # cache the shared prefix
    together = [o.new_token_ids for o in engine.generate(prompts, params)]
    alone = [fp8_engine(demo_model).generate([p], params)[0].new_token_ids for p in prompts]
    assert together == alone


def test_fp8_cascade_kernel_attends_exactly_the_dequantized_cache():
    """The cascade kernel on an fp8 cache (a prefix read as a view and one gathered from scattered blocks, and
    the suffixes) gives bit for bit what it gives on a float32 cache holding the dequantized values; that
    kernel equals padded decode attention (tests/test_model_forward.py), and the engine test above compares
    the two paths on fp8 end to end."""
    from workers.model.cascade import build_cascade_plan, cascade_decode_attention
    from workers.model.kv_cache import dequantize, quantize_fp8

    gen = torch.Generator().manual_seed(0)
    bs, num_blocks, kvh, heads, hd = 4, 64, 2, 8, 16
    k, ks = quantize_fp8(torch.randn(num_blocks * bs, kvh, hd, generator=gen))
    v, vs = quantize_fp8(torch.randn(num_blocks * bs, kvh, hd, generator=gen))
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [perm[:6] + perm[6 + 3 * i : 9 + 3 * i] for i in range(3)] + [list(range(20, 29)), list(range(20, 28))]
    plan = build_cascade_plan(tables, [26, 33, 25, 36, 30], bs, torch.device("cpu"), torch.float32)
    assert sorted((g.rows.tolist(), g.slot_range is not None) for g in plan.groups) == [([0, 1, 2], False),
                                                                                         ([3, 4], True)]
    q = torch.randn(len(tables), heads, hd, generator=gen)
    got = cascade_decode_attention(q, k, v, plan, hd**-0.5, ks, vs)
    k32, v32 = dequantize(k, ks, torch.float32), dequantize(v, vs, torch.float32)
    assert torch.equal(got, cascade_decode_attention(q, k32, v32, plan, hd**-0.5))


def test_bfloat16_model_with_fp8_kv_dequantizes_to_bfloat16():
    loaded = load_model("demo", "bfloat16")
    engine = Engine(EngineConfig(model="demo", num_blocks=32, kv_cache_dtype="fp8"), loaded=loaded)
    assert (engine.kv_cache.dtype, engine.kv_cache.compute_dtype) == (torch.float8_e4m3fn, torch.bfloat16)
    prompt = prompt_of(40, seed=5)
    out = engine.generate([prompt, prompt], SamplingParams(max_tokens=5, ignore_eos=True))
    assert out[0].new_token_ids == out[1].new_token_ids and len(out[0].new_token_ids) == 5
    assert out[1].cached_tokens == 32  # submitted together: the second hit the first's two full blocks


# ---- two nodes ------------------------------------------------------------------------------------------------
def test_fp8_prefix_transferred_equals_the_prefix_computed_locally(make_node, demo_model):
    a, b = make_node("A", kv_cache_dtype="fp8"), make_node("B", kv_cache_dtype="fp8")
    prompt = prompt_of(16 * 6 + 5, seed=2)  # 6 full blocks + a tail
    expected = cold_output(demo_model, prompt, kv_cache_dtype="fp8")
    (out_a,), (fa,) = a.generate([prompt], PARAMS)
    assert (out_a.new_token_ids, fa.outcome) == (expected, FetchOutcome.NO_PEER)
    assert a.flush()
    (out_b,), (fb,) = b.generate([prompt], PARAMS)
    assert (fb.outcome, fb.error, fb.num_blocks) == (FetchOutcome.TRANSFERRED, None, 6)
    assert out_b.cached_tokens == 96 and out_b.new_token_ids == expected
    # The blocks crossed with their scales and are bit-identical on both sides; an fp8 block is 17408 bytes
    # of data (16384 of values + 1024 of scales) against 65536 in float32.
    hashes = a.engine.block_hashes(prompt)
    sent, held = a.engine.export_blocks(hashes), b.engine.export_blocks(hashes)
    assert [bytes(x.payload) for x in held] == [bytes(x.payload) for x in sent] and len(sent) == 6
    header = read_header(sent[0].payload)
    assert (header.dtype, header.data_nbytes) == ("float8_e4m3fn", 17408)
    assert fb.num_bytes == 6 * len(sent[0].payload)
    a.engine.check_integrity()
    b.engine.check_integrity()


def test_peers_of_different_kv_dtypes_recompute_instead(make_node, demo_model):
    a, b = make_node("A", kv_cache_dtype="fp8"), make_node("B")
    prompt = prompt_of(16 * 4 + 3, seed=6)
    a.generate([prompt], PARAMS)
    assert a.flush()
    (out_b,), (fb,) = b.generate([prompt], PARAMS)
    assert fb.outcome == FetchOutcome.FAILED and fb.num_blocks == 0
    assert fb.error.startswith("import rejected a block from A: block has dtype float8_e4m3fn, this engine's "
                               "KV cache is float32 (blocks move only between engines of the same KV cache dtype)")
    assert out_b.cached_tokens == 0 and out_b.new_token_ids == cold_output(demo_model, prompt)
    b.engine.check_integrity()


# ---- accuracy on a model whose predictions are not noise ------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return build_trained_checkpoint(tmp_path_factory.mktemp("trained"))


def test_fp8_greedy_agrees_with_float32_on_a_trained_llama(trained):
    loaded = load_model(str(trained))
    rng = random.Random(7)
    seqs = [counting_sequence(rng, 40) for _ in range(32)]
    prompts = [s[:8] for s in seqs]
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    outs = {}
    for kv in ("auto", "fp8"):
        engine = Engine(EngineConfig(model=str(trained), num_blocks=128, kv_cache_dtype=kv), loaded=loaded)
        outs[kv] = [o.new_token_ids for o in engine.generate(prompts, params)]
    num = 32 * 32
    # The model learned the task (float32 continues every sequence right), so its predictions are confident.
    assert sum(t == s for out, seq in zip(outs["auto"], seqs) for t, s in zip(out, seq[8:])) == num
    agree = sum(a == b for x, y in zip(outs["auto"], outs["fp8"]) for a, b in zip(x, y))
    # The largest logit error along the float32 trajectory (teacher-forced, so both caches see the same tokens).
    ref = teacher_forced_logits(loaded, prompts, outs["auto"])
    fp8 = teacher_forced_logits(loaded, prompts, outs["auto"], kv_cache_dtype="fp8")
    max_err = max(float((r - f).abs().max()) for r, f in zip(ref, fp8))
    span = max(float((r.max(-1).values - r.min(-1).values).max()) for r in ref)
    print(f"trained tiny Llama: fp8 greedy agreement {agree}/{num}, max |logit error| {max_err:.4f} "
          f"(logit span {span:.1f})")
    assert agree / num >= 0.99
    assert max_err < 1.0  # a sanity bound; the figure is the report (0.17 when measured)


# ---- flags ------------------------------------------------------------------------------------------------------
def test_generate_cli_runs_with_an_fp8_kv_cache(tmp_path, capsys):
    from deploy.cli import main

    prompt = prompt_of(40, seed=8)
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"token_ids": prompt, "max_tokens": 6, "ignore_eos": True}) + "\n")
    dst = tmp_path / "out.jsonl"
    assert main(["generate", "--model", "demo", "--input", str(src), "--output", str(dst), "--device", "cpu",
                 "--num-blocks", "16", "--kv-cache-dtype", "fp8"]) == 0
    (line,) = [json.loads(x) for x in dst.read_text().splitlines()]
    loaded = load_model("demo")
    expected = Engine(EngineConfig(model="demo", num_blocks=16, kv_cache_dtype="fp8"), loaded=loaded).generate(
        [prompt], SamplingParams(max_tokens=6, ignore_eos=True))[0].new_token_ids
    assert line["token_ids"] == expected
    assert "KV cache float8_e4m3fn (16 blocks)" in capsys.readouterr().err


def test_serve_passes_the_kv_cache_dtype_to_its_workers():
    from deploy.serve import add_arguments, config_from_args
    from deploy.stack import Stack

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args([])).kv_cache_dtype == "auto"
    config = config_from_args(parser.parse_args(["--kv-cache-dtype", "fp8"]))
    assert config.kv_cache_dtype == "fp8"
    assert Stack(config)._worker_actors().template.kv_cache_dtype == "fp8"
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-cache-dtype", "int8"])
