"""load_model: config parsing, dtypes, the demo model, stable model ids, and clear errors for bad folders."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_fixtures import build_tiny_checkpoint, single_thread
from workers.model import (
    ForwardBatch,
    KVCache,
    ModelLoadError,
    checkpoint_model_id,
    load_model,
    load_tokenizer,
    parse_model_config,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("load")


@pytest.fixture(scope="module")
def llama(root):
    return build_tiny_checkpoint(root, "llama")


@pytest.fixture(scope="module")
def sharded(root):
    return build_tiny_checkpoint(root, "qwen2", sharded=True)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _prefill_logits(loaded, ids):
    n = len(ids)
    cache = KVCache(loaded.config, 8, 16, loaded.dtype, loaded.device)
    batch = ForwardBatch(torch.tensor(ids), torch.arange(n), torch.arange(n), [n], [n], torch.arange(8).view(1, -1))
    return loaded.model(batch, cache)


# ---------------------------------------------------------------------------------------------- config parsing


def _raw(**overrides):
    raw = {
        "architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2,
    }
    raw.update(overrides)
    return raw


def test_parse_config_defaults_and_old_rope_format():
    cfg = parse_model_config(_raw(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 4.0}))
    assert (cfg.head_dim, cfg.num_kv_heads, cfg.rope_theta) == (16, 2, 5e5)
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert cfg.eos_token_ids == (2,) and cfg.bos_token_id == 1 and cfg.torch_dtype == "float32"
    assert not cfg.attention_bias and not cfg.tie_word_embeddings and cfg.sliding_window is None


def test_parse_config_new_rope_format_and_generation_config_eos():
    rope = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128}
    cfg = parse_model_config(_raw(rope_parameters=rope, head_dim=24, dtype="bfloat16"),
                             {"eos_token_id": [2, 7, 2], "bos_token_id": 1})
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling["rope_type"] == "llama3" and "rope_theta" not in cfg.rope_scaling
    assert cfg.head_dim == 24 and cfg.eos_token_ids == (2, 7) and cfg.torch_dtype == "bfloat16"


def test_parse_config_architecture_flags():
    qwen = parse_model_config(_raw(architectures=["Qwen2ForCausalLM"], tie_word_embeddings=True))
    assert qwen.attention_bias and not qwen.o_proj_bias and qwen.tie_word_embeddings
    mistral = parse_model_config(_raw(architectures=["MistralForCausalLM"], sliding_window=64))
    assert mistral.sliding_window == 64
    wide = parse_model_config(_raw(architectures=["MistralForCausalLM"], sliding_window=4096))
    assert wide.sliding_window is None  # wider than the context: never masks
    llama = parse_model_config(_raw(attention_bias=True, mlp_bias=True))
    assert llama.attention_bias and llama.o_proj_bias and llama.mlp_bias


@pytest.mark.parametrize(
    "raw, message",
    [
        (_raw(architectures=["GPT2LMHeadModel"]), "unsupported architecture 'GPT2LMHeadModel'"),
        (_raw(architectures=None), "'architectures' is missing"),
        (_raw(num_key_value_heads=3), "multiple of num_key_value_heads"),
        (_raw(hidden_size="big"), "'hidden_size' must be an integer"),
        (_raw(rope_scaling={"type": "yarn", "factor": 4.0}), "rope type 'yarn' is not supported"),
        (_raw(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "needs a positive 'low_freq_factor'"),
        (_raw(hidden_act="gelu"), "hidden_act 'gelu'"),
        (_raw(architectures=["Qwen2ForCausalLM"], use_sliding_window=True), "use_sliding_window"),
        (_raw(torch_dtype="int8"), "unsupported dtype 'int8'"),
        (_raw(eos_token_id="x"), "eos_token_id"),
    ],
)
def test_parse_config_rejects(raw, message):
    with pytest.raises(ModelLoadError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_model_config(raw)


def test_unsupported_architecture_lists_supported():
    with pytest.raises(ModelLoadError) as err:
        parse_model_config(_raw(architectures=["FalconForCausalLM"]))
    assert "FalconForCausalLM" in str(err.value) and "LlamaForCausalLM" in str(err.value)
    assert "Qwen2ForCausalLM" in str(err.value) and "MistralForCausalLM" in str(err.value)


# ---------------------------------------------------------------------------------------------- folder errors


def test_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="model folder not found"):
        load_model(tmp_path / "nope")


def test_missing_config(tmp_path, llama):
    path = _copy(llama, tmp_path / "m")
    (path / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="config.json not found"):
        load_model(path)


def test_malformed_config(tmp_path, llama):
    path = _copy(llama, tmp_path / "m")
    (path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json is not valid JSON"):
        load_model(path)


def test_unsupported_architecture_in_folder(tmp_path, llama):
    path = _copy(llama, tmp_path / "m")
    raw = json.loads((path / "config.json").read_text())
    raw["architectures"] = ["MixtralForCausalLM"]
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match="unsupported architecture 'MixtralForCausalLM'"):
        load_model(path)


def test_missing_tensor(tmp_path, llama):
    path = _copy(llama, tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="missing weight tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_model(path)


def test_shape_mismatch(tmp_path, llama):
    path = _copy(llama, tmp_path / "m")
    raw = json.loads((path / "config.json").read_text())
    raw["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match=r"'model.layers.0.mlp.gate_proj.weight' has shape \[128, 64\]"):
        load_model(path)


def test_incomplete_shard_set(tmp_path, sharded):
    path = _copy(sharded, tmp_path / "m")
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    with pytest.raises(ModelLoadError, match=f"shard {shards[1].name} listed in model.safetensors.index.json is missing"):
        load_model(path)


def test_no_weight_files(tmp_path, llama):
    path = _copy(llama, tmp_path / "m")
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no \\*.safetensors weight files"):
        load_model(path)


def test_missing_tokenizer(tmp_path, llama):
    path = _copy(llama, tmp_path / "m")
    (path / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="tokenizer.json not found"):
        load_model(path)


def test_errors_are_value_errors():
    assert issubclass(ModelLoadError, ValueError)


# ---------------------------------------------------------------------------------------------- dtypes, ids, demo


def test_loaded_model_fields(llama, sharded):
    loaded = load_model(llama)
    assert loaded.dtype == torch.float32 and loaded.device == torch.device("cpu")
    assert loaded.config.eos_token_ids == (1,) and loaded.config.bos_token_id == 0
    assert loaded.tokenizer.eos_token_ids == (1,) and loaded.tokenizer.bos_token_id == 0
    # vocab*hidden (embed) + vocab*hidden (head) + 2 layers + final norm
    per_layer = 64 * (64 + 2 * 32) + 64 * 64 + 3 * 64 * 128 + 2 * 64
    assert loaded.num_params == 2 * 320 * 64 + 2 * per_layer + 64
    assert loaded.weight_bytes == 4 * loaded.num_params
    tied = load_model(sharded)  # qwen2, tied: the embedding counts once; q/k/v biases count
    assert tied.model.lm_head.weight is tied.model.embed_tokens.weight
    assert tied.num_params == 320 * 64 + 2 * (per_layer + 128) + 64


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, "bf16", "float16"])
def test_half_precision_runs(llama, dtype):
    loaded = load_model(llama, dtype=dtype)
    assert loaded.dtype in (torch.bfloat16, torch.float16)
    assert all(p.dtype == loaded.dtype for p in loaded.model.parameters())
    logits = _prefill_logits(loaded, loaded.tokenizer.encode("hello world"))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    ref = _prefill_logits(load_model(llama), loaded.tokenizer.encode("hello world"))
    assert torch.allclose(logits, ref, atol=0.5)  # same model, coarser arithmetic


def test_checkpoint_dtype_is_the_default(root):
    path = build_tiny_checkpoint(root, "llama", seed=5, dtype="bfloat16")
    assert load_model(path).dtype == torch.bfloat16
    assert load_model(path, dtype="float32").dtype == torch.float32
    with pytest.raises(ModelLoadError, match="unsupported dtype"):
        load_model(path, dtype="int4")


def test_model_id_is_stable_and_content_addressed(tmp_path, root, llama):
    loaded = load_model(llama)
    assert loaded.model_id == checkpoint_model_id(llama)
    assert loaded.model_id.startswith(llama.name + "@")
    # Same checkpoint elsewhere (another node's disk): same id.
    other = _copy(llama, tmp_path / "elsewhere" / llama.name)
    assert checkpoint_model_id(other) == loaded.model_id
    # Different weights layout or config: different id.
    different = build_tiny_checkpoint(tmp_path, "llama", seed=0, intermediate=96, name=llama.name)
    assert checkpoint_model_id(different) != loaded.model_id


def test_load_tokenizer_alone(llama):
    tok = load_tokenizer(llama)
    assert tok.encode("alpha beta") == load_model(llama).tokenizer.encode("alpha beta")
    assert load_tokenizer("demo").encode("A") == [256, 65]


def test_demo_model():
    a, b = load_model("demo"), load_model("demo")
    assert a.model_id == "demo" and checkpoint_model_id("demo") == "demo"
    assert a.config.vocab_size == a.tokenizer.vocab_size == 259
    ids = a.tokenizer.encode("The demo model is deterministic.")
    la, lb = _prefill_logits(a, ids), _prefill_logits(b, ids)
    assert torch.equal(la, lb)
    assert torch.isfinite(la).all() and la.std() > 1.0  # not near-uniform


def test_demo_is_identical_across_processes():
    code = (
        "import torch; from workers.model import load_model; m = load_model('demo').model;"
        "print(float(sum(p.double().sum() for p in m.parameters())))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    here = float(sum(p.double().sum() for p in load_model("demo").model.parameters()))
    assert float(out.stdout.strip()) == here


def test_demo_bf16():
    loaded = load_model("demo", dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16 and loaded.model_id == "demo"
    logits = _prefill_logits(loaded, loaded.tokenizer.encode("hi"))
    assert torch.isfinite(logits).all()


def test_cuda_unavailable_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        load_model("demo", device="cuda")
