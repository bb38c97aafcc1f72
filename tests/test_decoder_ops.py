"""The compiled CPU kernels of a decoder layer's ops (csrc/decoder_ops.cpp,
csrc/paged_attention_cpu.cpp) against their torch twins, and the rule that picks them: RoPE + KV
write is the twin bit for bit, so it always runs; the norm, SiLU-mul and paged attention sum or
round within ulps of the twin, so they run only where the model gave up transformers' exact
arithmetic (packed or quantized weights)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from arbitrage_fast.kv import KVSpec, PagedKVCache
from arbitrage_fast.models.attention import PagedAttention
from arbitrage_fast.models.layers import GatedMLP, RMSNorm
from arbitrage_fast.models.loader import load_model
from helpers.gguf_files import greedy, teacher_forced
from helpers.tiny_models import build_tiny_lm
from helpers.triton_kernels import load_kernel

pytest.importorskip("arbitrage_fast._C", reason="native extension not built")
ops = torch.ops.arbitrage_fast
act, norm, rope = load_kernel("activation"), load_kernel("rms_norm"), load_kernel("rotary_kv")
attn = load_kernel("paged_attention")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# The kernels' only departures from the twins, per dtype: the norm's rstd (fp32 sum of squares in
# double, torch's in fp32: an ulp or two of fp32 in the scale, which two more roundings, the
# scaled row's and the weight product's, carry to at most 4 ulp of an fp32 result, and which can
# move a 16-bit result by one of its ulps), and exp (a polynomial within 2 ulp of fp32).
NORM_RTOL = {torch.float32: 2 ** -21, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))).to(dtype)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 7), hq=st.integers(1, 4), group=st.integers(1, 3), half=st.integers(1, 9),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 10 ** 6))
def test_rope_write_kv_kernel_is_the_twin_bit_for_bit(T, hq, group, half, dtype, seed):
    D, hkv = 2 * half, hq
    hq = hkv * group
    g = torch.Generator().manual_seed(seed)
    # q, k, v as strided slices of one fused projection's output, as the attention layer passes them.
    qkv = torch.randn(T, (hq + 2 * hkv) * D, generator=g).to(dtype)
    q, k, v = qkv.split([hq * D, hkv * D, hkv * D], dim=-1)
    q, k, v = q.view(T, hq, D), k.view(T, hkv, D), v.view(T, hkv, D)
    cos, sin = torch.randn(T, D, generator=g).to(dtype), torch.randn(T, D, generator=g).to(dtype)
    arena = PagedKVCache([KVSpec(2, hkv, D)], 4, dtype, "cpu", min_block_size=4)
    cache = arena.view(0)
    cache.copy_(torch.randn(cache.shape, generator=g).to(dtype))
    slots = torch.randperm(4 * arena.block_size(0), generator=g)[:T]
    slots[torch.rand(T, generator=g) < 0.3] = -1
    want_cache = cache.clone()
    want = rope.rope_write_kv_reference(q, k, v, cos, sin, want_cache, 1, slots)
    got = ops.rope_write_kv(q, k, v, cos, sin, cache, 1, slots)
    assert torch.equal(got, want)
    assert torch.equal(cache, want_cache)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rms_norm_kernel_within_an_ulp_of_the_twin(dtype, with_residual):
    x, res = _randn(9, 896, dtype=dtype, seed=1), _randn(9, 896, dtype=dtype, seed=2, scale=4)
    w = (1 + 0.5 * _randn(896, seed=3)).to(dtype)
    residual = res if with_residual else None
    normed, stream = ops.add_rms_norm(x, residual, w, 1e-6)
    want_normed, want_stream = norm.add_rms_norm_reference(x, residual, w, 1e-6)
    assert torch.equal(stream, want_stream)  # the add rounds as torch's does
    torch.testing.assert_close(normed, want_normed, rtol=NORM_RTOL[dtype], atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_kernel_within_ulps_of_the_twin(dtype):
    # Wide enough for the vector loop and its scalar tail; gates from -100 (exp clamped) to 100.
    gate_up = torch.cat([_randn(3, 1003, seed=4, scale=8), torch.linspace(-100, 100, 3009).reshape(3, 1003)], 1)
    gate_up = gate_up.to(dtype)
    got, want = ops.silu_and_mul(gate_up), act.silu_and_mul_reference(gate_up)
    rtol = 5e-7 if dtype == torch.float32 else {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]
    torch.testing.assert_close(got, want, rtol=rtol, atol=1e-30)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_silu_and_mul_16_bit_vector_loop_rounds_as_torch(dtype):
    """The 16-bit rows run the vector loop too (widened to fp32, the silu rounded to the dtype
    before the product, the product rounded to nearest even): almost every value is torch's bit
    for bit, none is more than one ulp away (the polynomial exp can tip a rounding), and NaN
    and infinite gates come out as torch's do."""
    gate_up = _randn(16, 2 * 4864, seed=7, scale=4).to(dtype)
    gate_up[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0])
    got, want = ops.silu_and_mul(gate_up), act.silu_and_mul_reference(gate_up)
    assert torch.equal(got.isnan(), want.isnan())
    finite = ~want.isnan()
    bits = lambda t: t[finite].view(torch.int16).to(torch.int32)  # noqa: E731 - same-sign ulps apart
    assert (bits(got) - bits(want)).abs().max() <= 1
    assert (got[finite] == want[finite]).float().mean() > 0.99


@settings(max_examples=40, deadline=None)
@given(data=st.data(), hkv=st.integers(1, 3), group=st.sampled_from([1, 2, 7]), D=st.sampled_from([8, 24, 64, 128]),
       bs=st.sampled_from([1, 3, 16]), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 10 ** 6))
def test_paged_attention_kernel_matches_the_twin(data, hkv, group, D, bs, dtype, seed):
    """Prefill chunks, verification rows and decode rows mixed, over shuffled pages of a strided
    layer view: the compiled kernel (AVX2 at head_dim 64/128, 16-bit caches widened to fp32; portable otherwise)
    against the fp32 twin."""
    g = torch.Generator().manual_seed(seed)
    seq_lens = data.draw(st.lists(st.integers(1, 90), min_size=1, max_size=4))
    q_lens = [data.draw(st.integers(0, min(n, 9))) for n in seq_lens]
    pages_of = [-(-n // bs) for n in seq_lens]
    P = sum(pages_of) + 2
    arena = torch.randn(P, 2, 2, bs, hkv, D, generator=g).to(dtype)  # [pages, layers, k/v, ...]
    k_cache, v_cache = arena[:, 1, 0], arena[:, 1, 1]
    perm = torch.randperm(P, generator=g).int()
    tables = torch.zeros(len(seq_lens), max(pages_of), dtype=torch.int32)
    start = 0
    for b, n in enumerate(pages_of):
        tables[b, :n] = perm[start:start + n]
        start += n
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    q = torch.randn(int(cu[-1]), hkv * group, D, generator=g).to(dtype)
    got = ops.paged_attention(q, k_cache, v_cache, tables, cu, lens, D ** -0.5)
    want = attn.paged_prefill_attention_reference(q, k_cache, v_cache, tables, cu, lens, D ** -0.5)
    # fp32 sums in another order (1e-5 of outputs of size ~1); a 16-bit output may round one ulp away.
    tol = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_paged_attention_refuses_bad_tables():
    q, cache = torch.randn(2, 2, 8), torch.randn(3, 4, 1, 8)
    tables, lens = torch.tensor([[0, 5]], dtype=torch.int32), torch.tensor([6], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="names page 5 of 3"):
        ops.paged_attention(q, cache, cache, tables, torch.tensor([0, 2], dtype=torch.int32), lens, 0.3)
    with pytest.raises(RuntimeError, match="cu_query_lens must run from 0 to 2"):
        ops.paged_attention(q, cache, cache, tables, torch.tensor([0, 1], dtype=torch.int32), lens, 0.3)
    with pytest.raises(RuntimeError, match="has 2 queries over 1 cached tokens"):
        ops.paged_attention(q, cache, cache, tables, torch.tensor([0, 2], dtype=torch.int32),
                            torch.tensor([1], dtype=torch.int32), 0.3)


def test_the_kernels_name_what_is_wrong():
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match=r"weight must be \[8\]"):
        ops.add_rms_norm(x, None, torch.ones(7), 1e-6)
    with pytest.raises(RuntimeError, match="residual must match x"):
        ops.add_rms_norm(x, torch.randn(2, 8, dtype=torch.bfloat16), torch.ones(8), 1e-6)
    with pytest.raises(RuntimeError, match="gate_up must be"):
        ops.silu_and_mul(torch.randn(2, 7))
    q, k = torch.randn(2, 2, 8), torch.randn(2, 1, 8)
    cache = torch.zeros(2, 1, 2, 4, 1, 8)
    with pytest.raises(RuntimeError, match=r"cos and sin must be \[2, 8\]"):
        ops.rope_write_kv(q, k, k, torch.randn(2, 6), torch.randn(2, 6), cache, 0, torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="every input must be"):
        ops.rope_write_kv(q, k, k, torch.randn(2, 8).double(), torch.randn(2, 8), cache, 0, torch.tensor([0, 1]))


def test_meta_kernels_give_the_shapes():
    x = torch.empty(3, 16, device="meta")
    normed, stream = ops.add_rms_norm(x, x, torch.empty(16, device="meta"), 1e-6)
    assert normed.shape == stream.shape == (3, 16)
    assert ops.silu_and_mul(torch.empty(3, 16, device="meta")).shape == (3, 8)


def test_the_ops_take_the_kernels_only_where_allowed(monkeypatch):
    calls = []

    def recorder(name):
        real = getattr(ops, name)
        return lambda *a: calls.append(name) or real(*a)

    for name in ("add_rms_norm", "silu_and_mul", "paged_attention"):
        monkeypatch.setattr(torch.ops.arbitrage_fast, name, recorder(name), raising=False)
    x, w = torch.randn(2, 8), torch.ones(8)
    q, cache = torch.randn(2, 2, 8), torch.randn(3, 4, 1, 8)
    tables, lens = torch.tensor([[0], [2]], dtype=torch.int32), torch.tensor([3, 2], dtype=torch.int32)
    cu = torch.tensor([0, 1, 2], dtype=torch.int32)

    def run(**kw):
        norm.add_rms_norm(x, x, w, 1e-6, **kw)
        act.silu_and_mul(torch.randn(2, 8), **kw)
        attn.paged_decode_attention(q, cache, cache, tables, lens, 0.3, **kw)
        attn.paged_prefill_attention(q, cache, cache, tables, cu, lens, 0.3, **kw)

    run()
    assert calls == []  # exact (the default): the twins
    run(exact=False)
    assert calls == ["add_rms_norm", "silu_and_mul", "paged_attention", "paged_attention"]
    normed, stream = norm.add_rms_norm(x, None, w, 1e-6, exact=False)
    assert stream is x  # the twin's contract: without a residual the stream is x itself


def test_set_exact_arithmetic_reaches_every_norm_and_mlp_and_stays_close(tmp_path):
    loaded = load_model(build_tiny_lm(tmp_path / "lm", "qwen2", hidden=64, layers=2), "float32")
    model, spec = loaded.model, loaded.spec
    parts = [m for m in model.modules() if isinstance(m, (RMSNorm, GatedMLP, PagedAttention))]
    assert len(parts) == 2 * 4 + 1 and all(m.exact for m in parts)  # a float checkpoint: exact
    prompt = loaded.tokenizer("We compute 12 + 30 = 42.\n\nThen")["input_ids"]
    tokens, exact = greedy(model, spec, prompt, 8, torch.float32)
    model.set_exact_arithmetic(False)
    assert not any(m.exact for m in parts)
    torch.testing.assert_close(teacher_forced(model, spec, prompt, tokens, torch.float32), exact,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("exact", [None, False, True])
def test_engine_config_chooses_the_arithmetic_of_both_models(tmp_path, exact):
    """EngineConfig(exact_arithmetic=...) overrides the loader's choice for draft and target; the
    compiled kernels' answers equal the exact ones on models whose argmaxes are far from ties."""
    from arbitrage_fast import Engine, EngineConfig, SamplingParams

    draft = build_tiny_lm(tmp_path / "d", "qwen2", hidden=64, layers=2, seed=1)
    target = build_tiny_lm(tmp_path / "t", "qwen2", hidden=64, layers=2, seed=2)
    engine = Engine(EngineConfig(draft=str(draft), target=str(target), kv_pages=64, exact_arithmetic=exact))
    for lm in (engine.draft_model, engine.target_model):
        parts = [m for m in lm.model.modules() if isinstance(m, (RMSNorm, GatedMLP, PagedAttention))]
        assert all(m.exact is (exact is not False) for m in parts)  # None: a float checkpoint stays exact
    reference = Engine(EngineConfig(draft=str(draft), target=str(target), kv_pages=64))
    sp = SamplingParams(max_new_tokens=16)
    assert (engine.generate("We compute 12 + 30", policy="rsd", threshold=0.5, sampling=sp).token_ids
            == reference.generate("We compute 12 + 30", policy="rsd", threshold=0.5, sampling=sp).token_ids)
    with pytest.raises(ValueError, match="exact_arithmetic must be None, True or False"):
        EngineConfig(draft=str(draft), target=str(target), exact_arithmetic="fast")
