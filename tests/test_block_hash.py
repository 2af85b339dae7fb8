"""The canonical block hash (DESIGN section 2): test vectors and properties."""

import struct
import subprocess
import sys

import pytest
import xxhash
from hypothesis import given, strategies as st

from cache_service.block_hash import hash_block, hash_prompt_blocks, root_hash

# The README's test vectors: any engine implementing the scheme must reproduce them.
VECTORS = {
    ("demo", ""): "c0c73cb417fd8dde9e41d87fd1f4d6bc",
    ("demo", "tenant-a"): "0afa16c47b74ec7f8fb97e0ac9121b2d",
}
TOKENS_0_39_DEMO = ["222a14da128f5a91bae95685a71b4fdb", "9ebcc9e32ef9a3472f92782828809989"]
TOKENS_0_39_TENANT_A = ["9967602addf1dc253e6b4e9748f47899", "ef138969592b335945af55004dd34472"]


def test_root_vectors():
    for (model, salt), hexdigest in VECTORS.items():
        assert root_hash(model, salt).hex() == hexdigest


def test_chain_vectors():
    tokens = list(range(40))  # 2 full blocks of 16; the 8-token tail is never hashed
    assert [h.hex() for h in hash_prompt_blocks(tokens, 16, "demo")] == TOKENS_0_39_DEMO
    assert [h.hex() for h in hash_prompt_blocks(tokens, 16, "demo", "tenant-a")] == TOKENS_0_39_TENANT_A


def test_scheme_written_out_by_hand():
    # Recompute from the spec with nothing but xxhash and struct.
    root = xxhash.xxh3_128_digest(b"prefixcache/v1\x00" + b"demo" + b"\x00" + b"")
    h0 = xxhash.xxh3_128_digest(root + struct.pack("<16I", *range(16)))
    h1 = xxhash.xxh3_128_digest(h0 + struct.pack("<16I", *range(16, 32)))
    assert [h0, h1] == hash_prompt_blocks(list(range(40)), 16, "demo")


def test_same_hash_in_another_process():
    code = ("from cache_service.block_hash import hash_prompt_blocks as h;"
            "print(h(list(range(100)), 16, 'm', 's')[-1].hex())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == hash_prompt_blocks(list(range(100)), 16, "m", "s")[-1].hex()


def test_salt_and_model_separate_chains():
    t = list(range(32))
    a = hash_prompt_blocks(t, 16, "m", "a")
    assert not set(a) & set(hash_prompt_blocks(t, 16, "m", "b"))
    assert not set(a) & set(hash_prompt_blocks(t, 16, "m2", "a"))


def test_errors():
    with pytest.raises(ValueError, match="uint32"):
        hash_prompt_blocks([-1] * 16, 16, "m")
    with pytest.raises(ValueError, match="block_size"):
        hash_prompt_blocks([1], 0, "m")
    with pytest.raises(ValueError, match="16 bytes"):
        hash_block(b"short", [1])


@given(st.lists(st.integers(0, 2**32 - 1), max_size=80), st.integers(1, 20))
def test_prefix_property(tokens, block_size):
    hashes = hash_prompt_blocks(tokens, block_size, "m")
    assert len(hashes) == len(tokens) // block_size
    # Chained: block i's hash depends on every earlier block, and extends step by step.
    parent = root_hash("m")
    for i, h in enumerate(hashes):
        assert h == hash_block(parent, tokens[i * block_size:(i + 1) * block_size])
        parent = h
    # Hashing a prefix gives a prefix of the hashes.
    cut = len(tokens) // 2
    assert hash_prompt_blocks(tokens[:cut], block_size, "m") == hashes[: cut // block_size]
