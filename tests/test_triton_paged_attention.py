"""Paged attention: the references against dense SDPA over K/V copied out token by token,
then the Triton decode and prefill kernels against the references, on strided views of a
shared arena as the engine uses them."""
import pytest
import torch
import torch.nn.functional as F

from helpers.triton_kernels import DEVICE, load_kernel, needs_triton as _needs_triton

pa = load_kernel("paged_attention")
needs_triton = _needs_triton(pa)
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _arena(pages, block_size, kv_heads, head_dim, dtype=torch.float32, device="cpu", seed=0, layers=3):
    """K and V caches of layer 1 as the engine sees them: strided slices of one arena."""
    g = torch.Generator().manual_seed(seed)
    arena = torch.randn(pages, layers, 2, block_size, kv_heads, head_dim, generator=g).to(dtype).to(device)
    return arena[:, 1, 0], arena[:, 1, 1]


def _tables(seq_lens, block_size, pages, seed=0, width=None):
    """Random disjoint pages per sequence; unused entries hold 0, as the engine pads them."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in seq_lens]
    width = width or max(max(need), 1)
    perm = torch.randperm(pages, generator=g).tolist()
    table = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    for b, k in enumerate(need):
        table[b, :k] = torch.tensor(perm[:k], dtype=torch.int32)
        perm = perm[k:]
    return table


def _dense_kv(cache, table_row, length):
    """K or V of one sequence copied token by token: the definition of the block table."""
    bs = cache.shape[1]
    rows = [cache[int(table_row[n // bs]), n % bs] for n in range(length)]
    return torch.stack(rows) if rows else cache.new_zeros(0, *cache.shape[2:])


def _sdpa(q, k, v, mask, scale):
    """q [T, Hq, D], k/v [S, Hkv, D] -> [T, Hq, D] via torch's SDPA in fp32."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.float().repeat_interleave(group, 1).transpose(0, 1) for t in (k, v))
    out = F.scaled_dot_product_attention(q.float().transpose(0, 1), k, v, attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


def _on(device, *ts):
    return tuple(t.to(device) for t in ts)


# --------------------------------------------------------------------------- references

def test_decode_reference_matches_dense_sdpa():
    bs, Hkv, G, D = 4, 2, 3, 8
    seq_lens = [9, 1, 0, 16]
    kc, vc = _arena(20, bs, Hkv, D)
    table = _tables(seq_lens, bs, 20)
    q = torch.randn(len(seq_lens), Hkv * G, D)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    out = pa.paged_decode_attention_reference(q, kc, vc, table, lens, 0.3)
    for b, n in enumerate(seq_lens):
        if n == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b]))
            continue
        want = _sdpa(q[b:b + 1], _dense_kv(kc, table[b], n), _dense_kv(vc, table[b], n), None, 0.3)
        torch.testing.assert_close(out[b], want[0], atol=1e-6, rtol=1e-5)


def test_prefill_reference_matches_dense_causal_sdpa():
    bs, Hkv, G, D = 3, 1, 4, 8
    seq_lens, q_lens = [10, 5, 7], [3, 5, 0]  # a verification run, a full prefill, an idle row
    kc, vc = _arena(16, bs, Hkv, D, seed=1)
    table = _tables(seq_lens, bs, 16, seed=1)
    cu = torch.tensor([0, 3, 8, 8])
    q = torch.randn(8, Hkv * G, D)
    out = pa.paged_prefill_attention_reference(q, kc, vc, table, cu, torch.tensor(seq_lens), 0.5)
    for b, (n, m) in enumerate(zip(seq_lens, q_lens)):
        if m == 0:
            continue
        qb = q[int(cu[b]):int(cu[b + 1])]
        mask = torch.arange(n)[None, :] <= torch.arange(n - m, n)[:, None]
        want = _sdpa(qb, _dense_kv(kc, table[b], n), _dense_kv(vc, table[b], n), mask, 0.5)
        torch.testing.assert_close(out[int(cu[b]):int(cu[b + 1])], want, atol=1e-6, rtol=1e-5)
    full = slice(3, 8)  # q_len == seq_len: plain causal self-attention
    k, v = _dense_kv(kc, table[1], 5), _dense_kv(vc, table[1], 5)
    g = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(g, 1).transpose(0, 1) for t in (k, v))
    want = F.scaled_dot_product_attention(q[full].transpose(0, 1), k, v, is_causal=True, scale=0.5)
    want = want.transpose(0, 1)
    torch.testing.assert_close(out[full], want, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- kernels

DECODE_CASES = [
    # block_size, kv_heads, group, head_dim, seq_lens, num_splits
    (5, 2, 3, 24, [7, 0, 150], 1),    # odd block size and head_dim, an empty slot, GQA of 3
    (16, 1, 4, 64, [40, 300], 2),     # split-K merge over splits of several tiles
    (3, 2, 1, 16, [1, 70, 0, 9], 4),  # MHA; more splits than tiles; an empty slot in the merge
    (8, 1, 2, 256, [70], 1),          # the widest head
]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bs,Hkv,G,D,seq_lens,splits", DECODE_CASES)
def test_decode_kernel_matches_reference(dtype, bs, Hkv, G, D, seq_lens, splits):
    pages = sum(-(-n // bs) for n in seq_lens) + 3
    kc, vc = _arena(pages, bs, Hkv, D, dtype, DEVICE, seed=bs)
    assert kc.stride(0) != bs * Hkv * D  # the page stride spans all layers
    table = _tables(seq_lens, bs, pages, seed=D, width=-(-max(seq_lens) // bs) + 2).to(DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(len(seq_lens), Hkv * G, D, generator=torch.Generator().manual_seed(G))
    q = q.to(dtype).to(DEVICE)
    scale = D ** -0.5
    want = pa.paged_decode_attention_reference(q, kc, vc, table, lens, scale)
    got = pa.paged_decode_attention_triton(q, kc, vc, table, lens, scale, num_splits=splits)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])
    for b, n in enumerate(seq_lens):
        if n == 0:
            assert not got[b].any()


@needs_triton
def test_decode_kernel_reads_strided_queries():
    bs, Hkv, G, D = 4, 2, 2, 16
    kc, vc = _arena(8, bs, Hkv, D, device=DEVICE)
    table = _tables([13, 6], bs, 8).to(DEVICE)
    lens = torch.tensor([13, 6], dtype=torch.int32, device=DEVICE)
    qkv = torch.randn(2, Hkv * G * D + 2 * Hkv * D, device=DEVICE)  # q sliced out of a fused qkv row
    q = qkv[:, :Hkv * G * D].view(2, Hkv * G, D)
    want = pa.paged_decode_attention_reference(q, kc, vc, table, lens, 0.25)
    got = pa.paged_decode_attention_triton(q, kc, vc, table, lens, 0.25, num_splits=1)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


PREFILL_CASES = [
    # block_size, kv_heads, group, head_dim, seq_lens, q_lens
    (5, 2, 3, 24, [12, 6, 9], [4, 6, 0]),   # verification of 4 tokens, a full prefill, an idle row
    (16, 1, 1, 32, [150, 3], [20, 1]),      # several key tiles; a decode-like row
]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bs,Hkv,G,D,seq_lens,q_lens", PREFILL_CASES)
def test_prefill_kernel_matches_reference(dtype, bs, Hkv, G, D, seq_lens, q_lens):
    pages = sum(-(-n // bs) for n in seq_lens) + 2
    kc, vc = _arena(pages, bs, Hkv, D, dtype, DEVICE, seed=3)
    table = _tables(seq_lens, bs, pages, seed=4).to(DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE)
    q = torch.randn(sum(q_lens), Hkv * G, D, generator=torch.Generator().manual_seed(5)).to(dtype).to(DEVICE)
    want = pa.paged_prefill_attention_reference(q, kc, vc, table, cu, lens, 0.2)
    got = pa.paged_prefill_attention_triton(q, kc, vc, table, cu, lens, 0.2)
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_split_choice_grows_only_when_the_batch_cannot_fill_the_device(monkeypatch):
    monkeypatch.setattr(pa, "num_sms", lambda index: 132)
    cuda = torch.device("cuda", 0)
    assert pa.choose_num_splits(64, 8, 32768, cuda) == 1       # 512 programs already
    assert pa.choose_num_splits(1, 2, 32768, cuda) == 16       # long context, tiny batch
    assert pa.choose_num_splits(1, 2, 300, cuda) == 1          # too short to be worth a merge
    assert pa.choose_num_splits(4, 4, 1024, cuda) == 4         # bounded by the context


def test_errors_name_the_mismatch():
    kc, vc = _arena(4, 4, 2, 8)
    table, lens = _tables([3], 4, 4), torch.tensor([3], dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        pa._check(torch.randn(1, 3, 8), kc, vc, table, lens)
    with pytest.raises(ValueError, match="share a dtype"):
        pa._check(torch.randn(1, 4, 8).half(), kc, vc, table, lens)
