"""KVCache: layout, sizing, and exact block export/import."""

from __future__ import annotations

import pytest
import torch

from model_fixtures import single_thread
from workers.model import KVCache, load_model
from workers.model.demo import demo_config


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with single_thread():
        yield


def _filled(num_blocks=6, block_size=4, dtype=torch.float32):
    cache = KVCache(demo_config(), num_blocks, block_size, dtype, "cpu")
    gen = torch.Generator().manual_seed(0)
    cache.tensor.copy_(torch.randn(cache.tensor.shape, generator=gen).to(dtype))
    return cache


def test_layout_and_sizes():
    cfg = demo_config()
    cache = KVCache(cfg, 10, 16, torch.float32, "cpu")
    assert cache.tensor.shape == (cfg.num_layers, 2, 10, 16, cfg.num_kv_heads, cfg.head_dim)
    assert cache.block_shape == (cfg.num_layers, 2, 16, cfg.num_kv_heads, cfg.head_dim)
    assert cache.block_nbytes() == 4 * 2 * 16 * 2 * 64 * 4
    assert KVCache.blocks_for_memory(cfg, 16, torch.float32, 10 * cache.block_nbytes() + 5) == 10
    assert KVCache.blocks_for_memory(cfg, 16, torch.bfloat16, cache.block_nbytes()) == 2
    assert KVCache.blocks_for_memory(cfg, 16, torch.float32, 100) == 0
    k, v = cache.layer_slots(2)
    assert k.shape == (160, cfg.num_kv_heads, cfg.head_dim)
    k[16 * 3 + 5] = 7.0  # slot = block * block_size + offset
    assert (cache.tensor[2, 0, 3, 5] == 7.0).all() and (v == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_read_write_round_trip(dtype):
    src, dst = _filled(dtype=dtype), KVCache(demo_config(), 6, 4, dtype, "cpu")
    block = src.read_block(3)
    assert block.shape == src.block_shape and block.dtype == dtype and block.device.type == "cpu"
    assert torch.equal(block, src.tensor[:, :, 3])
    block_copy = block.clone()
    src.tensor.zero_()  # read_block returned a copy
    assert torch.equal(block, block_copy)
    dst.write_block(5, block)
    assert torch.equal(dst.read_block(5), block_copy)
    assert (dst.tensor[:, :, :5] == 0).all()


def test_read_write_many():
    src, dst = _filled(), KVCache(demo_config(), 6, 4, torch.float32, "cpu")
    data = src.read_blocks([4, 0, 2])
    assert data.shape == (3, *src.block_shape)
    dst.write_blocks([1, 5, 3], data)
    for s, d in ((4, 1), (0, 5), (2, 3)):
        assert torch.equal(dst.read_block(d), src.read_block(s))


def test_write_block_rejects_bad_input():
    cache = _filled()
    with pytest.raises(ValueError, match="shape"):
        cache.write_block(0, torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="dtype"):
        cache.write_block(0, cache.read_block(1).half())
    with pytest.raises(IndexError, match="out of range"):
        cache.read_block(6)
    with pytest.raises(ValueError):
        KVCache(demo_config(), 0, 16, torch.float32, "cpu")


def test_cache_created_in_inference_mode_is_writable():
    with torch.inference_mode():
        cache = KVCache(demo_config(), 4, 4, torch.float32, "cpu")
    cache.write_block(1, _filled().read_block(2))
    assert torch.equal(cache.read_block(1), _filled().read_block(2))


def test_demo_forward_writes_cache():
    from workers.model import ForwardBatch

    loaded = load_model("demo")
    cache = KVCache(loaded.config, 4, 4, loaded.dtype, loaded.device)
    ids = loaded.tokenizer.encode("abcdef")  # 7 tokens -> blocks 2 (4 slots) and 0 (3 slots)
    table = torch.tensor([[2, 0, 3, 1]])
    slots = [8, 9, 10, 11, 0, 1, 2]
    loaded.model(ForwardBatch(torch.tensor(ids), torch.arange(7), torch.tensor(slots), [7], [7], table), cache)
    assert (cache.tensor[:, :, 2] != 0).any(dim=(-1, -2)).all()
    assert (cache.tensor[:, :, 0, :3] != 0).any(dim=(-1, -2)).all() and (cache.tensor[:, :, 0, 3] == 0).all()
    assert (cache.tensor[:, :, 1] == 0).all() and (cache.tensor[:, :, 3] == 0).all()


def test_forward_rejects_inconsistent_batches():
    from workers.model import ForwardBatch

    loaded = load_model("demo")
    cache = KVCache(loaded.config, 4, 4, loaded.dtype, loaded.device)
    table = torch.arange(4).view(1, -1)

    def batch(n=3, query_lens=None, context_lens=None, slots=None, table=table):
        return ForwardBatch(torch.zeros(n, dtype=torch.long), torch.arange(n), slots if slots is not None else torch.arange(n),
                            query_lens or [n], context_lens or [n], table)

    with pytest.raises(ValueError, match="sum\\(query_lens\\)"):
        loaded.model(batch(query_lens=[2]), cache)
    with pytest.raises(ValueError, match="query_len <= context_len"):
        loaded.model(batch(context_lens=[2]), cache)
    with pytest.raises(ValueError, match="does not fit in 1 blocks"):
        loaded.model(batch(n=5, table=table[:, :1]), cache)
    with pytest.raises(ValueError, match="past the end of the KV cache"):
        loaded.model(batch(slots=torch.tensor([0, 1, 16])), cache)
    big = KVCache(loaded.config, 260, 16, loaded.dtype, loaded.device)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        loaded.model(ForwardBatch(torch.zeros(1, dtype=torch.long), torch.tensor([4096]), torch.tensor([4096]), [1], [4097],
                                  torch.arange(260).view(1, -1)), big)
