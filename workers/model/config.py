"""Model configuration: config.json (Hugging Face layout) parsed into one validated, frozen record.

Accepts both spellings transformers has used over time:
  * rope: ``rope_theta`` + ``rope_scaling`` ({"type"|"rope_type": ...}) or the newer ``rope_parameters``
    (rope_theta inside);
  * dtype: ``torch_dtype`` or ``dtype``;
  * eos: int or list, from generation_config.json first (what ``generate`` stops on), then config.json.
Anything we cannot run faithfully is rejected here with a ``ModelLoadError`` that names the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch only inside the dtype helpers: the router reads configs and must not import it
    import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")  # canonical names, as torch spells them

_DTYPE_ALIASES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


class ModelLoadError(ValueError):
    """A checkpoint cannot be loaded: the message says which file / field / tensor is wrong."""


@dataclass(slots=True, frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict | None  # None for plain RoPE, else {"rope_type": "llama3"|"linear", ...params}
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q/k/v projections (Qwen2 always; Llama when attention_bias)
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str  # canonical name: "float32" | "bfloat16" | "float16"
    # Additions beyond the minimal contract (all defaulted):
    o_proj_bias: bool = False  # Llama's attention_bias also puts a bias on o_proj; Qwen2's does not
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral: a key is visible iff q_pos - k_pos < sliding_window

    @property
    def num_query_groups(self) -> int:
        return self.num_heads // self.num_kv_heads


def canonical_dtype_name(dtype: str | None, default: str = "float32") -> str:
    """Map a user/config dtype spelling to its canonical name (``None`` / ``"auto"`` -> ``default``)."""
    if dtype is None:
        dtype = default
    name = str(dtype).removeprefix("torch.").lower()
    if name == "auto":
        name = default
    if name not in _DTYPE_ALIASES:
        raise ModelLoadError(f"unsupported dtype {dtype!r}; use float32, bfloat16 or float16")
    return _DTYPE_ALIASES[name]


def canonical_dtype(dtype: str | torch.dtype | None, default: str = "float32") -> torch.dtype:
    """Map a user/config dtype spelling (or a torch dtype) to a supported torch dtype (``None`` -> ``default``)."""
    import torch

    if isinstance(dtype, torch.dtype):
        if dtype_name(dtype) not in SUPPORTED_DTYPES:
            raise ModelLoadError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
        return dtype
    return getattr(torch, canonical_dtype_name(dtype, default))


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling config.json and the block wire format use)."""
    return str(dtype).removeprefix("torch.")


def _require_int(raw: dict[str, Any], key: str, *, minimum: int = 1) -> int:
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ModelLoadError(f"config.json: {key!r} must be an integer >= {minimum}, got {value!r}")
    return value


def _token_ids(value: Any, key: str) -> tuple[int, ...]:
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in items):
        raise ModelLoadError(f"{key} must be a token id or a list of token ids, got {value!r}")
    return tuple(dict.fromkeys(items))  # dedup, keep order


def _parse_rope(raw: dict[str, Any]) -> tuple[float, dict | None]:
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        # Per-layer-type rope (newer multi-attention-type models): fine only if all entries agree.
        values = list(params.values())
        if any(v != values[0] for v in values):
            raise ModelLoadError("config.json: per-layer-type rope_parameters are not supported")
        params = values[0]
    if not isinstance(params, dict):
        params = dict(raw.get("rope_scaling") or {})
    else:
        params = dict(params)
    theta = params.pop("rope_theta", raw.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise ModelLoadError(f"config.json: rope_theta must be a positive number, got {theta!r}")
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"config.json: rope type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelLoadError("config.json: partial_rotary_factor != 1 is not supported")
    params.pop("partial_rotary_factor", None)
    if rope_type == "default":
        return float(theta), None
    required = ("factor",) if rope_type == "linear" else ("factor", "low_freq_factor", "high_freq_factor")
    for key in required:
        if not isinstance(params.get(key), (int, float)) or params[key] <= 0:
            raise ModelLoadError(f"config.json: rope scaling {rope_type!r} needs a positive {key!r}")
    if rope_type == "llama3":
        if params["high_freq_factor"] <= params["low_freq_factor"]:
            raise ModelLoadError("config.json: llama3 rope scaling needs high_freq_factor > low_freq_factor")
        params.setdefault("original_max_position_embeddings", raw.get("max_position_embeddings"))
    return float(theta), {"rope_type": rope_type, **params}


def parse_model_config(raw: dict[str, Any], generation_config: dict[str, Any] | None = None) -> ModelConfig:
    """Validate a config.json dict (plus generation_config.json when present) into a ``ModelConfig``."""
    if not isinstance(raw, dict):
        raise ModelLoadError("config.json must hold a JSON object")
    archs = raw.get("architectures")
    if not isinstance(archs, list) or not archs:
        raise ModelLoadError(
            f"config.json: 'architectures' is missing; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if raw.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ModelLoadError(f"config.json: hidden_act {raw.get('hidden_act')!r} is not supported (only silu)")
    hidden = _require_int(raw, "hidden_size")
    num_heads = _require_int(raw, "num_attention_heads")
    num_kv_heads = raw.get("num_key_value_heads") or num_heads
    if not isinstance(num_kv_heads, int) or num_heads % num_kv_heads:
        raise ModelLoadError(
            f"config.json: num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv_heads})"
        )
    head_dim = raw.get("head_dim") or hidden // num_heads
    if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise ModelLoadError(f"config.json: head_dim must be a positive even integer, got {head_dim!r}")
    rope_theta, rope_scaling = _parse_rope(raw)

    is_qwen2 = arch == "Qwen2ForCausalLM"
    is_mistral = arch == "MistralForCausalLM"
    if is_qwen2:
        # Qwen2 always has q/k/v bias and never o_proj / MLP bias (the config has no switch for it).
        attention_bias, o_proj_bias, mlp_bias = True, False, False
    elif is_mistral:
        attention_bias = o_proj_bias = mlp_bias = False
    else:
        attention_bias = o_proj_bias = bool(raw.get("attention_bias", False))
        mlp_bias = bool(raw.get("mlp_bias", False))

    sliding_window = None
    if is_mistral and raw.get("sliding_window") is not None:
        sliding_window = _require_int(raw, "sliding_window")
    if is_qwen2 and raw.get("use_sliding_window"):
        raise ModelLoadError("config.json: Qwen2 use_sliding_window=true (per-layer windows) is not supported")

    gen = generation_config or {}
    eos = _token_ids(gen.get("eos_token_id"), "generation_config.json eos_token_id")
    if not eos:
        eos = _token_ids(raw.get("eos_token_id"), "config.json eos_token_id")
    bos = gen.get("bos_token_id", raw.get("bos_token_id"))
    if bos is not None and (isinstance(bos, bool) or not isinstance(bos, int) or bos < 0):
        raise ModelLoadError(f"config.json: bos_token_id must be a token id, got {bos!r}")
    dtype_raw = raw.get("torch_dtype") or raw.get("dtype") or "float32"
    vocab_size = _require_int(raw, "vocab_size")
    max_pos = _require_int(raw, "max_position_embeddings")
    if sliding_window is not None and sliding_window >= max_pos:
        sliding_window = None  # a window as wide as the context never masks anything

    return ModelConfig(
        architecture=arch,
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_layers=_require_int(raw, "num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        intermediate_size=_require_int(raw, "intermediate_size"),
        max_position_embeddings=max_pos,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=attention_bias,
        bos_token_id=bos,
        eos_token_ids=eos,
        torch_dtype=canonical_dtype_name(dtype_raw),
        o_proj_bias=o_proj_bias,
        mlp_bias=mlp_bias,
        sliding_window=sliding_window,
    )


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{what} is not valid JSON ({path}): {exc}") from None


def load_model_config(folder: Path) -> ModelConfig:
    """Read config.json (+ generation_config.json when present) from a checkpoint folder."""
    raw = read_json(folder / "config.json", "config.json")
    gen_path = folder / "generation_config.json"
    gen = read_json(gen_path, "generation_config.json") if gen_path.is_file() else None
    return parse_model_config(raw, gen if isinstance(gen, dict) else None)
