"""Fused final RMSNorm + router first layer: the Triton kernel against the torch reference
over several decode iterations (the running sums must accumulate), and the reference
against transformers' LlamaRMSNorm and the router's definition written out densely."""
import math

import pytest
import torch

from helpers.triton_kernels import DEVICE, load_kernel, needs_triton as _needs_triton

rh = load_kernel("router_head")
needs_triton = _needs_triton(rh)
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


class _State:
    """Router inputs and the in-place buffers one decode loop carries between iterations."""

    def __init__(self, B, Hd, F, dtype, device, seed, count_dtype=torch.float32):
        g = torch.Generator().manual_seed(seed)
        self.norm_weight = (1 + 0.3 * torch.randn(Hd, generator=g)).to(dtype).to(device)
        self.w_last = (torch.randn(F, Hd, generator=g) / math.sqrt(Hd)).to(device)
        self.w_mean = (torch.randn(F, Hd, generator=g) / math.sqrt(Hd)).to(device)
        self.h_sum = torch.zeros(B, Hd, device=device)
        self.count = torch.zeros(B, dtype=count_dtype, device=device)
        self.out_hidden = torch.empty(B, Hd, dtype=dtype, device=device)
        self.out_pre = torch.empty(B, F, device=device)

    def step(self, fn, x, eps):
        fn(x, self.norm_weight, eps, self.w_last, self.w_mean, self.h_sum, self.count,
           self.out_hidden, self.out_pre)


def test_rms_norm_reference_is_llama_rms_norm():
    LlamaRMSNorm = pytest.importorskip("transformers.models.llama.modeling_llama").LlamaRMSNorm
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        norm = LlamaRMSNorm(48, eps=1e-6).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(1 + 0.5 * torch.randn(48))
        x = (3 * torch.randn(5, 48)).to(dtype)
        assert torch.equal(rh.rms_norm_reference(x, norm.weight.data, 1e-6), norm(x).detach())


def test_reference_running_features_match_definition():
    B, Hd, F, T = 3, 24, 8, 4
    st = _State(B, Hd, F, torch.float32, "cpu", seed=0)
    xs = [torch.randn(B, Hd) for _ in range(T)]
    hs = []
    for x in xs:
        st.step(rh.fused_norm_router_reference, x, 1e-5)
        hs.append(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * st.norm_weight)
    h_last, h_mean = hs[-1], torch.stack(hs).mean(0)
    torch.testing.assert_close(st.out_hidden, h_last)
    torch.testing.assert_close(st.out_pre, h_last @ st.w_last.T + h_mean @ st.w_mean.T)
    assert st.count.tolist() == [T] * B


def test_epilogue_reference_is_the_router_mlp():
    B, F = 4, 6
    g = torch.Generator().manual_seed(3)
    out_pre, w_scalar = torch.randn(B, F, generator=g), torch.randn(F, 5, generator=g)
    b1, w2, b2 = torch.randn(F, generator=g), torch.randn(F, generator=g), 0.25
    lp, ent = -torch.rand(B, generator=g), torch.rand(B, generator=g)
    n = torch.tensor([1, 5, 17, 200])
    lp_min, ent_max = lp - torch.rand(B, generator=g), ent + torch.rand(B, generator=g)
    got = rh.router_epilogue_reference(out_pre, w_scalar, b1, w2, b2, lp, ent, n, lp_min, ent_max)
    for b in range(B):
        z = [out_pre[b, f] + w_scalar[f, 0] * lp[b] + w_scalar[f, 1] * ent[b]
             + w_scalar[f, 2] * math.log1p(int(n[b])) + w_scalar[f, 3] * lp_min[b] + w_scalar[f, 4] * ent_max[b]
             + b1[f] for f in range(F)]
        logit = sum(float(w2[f]) * float(z[f]) / (1 + math.exp(-float(z[f]))) for f in range(F)) + b2
        assert got[b].item() == pytest.approx(1 / (1 + math.exp(-logit)), rel=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
# The second case spans two hidden-size chunks with a ragged tail (F=100 pads to 128 rows).
@pytest.mark.parametrize("B,Hd,F,count_dtype", [(3, 40, 32, torch.float32), (2, 96, 100, torch.int32)])
def test_kernel_matches_reference_over_decode_iterations(dtype, B, Hd, F, count_dtype):
    ref = _State(B, Hd, F, dtype, DEVICE, seed=1, count_dtype=count_dtype)
    fast = _State(B, Hd, F, dtype, DEVICE, seed=1, count_dtype=count_dtype)
    g = torch.Generator().manual_seed(2)
    for it in range(3):
        x = (2 * torch.randn(B, Hd, generator=g)).to(dtype).to(DEVICE)
        if it == 2:  # a step restarts for row 0 (the caller zeroes its running features)
            for st in (ref, fast):
                st.h_sum[0].zero_()
                st.count[0] = 0
        ref.step(rh.fused_norm_router_reference, x, 1e-6)
        fast.step(rh.fused_norm_router_triton, x, 1e-6)
        tol = TOL[dtype]
        torch.testing.assert_close(fast.out_hidden, ref.out_hidden, atol=tol, rtol=tol)
        if dtype != torch.float32:  # the LlamaRMSNorm rounding order: casting late flips ~25%
            assert (fast.out_hidden == ref.out_hidden).float().mean() > 0.99
        torch.testing.assert_close(fast.h_sum, ref.h_sum, atol=tol, rtol=tol)
        torch.testing.assert_close(fast.out_pre, ref.out_pre, atol=tol, rtol=tol)
        assert torch.equal(fast.count, ref.count)
    assert fast.count.tolist() == [1, 3, 3][:B]


@needs_triton
def test_kernel_reads_strided_rows():
    B, Hd, F = 2, 33, 16
    ref, fast = (_State(B, Hd, F, torch.float32, DEVICE, seed=4) for _ in range(2))
    x = torch.randn(B, 2 * Hd, device=DEVICE)[:, :Hd]  # e.g. a slice of a wider buffer
    ref.step(rh.fused_norm_router_reference, x, 1e-5)
    fast.step(rh.fused_norm_router_triton, x, 1e-5)
    torch.testing.assert_close(fast.out_pre, ref.out_pre, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.out_hidden, ref.out_hidden, atol=1e-6, rtol=1e-6)


@needs_triton
def test_shape_errors_name_the_argument():
    st = _State(2, 16, 8, torch.float32, "cpu", seed=0)
    with pytest.raises(ValueError, match="w_last"):
        rh.fused_norm_router_triton(torch.randn(2, 16), st.norm_weight, 1e-6, st.w_last.half(), st.w_mean,
                                    st.h_sum, st.count, st.out_hidden, st.out_pre)
