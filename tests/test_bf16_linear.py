"""The engine's bf16 CPU linear (csrc/bf16_linear.cpp): its vector path against its scalar twin
bit for bit, both against an fp64 product within the rounding of fp32 sums, a row's bits
independent of the batch, and the layer swap `pack_linears` makes on CPUs without native bf16."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from arbitrage_fast.models import cpu_linear
from arbitrage_fast.models.cpu_linear import Bf16Linear, kernel_supported, pack_linears, packing_supported

_C = pytest.importorskip("arbitrage_fast._C")
op = torch.ops.arbitrage_fast.bf16_linear
PATHS = cpu_linear.cpu_paths()
needs_avx2 = pytest.mark.skipif("avx2" not in PATHS, reason="the vector path needs AVX2/FMA/F16C")


pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(rows: int, n: int, k: int, seed: int, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, k, generator=gen) * torch.logspace(-2, 1, k)[torch.randperm(k, generator=gen)]).to(dtype)
    w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    return x, w


def _within_fp32_rounding(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """|out - exact| <= K * eps32 * sum|x||w| (the sum's rounding) + half a step of out's dtype."""
    exact = x.double() @ w.double().T
    mag = x.double().abs() @ w.double().abs().T
    step = torch.finfo(out.dtype).eps if out.dtype != torch.float32 else 0.0
    bound = x.shape[1] * torch.finfo(torch.float32).eps * mag + step * exact.abs() + 1e-30
    assert ((out.double() - exact).abs() <= bound).all()


@needs_avx2
@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 19), n=st.integers(1, 21), k=st.integers(1, 70), seed=st.integers(0, 2**16),
       fp32_x=st.booleans())
def test_fuzz_vector_path_is_its_scalar_twin(rows, n, k, seed, fp32_x):
    x, w = _inputs(rows, n, k, seed, torch.float32 if fp32_x else torch.bfloat16)
    out = op(x, w, "avx2")
    assert out.dtype == x.dtype and out.shape == (rows, n)
    assert torch.equal(out, op(x, w, "scalar"))
    _within_fp32_rounding(out, x, w)


@pytest.mark.parametrize("isa", ["scalar", pytest.param("avx2", marks=needs_avx2)])
def test_a_row_gets_the_same_bits_alone_or_in_any_batch(isa):
    x, w = _inputs(21, 37, 136, seed=7)
    alone = torch.cat([op(x[i:i + 1], w, isa) for i in range(21)])
    for rows in (*range(2, 10), 12, 21):  # tiles of 8, 4, 3, 2 and 1 rows, and mixes of them
        assert torch.equal(op(x[:rows], w, isa), alone[:rows]), rows


def test_close_to_torch_and_errors_name_the_problem():
    x, w = _inputs(3, 64, 96, seed=1)
    torch.testing.assert_close(op(x, w), F.linear(x, w), rtol=1e-2, atol=1e-2)
    with pytest.raises(RuntimeError, match=r"weight must be a 2-D bfloat16"):
        op(x, w.float())
    with pytest.raises(RuntimeError, match=r"x must be \[rows, 96\]"):
        op(x[:, :50], w)
    with pytest.raises(RuntimeError, match=r"x must be float32 or bfloat16"):
        op(x.half(), w)
    with pytest.raises(RuntimeError, match=r"unknown isa 'sse'"):
        op(x, w, "sse")


def test_auto_runs_the_first_reported_path_and_kernel_supported_follows_the_paths():
    assert PATHS[-1] == "scalar" and len(set(PATHS)) == len(PATHS)
    x, w = _inputs(5, 40, 72, seed=2)
    assert torch.equal(op(x, w), op(x, w, PATHS[0]))
    for path in PATHS:
        _within_fp32_rounding(op(x, w, path), x, w)
    assert kernel_supported("cpu", torch.bfloat16) == (PATHS[0] != "scalar")


@pytest.mark.parametrize("paths, expected", [(["avx2", "scalar"], True), (["scalar"], False), ([], False)])
def test_kernel_supported_only_where_a_vector_path_runs(monkeypatch, paths, expected):
    monkeypatch.setattr(cpu_linear, "cpu_paths", lambda: paths)
    assert kernel_supported("cpu", torch.bfloat16) is expected
    assert not kernel_supported("cpu", torch.float32) and not kernel_supported("meta", torch.bfloat16)
    monkeypatch.setenv(cpu_linear.ENV, "0")
    assert not kernel_supported("cpu", torch.bfloat16)


def test_meta_shapes():
    out = op(torch.empty(5, 32, device="meta"), torch.empty(7, 32, dtype=torch.bfloat16, device="meta"))
    assert out.shape == (5, 7) and out.device.type == "meta"


def test_layer_keeps_bias_and_shape():
    x, w = _inputs(6, 24, 40, seed=3)
    bias = nn.Parameter(torch.randn(24).to(torch.bfloat16), requires_grad=False)
    layer = Bf16Linear(nn.Parameter(w, requires_grad=False), bias)
    y = layer(x.reshape(2, 3, 40))
    assert y.shape == (2, 3, 24)
    assert torch.equal(y.reshape(6, 24), op(x, w) + bias)
    with pytest.raises(ValueError, match="contiguous"):
        Bf16Linear(nn.Parameter(w.t(), requires_grad=False), None)


@pytest.mark.skipif(packing_supported("cpu", torch.bfloat16) or not kernel_supported("cpu", torch.bfloat16),
                    reason="oneDNN runs bf16 natively here, so layers are packed instead")
def test_pack_linears_swaps_in_the_kernel_and_keeps_a_tied_head(monkeypatch):
    torch.manual_seed(0)
    emb = nn.Embedding(50, 32)
    head = nn.Linear(32, 50, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head, "mlp": nn.Linear(32, 32)}).to(torch.bfloat16).eval()
    x = torch.randn(4, 32).to(torch.bfloat16)
    expected = F.linear(x, model["mlp"].weight, model["mlp"].bias)
    assert pack_linears(model) == 2
    assert type(model["head"]) is Bf16Linear and model["head"].weight is model["emb"].weight
    torch.testing.assert_close(model["mlp"](x), expected, rtol=1e-2, atol=1e-2)
    monkeypatch.setenv(cpu_linear.ENV, "0")
    fresh = nn.Linear(32, 32).to(torch.bfloat16)
    assert pack_linears(nn.Sequential(fresh)) == 0
