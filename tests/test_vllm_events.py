"""vLLM KV events -> canonical block events (workers/vllm_events.py, vllm_roots.py, vllm_store_watch.py).

Pure: no vLLM needed. vLLM's block hashes are stand-ins (any hashable: vLLM's are sha256 bytes or ints); what
matters is the chain they form and how our canonical hashes follow it.
"""

from __future__ import annotations

import asyncio
import threading

from cache_service.block_hash import hash_block, hash_prompt_blocks, root_hash
from cache_service.records import AllBlocksCleared, BlockRemoved, BlockStored
from workers.vllm_events import VllmAllBlocksCleared, VllmBlockRemoved, VllmBlockStored, VllmEventTranslator
from workers.vllm_roots import UNKNOWN_SALT, RootSalts, salt_of_extra_keys
from workers.vllm_store_watch import StoreWatch

BS = 4
MODEL = "tiny@0123456789abcdef"
A = list(range(10, 22))  # three blocks
B = [7, 7, 7, 7] + list(range(40, 44))


def translator(vllm_hash=None) -> VllmEventTranslator:
    return VllmEventTranslator(MODEL, BS, RootSalts(BS, vllm_hash=vllm_hash))


def stored(hashes, parent, tokens, extra=None, **kw) -> VllmBlockStored:
    return VllmBlockStored(list(hashes), parent, list(tokens), BS, extra, **kw)


def test_a_chain_maps_to_the_canonical_hashes_the_router_computes():
    t = translator()
    t.roots.admit(A, "")
    out = t.translate([stored(["v0", "v1"], None, A[:8], [None, None]), stored(["v2"], "v1", A[8:12], [None])])
    want = hash_prompt_blocks(A, BS, MODEL)
    assert out == [BlockStored(want[0], None, tuple(A[0:4])), BlockStored(want[1], want[0], tuple(A[4:8])),
                   BlockStored(want[2], want[1], tuple(A[8:12]))]
    assert t.cached_hashes() == want


def test_the_salt_in_extra_keys_roots_the_chain_and_tenants_never_merge():
    t = translator()
    t.roots.admit(A, "tenant-a")
    t.roots.admit(A, "tenant-b")  # the same first block from two tenants: vLLM keeps two chains
    out = t.translate([stored(["va"], None, A[:4], [("tenant-a",)]), stored(["vb"], None, A[:4], [("tenant-b",)])])
    assert [e.block_hash for e in out] == [hash_block(root_hash(MODEL, "tenant-a"), A[:4]),
                                          hash_block(root_hash(MODEL, "tenant-b"), A[:4])]


def test_a_salt_never_admitted_is_dropped_with_its_chain():
    t = translator()
    t.roots.admit(A, "tenant-a")
    out = t.translate([stored(["v0"], None, A[:4], [("tenant-z",)]), stored(["v1"], "v0", A[4:8], [None])])
    assert out == [] and t.cached_hashes() == []
    assert (t.roots.num_dropped, t.num_dropped_blocks) == (1, 2)


def test_without_extra_keys_one_candidate_resolves_and_two_need_vllms_own_hash():
    t = translator()
    t.roots.admit(B, "x")
    (ev,) = t.translate([stored(["v0"], None, B[:4])])
    assert ev.block_hash == hash_block(root_hash(MODEL, "x"), B[:4])

    t = translator()  # two salts, no extra keys and no vLLM hash function: ambiguous, dropped
    t.roots.admit(B, "x")
    t.roots.admit(B, "y")
    assert t.translate([stored(["v0"], None, B[:4])]) == []

    t = translator(vllm_hash=lambda tokens, salt: f"vllm:{salt}:{tuple(tokens)}")  # vLLM's hash tells them apart
    t.roots.admit(B, "x")
    t.roots.admit(B, "y")
    (ev,) = t.translate([stored([f"vllm:y:{tuple(B[:4])}"], None, B[:4])])
    assert ev.block_hash == hash_block(root_hash(MODEL, "y"), B[:4])


def test_a_block_leaves_the_index_when_vllms_last_copy_is_removed():
    t = translator()
    t.roots.admit(A, "")
    h0 = hash_prompt_blocks(A[:4], BS, MODEL)[0]
    # vLLM does not de-duplicate: two requests filled the same block at once, two physical copies.
    assert t.translate([stored(["v0"], None, A[:4], [None])]) == [BlockStored(h0, None, tuple(A[:4]))]
    assert t.translate([stored(["v0"], None, A[:4], [None])]) == []
    assert t.translate([VllmBlockRemoved(["v0"], "GPU")]) == []  # one copy left
    assert t.translate([VllmBlockRemoved(["v0"], "GPU")]) == [BlockRemoved(h0)]
    assert t.translate([VllmBlockRemoved(["v0"], "GPU")]) == []  # unknown now: nothing to remove
    assert t.cached_hashes() == [] and t.was_stored(h0)


def test_what_cannot_be_translated_is_dropped_never_guessed():
    t = translator()
    t.roots.admit(A, "")
    assert t.translate([stored(["p"], "unknown-parent", A[4:8], [None])]) == []  # parent never seen
    assert t.translate([stored(["c"], None, A[:4], [None], medium="CPU")]) == []  # an offloading tier
    assert t.translate([stored(["l"], None, A[:4], [None], lora_name="adapter")]) == []
    assert t.translate([stored(["m"], None, A[:4], [("mm-hash", 0)])]) == []  # multimodal extra keys
    assert t.translate([VllmBlockStored(["s"], None, A[:2], 2, [None])]) == []  # another block size
    assert t.translate([stored(["v0", "v1"], None, A[:4], [None, None])]) == []  # tokens do not cover the blocks
    assert t.cached_hashes() == []
    assert t.num_dropped_blocks == 7


def test_all_blocks_cleared_and_the_capacity_bound_keep_the_index_within_vllm():
    t = translator()
    t.capacity = 2
    for toks in (A[:4], B[:4], A[4:8]):
        t.roots.admit(toks, "")
    first, second, third = (hash_block(root_hash(MODEL, ""), x) for x in (A[:4], B[:4], A[4:8]))
    out = t.translate([stored(["a"], None, A[:4], [None]), stored(["b"], None, B[:4], [None]),
                       stored(["c"], None, A[4:8], [None])])
    # Past the bound the oldest mapping is forgotten and leaves the index (it may miss a block, never claim one).
    assert [type(e).__name__ for e in out] == ["BlockStored", "BlockStored", "BlockRemoved", "BlockStored"]
    assert out[2] == BlockRemoved(first)
    assert t.cached_hashes() == [second, third]
    assert t.translate([VllmAllBlocksCleared()]) == [AllBlocksCleared()]
    assert t.cached_hashes() == []


def test_salt_of_extra_keys_shapes():
    assert salt_of_extra_keys(None, 0) is UNKNOWN_SALT
    assert salt_of_extra_keys([None], 0) == ""
    assert salt_of_extra_keys([("t",)], 0) == "t"
    assert salt_of_extra_keys([("lora", "t")], 0) not in ("", "t", UNKNOWN_SALT)


def test_root_salts_are_bounded_least_recent_first():
    r = RootSalts(BS, capacity=2)
    r.admit(A, "a")
    r.admit(B, "b")
    r.admit(A, "a2")  # A used again: B is now the oldest
    r.admit(list(range(90, 94)), "c")
    assert len(r) == 2 and r.candidates(B[:4]) == set() and r.candidates(A[:4]) == {"a", "a2"}
    r.admit([1, 2, 3], "short")  # no full block: nothing to remember
    assert r.candidates([1, 2, 3]) == set()


def test_store_watch_waits_for_pending_blocks_only():
    t = translator()
    lock = threading.Lock()
    watch = StoreWatch(lock, t.was_stored)
    t.roots.admit(A, "")
    hashes = hash_prompt_blocks(A, BS, MODEL)

    async def scenario() -> tuple[bool, bool, bool]:
        with lock:
            t.translate([stored(["v0"], None, A[:4], [None])])
        waiting = asyncio.ensure_future(watch.wait(hashes, timeout_s=30))
        await asyncio.sleep(0)  # registered, blocks 1 and 2 pending

        def subscriber() -> None:  # the other thread delivers the rest
            with lock:
                t.translate([stored(["v1", "v2"], "v0", A[4:12], [None, None])])
                watch.notify()

        thread = threading.Thread(target=subscriber)
        thread.start()
        done = await waiting
        thread.join()
        nothing_pending = await watch.wait(hashes[:1], timeout_s=0)
        never = await watch.wait([hash_block(hashes[-1], [0, 0, 0, 0])], timeout_s=0.01)
        return done, nothing_pending, never

    assert asyncio.run(scenario()) == (True, True, False)
