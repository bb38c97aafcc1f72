"""write_kv / copy_pages: compiled ops against their torch references, and the arena around them."""

from __future__ import annotations

import pytest
import torch

from arbitrage_fast.kv import KVCacheExhausted, KVSpec, PagedKVCache
from arbitrage_fast.kv.ops import copy_pages, copy_pages_reference, native_available, write_kv, write_kv_reference

_C = pytest.importorskip("arbitrage_fast._C", reason="native extension not built")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SPECS = [KVSpec(2, 2, 8), KVSpec(3, 4, 16)]  # draft, target: different per-token KV sizes


def random_case(seed: int, dtype: torch.dtype, device: str = "cpu", num_pages: int = 6):
    """An arena filled with noise, one model's view of it, and a batch of K/V with some padding."""
    g = torch.Generator().manual_seed(seed)
    cache = PagedKVCache(SPECS, num_pages, dtype, device, min_block_size=int(torch.randint(1, 5, (1,), generator=g)))
    cache.arena.copy_(torch.randn(cache.arena.shape, generator=g).to(dtype))
    model = seed % len(SPECS)
    spec, bs = SPECS[model], cache.block_size(model)
    n = int(torch.randint(0, num_pages * bs + 1, (1,), generator=g))
    slots = torch.randperm(num_pages * bs, generator=g)[:n]
    slots[torch.rand(n, generator=g) < 0.25] = -1
    # Transposed storage: head_dim is not the fastest axis, so the strided paths run too.
    shape = (n, spec.num_kv_heads, spec.head_dim)
    if seed % 2:
        key = torch.randn(n, spec.head_dim, spec.num_kv_heads, generator=g).to(dtype).transpose(1, 2)
    else:
        key = torch.randn(shape, generator=g).to(dtype)
    value = torch.randn(n, 2 * spec.num_kv_heads, spec.head_dim, generator=g).to(dtype)[:, ::2]
    layer = int(torch.randint(0, spec.num_layers, (1,), generator=g))
    to = dict(device=device)
    return cache, model, layer, key.to(**to), value.to(**to), slots.to(**to)


def twin(cache: PagedKVCache, model: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy of the arena and the same strided view over it."""
    arena = cache.arena.clone()
    view = cache.view(model)
    return arena, torch.as_strided(arena, view.shape, view.stride())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", range(8))
def test_write_kv_matches_reference(seed, dtype):
    cache, model, layer, key, value, slots = random_case(seed, dtype)
    arena, view = twin(cache, model)
    before = arena.clone()
    torch.ops.arbitrage_fast.write_kv(cache.view(model), layer, key, value, slots)
    write_kv_reference(view, layer, key, value, slots)
    assert torch.equal(cache.arena, arena)
    assert bool((slots < 0).all()) or not torch.equal(arena, before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", range(4))
def test_copy_pages_matches_reference(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    arena = torch.randn(12, 40, generator=g).to(dtype)
    pages = torch.randperm(12, generator=g)
    n = int(torch.randint(0, 7, (1,), generator=g))
    src, dst = pages[:n], pages[6 : 6 + n]
    expected = arena.clone()
    copy_pages_reference(expected, src, dst)
    torch.ops.arbitrage_fast.copy_pages(arena, src, dst)
    assert torch.equal(arena, expected)


def test_dispatch_uses_the_compiled_op_on_cpu():
    assert native_available("cpu")
    cache, model, layer, key, value, slots = random_case(3, torch.float32)
    arena, view = twin(cache, model)
    write_kv(cache.view(model), layer, key, value, slots)
    write_kv_reference(view, layer, key, value, slots)
    assert torch.equal(cache.arena, arena)


def test_bad_arguments_are_refused():
    cache, model, layer, key, value, slots = random_case(0, torch.float32)
    view = cache.view(model)
    with pytest.raises(RuntimeError, match="dtype"):
        write_kv(view, layer, key.half(), value.half(), slots)
    with pytest.raises(RuntimeError, match="layer"):
        write_kv(view, 99, key, value, slots)
    with pytest.raises(RuntimeError, match="int64"):
        write_kv(view, layer, key, value, slots.int())
    bad = slots.clone()
    bad[:1] = cache.num_pages * cache.block_size(model)
    if len(bad):
        with pytest.raises(RuntimeError, match="out of range"):
            write_kv(view, layer, key, value, bad)
    with pytest.raises(RuntimeError, match="out of range"):
        copy_pages(cache.arena, torch.tensor([0]), torch.tensor([cache.num_pages]))


# ---------------------------------------------------------------------- the arena
def test_block_sizes_fill_a_page():
    cache = PagedKVCache(SPECS, 4, torch.float32, "cpu", min_block_size=16)
    assert cache.page_elems == SPECS[1].per_token_elems * 16
    assert cache.block_sizes == [16 * SPECS[1].per_token_elems // SPECS[0].per_token_elems, 16]
    assert cache.block_sizes[0] > cache.block_sizes[1]  # the draft packs more tokens per page
    assert PagedKVCache.num_pages_for_budget(SPECS, 10 * cache.page_bytes + 1, torch.float32) == 10
    with pytest.raises(ValueError, match="holds no page"):
        PagedKVCache.num_pages_for_budget(SPECS, cache.page_bytes - 1, torch.float32)


def test_views_of_both_models_alias_one_arena():
    cache = PagedKVCache(SPECS, 4, torch.float32, "cpu", min_block_size=2)
    draft, target = cache.view(0), cache.view(1)
    assert draft.data_ptr() == target.data_ptr() == cache.arena.data_ptr()
    assert cache.view(0) is draft  # cached
    draft[2].fill_(1.0)
    assert torch.all(cache.arena[2, : draft[2].numel()] == 1.0)
    assert torch.count_nonzero(target[2]) > 0 and torch.count_nonzero(target[1]) == 0
    # The model with the largest per-token KV fills its pages exactly.
    assert target[0].numel() == cache.page_elems


def test_write_kv_for_the_draft_touches_only_its_pages():
    cache = PagedKVCache(SPECS, 8, torch.float32, "cpu", min_block_size=2)
    cache.add_sequence(0)
    cache.add_sequence(1)
    cache.extend(1, 1, 5)            # target pages of another sequence
    cache.extend(0, 0, 7)
    spec = SPECS[0]
    n = 7
    key = torch.randn(n, spec.num_kv_heads, spec.head_dim)
    value = torch.randn(n, spec.num_kv_heads, spec.head_dim)
    write_kv(cache.view(0), 1, key, value, cache.slot_mapping(0, 0, 0, n))
    touched = torch.nonzero(cache.arena.abs().sum(dim=1)).flatten().tolist()
    assert touched == sorted(cache.block_table(0, 0))
    pos = torch.arange(n)
    pages = torch.tensor(cache.block_table(0, 0))[pos // cache.block_size(0)]
    assert torch.equal(cache.view(0)[pages, 1, 0, pos % cache.block_size(0)], key)
    assert torch.equal(cache.view(0)[pages, 1, 1, pos % cache.block_size(0)], value)


def test_fork_then_extend_copies_the_shared_page():
    cache = PagedKVCache(SPECS, 6, torch.float32, "cpu", min_block_size=4)
    bs = cache.block_size(1)
    cache.add_sequence(0)
    cache.extend(0, 1, bs + 1)       # second page holds one token
    cache.arena.copy_(torch.randn(cache.arena.shape))
    cache.fork(0, 1)
    shared = cache.block_table(0, 1)[1]
    copies = cache.extend(1, 1, bs + 2)
    own = cache.block_table(1, 1)[1]
    assert copies == [(shared, own)] and own != shared
    assert torch.equal(cache.arena[own], cache.arena[shared])
    assert cache.block_table(0, 1)[1] == shared


def test_slot_mapping_and_block_table_tensor():
    cache = PagedKVCache(SPECS, 10, torch.float32, "cpu", min_block_size=2)
    bs = cache.block_size(1)
    cache.add_sequence(5)
    cache.add_sequence(6)
    cache.extend(5, 1, 3 * bs)
    cache.extend(6, 1, 1)
    table = cache.block_table(5, 1)
    expected = [table[p // bs] * bs + p % bs for p in range(bs - 1, 2 * bs + 1)]
    assert cache.slot_mapping(5, 1, bs - 1, 2 * bs + 1).tolist() == expected
    assert cache.slot_mapping(5, 1, 2, 2).numel() == 0
    with pytest.raises(ValueError, match="extend first"):
        cache.slot_mapping(6, 1, 0, 2)
    bt = cache.block_table_tensor([5, 6], 1)
    assert bt.dtype == torch.int32 and bt.shape == (2, 3)
    assert bt[0].tolist() == table and bt[1].tolist() == [cache.block_table(6, 1)[0], 0, 0]
    assert cache.block_table_tensor([6], 0).shape == (1, 1)


def test_stats_and_exhaustion_through_the_arena():
    cache = PagedKVCache(SPECS, 3, torch.float16, "cpu", min_block_size=1)
    cache.add_sequence(0)
    cache.extend(0, 1, 2)
    stats = cache.stats()
    assert stats["used_pages"] == 2 and stats["pages_per_model"] == [0, 2]
    assert stats["page_bytes"] == cache.page_elems * 2
    assert stats["used_bytes"] == 2 * stats["page_bytes"] and stats["total_bytes"] == 3 * stats["page_bytes"]
    with pytest.raises(KVCacheExhausted):
        cache.extend(0, 1, 4)
    assert cache.num_tokens(0, 1) == 2
    cache.truncate(0, 1, 1)
    cache.free_sequence(0)
    assert cache.stats()["free_pages"] == 3


# ---------------------------------------------------------------------- the CUDA twin
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", range(8))
def test_cuda_write_kv_matches_reference(seed, dtype):
    assert _C.has_cuda, "torch has CUDA but the extension was built without it"
    cache, model, layer, key, value, slots = random_case(seed, dtype, device="cuda")
    arena, view = twin(cache, model)
    write_kv(cache.view(model), layer, key, value, slots)
    write_kv_reference(view, layer, key, value, slots)
    assert torch.equal(cache.arena, arena)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_copy_pages_matches_reference(dtype):
    arena = torch.randn(16, 1000, device="cuda").to(dtype)
    src, dst = torch.tensor([3, 0, 7], device="cuda"), torch.tensor([9, 12, 15], device="cuda")
    expected = arena.clone()
    copy_pages_reference(expected, src, dst)
    copy_pages(arena, src, dst)
    assert torch.equal(arena, expected)
