"""The decode path's fused kernels against their torch twins (Triton's interpreter on a CPU):
residual add + RMSNorm, RoPE + paged KV write, SiLU * mul. The twins are checked against the
unfused torch they replace (transformers' arithmetic), bit for bit, since the CPU runs them."""
import pytest
import torch
import torch.nn.functional as F

from helpers.triton_kernels import DEVICE, load_kernel, needs_triton as _needs_triton

act = load_kernel("activation")
norm = load_kernel("rms_norm")
rope = load_kernel("rotary_kv")
needs_triton = _needs_triton(load_kernel("_utils"))
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))).to(dtype)


# --------------------------------------------------------------------------- twins vs unfused torch

def test_add_rms_norm_twin_is_the_residual_add_then_llama_rms_norm():
    LlamaRMSNorm = pytest.importorskip("transformers.models.llama.modeling_llama").LlamaRMSNorm
    for dtype in (torch.float32, torch.bfloat16):
        layer = LlamaRMSNorm(40, eps=1e-6).to(dtype)
        with torch.no_grad():
            layer.weight.copy_(1 + 0.5 * torch.randn(40))
        x, res = _randn(3, 40, dtype=dtype, seed=1), _randn(3, 40, dtype=dtype, seed=2, scale=4)
        normed, stream = norm.add_rms_norm_reference(x, res, layer.weight.data, 1e-6)
        assert torch.equal(stream, res + x)
        assert torch.equal(normed, layer(res + x).detach())
        normed, stream = norm.add_rms_norm_reference(x, None, layer.weight.data, 1e-6)
        assert stream is x and torch.equal(normed, layer(x).detach())


def test_silu_and_mul_twin_is_swiglu():
    x = _randn(3, 2 * 24, seed=3)
    assert torch.equal(act.silu_and_mul_reference(x), F.silu(x[:, :24]) * x[:, 24:])


def test_rope_twin_is_transformers_rotary():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    T, H, D = 4, 3, 8
    q, k = _randn(T, H, D, seed=4), _randn(T, H, D, seed=5)
    cos, sin = _randn(T, D, seed=6), _randn(T, D, seed=7)
    # transformers: [batch, heads, T, D] with cos/sin [batch, T, D]
    want_q, want_k = llama.apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    assert torch.equal(rope.apply_rotary(q, cos, sin), want_q[0].transpose(0, 1))
    assert torch.equal(rope.apply_rotary(k, cos, sin), want_k[0].transpose(0, 1))


# --------------------------------------------------------------------------- kernels vs twins

@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [48, 20000])  # one tile; a row over two tiles
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rms_norm_kernel_matches_twin(dtype, hidden, with_residual):
    T = 3 if hidden < 1000 else 1
    x = _randn(T, hidden, dtype=dtype, seed=8).to(DEVICE)
    res = _randn(T, hidden, dtype=dtype, seed=9, scale=3).to(DEVICE) if with_residual else None
    w = (1 + 0.3 * _randn(hidden, seed=10)).to(dtype).to(DEVICE)
    want_out, want_res = norm.add_rms_norm_reference(x, res, w, 1e-5)
    got_out, got_res = norm.add_rms_norm_triton(x, res, w, 1e-5)
    assert torch.equal(got_res, want_res)  # the add rounds once in both
    torch.testing.assert_close(got_out, want_out, atol=TOL[dtype], rtol=TOL[dtype])


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_kernel_matches_twin(dtype):
    x = _randn(3, 2 * 40, dtype=dtype, seed=11, scale=3).to(DEVICE)
    torch.testing.assert_close(act.silu_and_mul_triton(x), act.silu_and_mul_reference(x),
                               atol=TOL[dtype], rtol=TOL[dtype])


def _rope_case(dtype, T=3, Hq=4, Hkv=2, D=8, pages=4, layers=2, bs=4, seed=12):
    qkv = _randn(T, (Hq + 2 * Hkv) * D, dtype=dtype, seed=seed).to(DEVICE)  # the fused projection's output
    q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
    q, k, v = q.view(T, Hq, D), k.view(T, Hkv, D), v.view(T, Hkv, D)
    pos = torch.tensor([5, 0, 9][:T], dtype=torch.float32)[:, None] * torch.linspace(1, 0.01, D // 2)
    emb = torch.cat((pos, pos), dim=-1)
    cos, sin = emb.cos().to(dtype).to(DEVICE), emb.sin().to(dtype).to(DEVICE)
    cache = torch.zeros(pages, layers, 2, bs, Hkv, D, dtype=dtype, device=DEVICE)
    slots = torch.tensor([13, -1, 2][:T], dtype=torch.long, device=DEVICE)  # -1: a padding row
    return q, k, v, cos, sin, cache, slots


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_write_kv_kernel_matches_twin(dtype):
    q, k, v, cos, sin, cache, slots = _rope_case(dtype)
    want_cache, got_cache = cache.clone(), cache.clone()
    want_q = rope.rope_write_kv_reference(q, k, v, cos, sin, want_cache, 1, slots)
    got_q = rope.rope_write_kv_triton(q, k, v, cos, sin, got_cache, 1, slots)
    torch.testing.assert_close(got_q, want_q, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(got_cache, want_cache, atol=TOL[dtype], rtol=TOL[dtype])
    assert not got_cache[:, 0].any()  # the other layer is untouched
    assert got_cache[3, 1, :, 1].abs().sum() > 0 and not got_cache[0, 1, :, 1].any()  # slot 13; slot -1 skipped


def test_errors_name_the_mismatch():
    q, k, v, cos, sin, cache, slots = _rope_case(torch.float32)
    with pytest.raises(ValueError, match="slots"):
        rope.rope_write_kv_triton(q, k, v, cos, sin, cache, 1, slots[:2])
    with pytest.raises(ValueError, match="residual"):
        norm.add_rms_norm_triton(torch.zeros(2, 8), torch.zeros(2, 4), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="gate_up"):
        act.silu_and_mul_triton(torch.zeros(2, 7))
