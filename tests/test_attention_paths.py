"""The attention layer's two paths agree: the paged kernel ops (what CUDA runs for every layer
without a sliding window, prefill included) against SDPA over gathered pages (what the CPU runs
for host-form batches), on one mixed batch of a verification run, a full prefill and a decode
row. The ops are called through their torch twins, through the compiled CPU kernel (a layer
with exact arithmetic off) and, where Triton can run, through the Triton launchers themselves,
so the layer's arguments to the kernels are checked too."""
from __future__ import annotations

import pytest
import torch

from arbitrage_fast.kv.ops import native_available
from arbitrage_fast.models import attention
from arbitrage_fast.runtime.attention_metadata import AttentionMetadata
from helpers.triton_kernels import load_kernel

pa = load_kernel("paged_attention")
LAYER, BS, HKV, GROUP, D = 1, 4, 2, 2, 16


def _batch(q_lens, seq_lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = attention.PagedAttention(LAYER, 32, HKV * GROUP, HKV, D, qkv_bias=False, o_bias=False,
                                     sliding_window=None)
    pages = sum(-(-n // BS) for n in seq_lens) + 1
    kv = torch.randn(pages, 2, 2, BS, HKV, D, generator=g)
    perm = torch.randperm(pages, generator=g).tolist()
    width = max(-(-n // BS) for n in seq_lens)
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    for b, n in enumerate(seq_lens):
        k = -(-n // BS)
        tables[b, :k] = torch.tensor(perm[:k], dtype=torch.int32)
        perm = perm[k:]
    positions = torch.cat([torch.arange(n - q, n) for q, n in zip(q_lens, seq_lens)])
    meta = AttentionMetadata(positions=positions, slot_mapping=torch.full_like(positions, -1), block_tables=tables,
                             query_lens=q_lens, seq_lens=seq_lens, block_size=BS)
    q = torch.randn(sum(q_lens), HKV * GROUP, D, generator=g)
    return layer, q, kv[:, LAYER, 0], kv[:, LAYER, 1], meta


CASES = {"mixed prefill": ([3, 9, 1], [10, 9, 6]), "decode": ([1, 1], [7, 13])}


@pytest.mark.parametrize("q_lens, seq_lens", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("impl", ["torch twin", "triton", "compiled cpu kernel"])
def test_paged_path_matches_sdpa_path(q_lens, seq_lens, impl, monkeypatch):
    if impl == "triton":
        if not pa.triton_usable(torch.empty(0)):
            pytest.skip("Triton cannot run here (not installed, or imported without TRITON_INTERPRET=1)")
        # The launchers as the ops (`exact` only chooses among CPU paths).
        monkeypatch.setattr(attention, "paged_decode_attention",
                            lambda *a, exact=True, **k: pa.paged_decode_attention_triton(*a, **k))
        monkeypatch.setattr(attention, "paged_prefill_attention",
                            lambda *a, exact=True, **k: pa.paged_prefill_attention_triton(*a, **k))
    layer, q, k_cache, v_cache, meta = _batch(q_lens, seq_lens)
    if impl == "compiled cpu kernel":
        if not native_available("cpu"):
            pytest.skip("native extension not built")
        layer.exact = False
    want = layer._torch_attention(q, k_cache, v_cache, meta)
    got = layer._paged_attention(q, k_cache, v_cache, meta)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_cpu_host_batches_take_sdpa(monkeypatch):
    """Greedy equality with transformers on the CPU rests on SDPA's arithmetic."""
    layer, q, k_cache, v_cache, meta = _batch(*CASES["mixed prefill"])
    monkeypatch.setattr(layer, "_paged_attention", lambda *a: pytest.fail("CPU host batch took the paged ops"))
    kv = torch.zeros(k_cache.shape[0], 2, 2, BS, HKV, D)
    layer(torch.randn(q.shape[0], 32), torch.ones(q.shape[0], D), torch.zeros(q.shape[0], D), meta, kv)
