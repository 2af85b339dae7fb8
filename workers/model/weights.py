"""Checkpoint weights: load the safetensors shards into a ``CausalLM`` (finding them: ``checkpoint.py``)."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import torch

from workers.model.causal_lm import CausalLM, weight_layout
from workers.model.checkpoint import find_weight_files
from workers.model.config import ModelLoadError

def load_weights(model: CausalLM, folder: Path) -> None:
    """Fill every parameter of ``model`` from the checkpoint (casting to the model's dtype)."""
    files = find_weight_files(folder)
    params = dict(model.named_parameters(remove_duplicate=False))
    from safetensors import safe_open

    with ExitStack() as stack:
        handles = {}

        def open_file(path: Path):
            if path not in handles:
                try:
                    handles[path] = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
                except Exception as exc:  # safetensors raises its own error types
                    raise ModelLoadError(f"cannot read {path.name}: {exc}") from None
            return handles[path]

        for source in weight_layout(model.config):
            param = params[source.param]
            row = 0
            for name, shape in source.tensors:
                path = files.get(name)
                if path is None:
                    raise ModelLoadError(f"missing weight tensor {name!r} (shape {list(shape)}) in {folder}")
                handle = open_file(path)
                try:
                    found = tuple(handle.get_slice(name).get_shape())
                    if found != shape:
                        raise ModelLoadError(
                            f"weight tensor {name!r} has shape {list(found)}, config.json implies {list(shape)}"
                        )
                    tensor = handle.get_tensor(name)
                except ModelLoadError:
                    raise
                except Exception as exc:
                    raise ModelLoadError(f"cannot read tensor {name!r} from {path.name}: {exc}") from None
                with torch.no_grad():
                    param[row : row + shape[0]].copy_(tensor.to(param.dtype))
                row += shape[0]
