"""`prefixcache generate`: JSONL in, JSONL out in input order, errors in place, clean exit 2 on a bad model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.cli import main
from tests.model_fixtures import build_tiny_checkpoint, hf_greedy


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("cli"), "llama", seed=5)


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_good_and_bad_lines_in_input_order(ckpt, tmp_path, capsys):
    system = [0] + [(5 * i) % 300 + 3 for i in range(40)]  # 41 tokens: two full 16-token blocks
    lines = [
        {"token_ids": system + [7, 8], "max_tokens": 6, "ignore_eos": True},
        "{not json",
        {"token_ids": [], "max_tokens": 4},
        {"token_ids": [0, 5, 320], "max_tokens": 4},
        {"token_ids": [5] * 1020, "max_tokens": 8},
        {"text": "the cache block", "max_tokens": 0},
        {"text": "hello", "top_p": 1.5},
        {"text": "hello", "token_ids": [0, 5]},
        {"text": "the quick brown fox", "max_tokens": 5, "temperature": 0.8, "seed": 11, "ignore_eos": True},
        {"token_ids": [0, 5], "max_tokens": "many"},
        {"token_ids": [0, 5], "max_token": 3},
        {"token_ids": system + [9], "max_tokens": 6, "ignore_eos": True, "stop": []},
    ]
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    dst = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(ckpt), "--input", str(src), "--output", str(dst),
                 "--block-size", "16", "--max-num-seqs", "4"]) == 0
    out = read_jsonl(dst)
    assert len(out) == len(lines)
    errors = {i: o["error"] for i, o in enumerate(out) if "error" in o}
    assert sorted(errors) == [1, 2, 3, 4, 5, 6, 7, 9, 10]
    assert errors[1].startswith("malformed JSON") and errors[1].endswith("(line 2)")
    assert errors[2] == "prompt is empty: give at least one token (line 3)"
    assert "prompt token id 320 is outside the vocabulary (vocab_size 320" in errors[3]
    assert "prompt (1020 tokens) + max_tokens (8) = 1028 tokens is longer than the model's context (1024" in errors[4]
    assert errors[5] == "max_tokens must be a positive integer, got 0 (line 6)"
    assert errors[6] == "top_p must be in (0, 1], got 1.5 (line 7)"
    assert errors[7] == "give exactly one of 'text' or 'token_ids' (line 8)"
    assert errors[9] == "field 'max_tokens' must be an integer, got \"many\" (line 10)"
    assert errors[10].startswith("unknown field 'max_token'") and errors[10].endswith("(line 11)")

    first, sampled, last = out[0], out[8], out[11]
    assert first["token_ids"] == hf_greedy(ckpt, system + [7, 8], 6)
    assert last["token_ids"] == hf_greedy(ckpt, system + [9], 6)
    assert (first["prompt_tokens"], first["completion_tokens"], first["finish_reason"]) == (43, 6, "length")
    # Both were submitted together: the second long prompt was admitted after the first's prefill and hit
    # its two full blocks (block size 16).
    assert (first["cached_tokens"], last["cached_tokens"]) == (0, 32)
    assert sampled["completion_tokens"] == 5 and sampled["prompt_tokens"] >= 2
    assert set(first) == {"token_ids", "text", "prompt_tokens", "completion_tokens", "cached_tokens", "finish_reason"}
    assert "3/12 requests served, 9 errors" in capsys.readouterr().err


def _incomplete(tmp_path: Path, ckpt: Path) -> Path:
    folder = tmp_path / "incomplete"
    folder.mkdir()
    shutil.copy(ckpt / "config.json", folder / "config.json")
    shutil.copy(ckpt / "tokenizer.json", folder / "tokenizer.json")
    return folder


def _unsupported(tmp_path: Path, ckpt: Path) -> Path:
    folder = tmp_path / "gpt2ish"
    shutil.copytree(ckpt, folder)
    raw = json.loads((folder / "config.json").read_text())
    raw["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


@pytest.mark.parametrize(
    ("make_folder", "message"),
    [
        (lambda tmp, ck: tmp / "missing", "model folder not found"),
        (_incomplete, "safetensors"),
        (_unsupported, "unsupported architecture 'GPT2LMHeadModel'"),
    ],
)
def test_bad_model_folder_exits_2_with_a_message(make_folder, message, ckpt, tmp_path, capsys):
    folder = make_folder(tmp_path, ckpt)
    src = write_jsonl(tmp_path / "in.jsonl", [{"token_ids": [0, 5]}])
    rc = main(["generate", "--model", str(folder), "--input", str(src), "--output", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "cannot load model" in err and message in err and "Traceback" not in err
    assert not (tmp_path / "o.jsonl").exists()


def test_console_script_end_to_end(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"text": "Hello, prefix cache!", "max_tokens": 8, "ignore_eos": True},
        {"text": "", "max_tokens": 8},
    ])
    dst = tmp_path / "out.jsonl"
    exe = Path(sys.executable).with_name("prefixcache")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", RAY_AUTH_MODE="disabled")
    proc = subprocess.run([str(exe), "generate", "--model", "demo", "--input", str(src), "--output", str(dst),
                           "--device", "cpu"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    good, bad = read_jsonl(dst)
    assert good["completion_tokens"] == 8 and len(good["token_ids"]) == 8 and good["finish_reason"] == "length"
    assert good["prompt_tokens"] == len("Hello, prefix cache!") + 1  # bytes + BOS
    assert bad == {"error": "prompt is empty: 'text' is an empty string (line 2)"}
