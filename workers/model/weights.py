"""Checkpoint files: find the safetensors shards, load them into a ``CausalLM``, and name the checkpoint.

The model id goes into every block hash, so it must be the same on every node that loads the same checkpoint
and different for different weights. It is ``<folder name>@<digest>`` where the digest covers config.json and
every safetensors header (tensor names, dtypes, shapes, byte offsets): cheap (no tensor data is read) and
stable across machines and paths.
"""

from __future__ import annotations

import hashlib
import json
import struct
from contextlib import ExitStack
from pathlib import Path

import torch

from workers.model.causal_lm import CausalLM, weight_layout
from workers.model.config import ModelLoadError, read_json

INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def find_weight_files(folder: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file holding it (via the index when the checkpoint is sharded)."""
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        index = read_json(index_path, INDEX_FILE)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{INDEX_FILE} has no 'weight_map' ({index_path})")
        files = {name: folder / str(file) for name, file in weight_map.items()}
        for path in sorted(set(files.values())):
            if not path.is_file():
                raise ModelLoadError(f"shard {path.name} listed in {INDEX_FILE} is missing from {folder}")
        return files
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        hint = " (only safetensors weights are supported)" if any(folder.glob("*.bin")) else ""
        raise ModelLoadError(f"no *.safetensors weight files in {folder}{hint}")
    files: dict[str, Path] = {}
    for path in shards:
        for name in _header(path):
            if name != "__metadata__":
                files[name] = path
    return files


def _header_bytes(path: Path) -> bytes:
    with path.open("rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise ModelLoadError(f"{path.name} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", raw_len)
        if length > _MAX_HEADER_BYTES:
            raise ModelLoadError(f"{path.name} is not a safetensors file (header length {length})")
        data = f.read(length)
        if len(data) != length:
            raise ModelLoadError(f"{path.name} is truncated (header)")
        return data


def _header(path: Path) -> dict:
    try:
        header = json.loads(_header_bytes(path))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelLoadError(f"{path.name} is not a safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path.name} is not a safetensors file (bad header)")
    return header


def checkpoint_digest(folder: Path) -> str:
    """Short stable digest of config.json + all safetensors headers (sorted by file name)."""
    h = hashlib.sha256()
    h.update((folder / "config.json").read_bytes())
    for path in sorted(set(find_weight_files(folder).values()), key=lambda p: p.name):
        h.update(b"\0" + path.name.encode() + b"\0")
        h.update(_header_bytes(path))
    return h.hexdigest()[:16]


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
