"""A checkpoint's identity without its weights: the folder, its weight files, its model id, its tokenizer.

Torch-free on purpose: the router needs exactly these (the model id goes into every block hash, the tokenizer
decides the prompt's tokens) and never loads weights, so it must not pay for importing torch.

The model id must be the same on every node that loads the same checkpoint and different for different
weights. It is ``<folder name>@<digest>`` where the digest covers config.json and every safetensors header
(tensor names, dtypes, shapes, byte offsets): cheap (no tensor data is read) and stable across machines and
paths.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from workers.model.config import ModelLoadError, load_model_config, read_json
from workers.model.demo import DEMO_MODEL_ID
from workers.model.tokenizer import ByteTokenizer, Tokenizer, load_hf_tokenizer

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


def checkpoint_folder(path: str | Path) -> Path:
    """The folder ``path`` names, checked to be a checkpoint (holding a config.json)."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ModelLoadError(f"model folder not found: {folder} (give a Hugging Face checkpoint folder or 'demo')")
    if not folder.is_dir():
        raise ModelLoadError(f"model path is not a folder: {folder}")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"config.json not found in {folder}")
    return folder


def checkpoint_model_id(path_or_demo: str | Path) -> str:
    """The model id ``load_model`` would report, without loading weights (for routers / clients)."""
    if str(path_or_demo) == DEMO_MODEL_ID:
        return DEMO_MODEL_ID
    folder = checkpoint_folder(path_or_demo)
    return f"{folder.resolve().name}@{checkpoint_digest(folder)}"


def load_tokenizer(path_or_demo: str | Path) -> Tokenizer:
    """Just the tokenizer (with the model's bos/eos ids) of a checkpoint folder or the demo."""
    if str(path_or_demo) == DEMO_MODEL_ID:
        return ByteTokenizer()
    folder = checkpoint_folder(path_or_demo)
    config = load_model_config(folder)
    return load_hf_tokenizer(folder, config.eos_token_ids, config.bos_token_id)
