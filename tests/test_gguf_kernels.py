"""The GGUF quantized linear kernels (csrc/gguf_linear.cpp) against their torch twin.

Tolerances, all derived rather than tuned:
- Dequantisation is exact: a weight is scale * q + min with the same fp32 products the `gguf`
  package computes, so the compiled decoder must equal `gguf.quants.dequantize` bit for bit.
- The product with the kernel's own int8 activations: integer dots are exact, and each group
  of 32 adds at most one float term carrying <= 3 roundings to a running fp32 sum (a K-quant
  super-block adds fewer: its groups add up in int32), so the error is below
  (K/32 + 4) * 2**-24 * sum|w||x^| (the recursive-summation bound, u = 2**-24 per rounding),
  with x^ the rounded activations. The same bound holds for every format and code path.
- Against the unrounded activations the kernel also carries the int8 rounding of x, at most
  half a step (amax/127/2 per activation group: 32 inputs, 256 for the K-quants) per input:
  sum_i |w_i| * step_i / 2 on top.
"""
from __future__ import annotations

import gguf
import pytest
import torch
from hypothesis import given, settings, strategies as st

from arbitrage_fast.models import gguf_ops
from arbitrage_fast.models.gguf_random import random_blocks

pytest.importorskip("arbitrage_fast._C", reason="the native extension is not built")

TYPES = sorted(gguf_ops.PACKED_TYPES)
PATHS = gguf_ops.cpu_paths()
ALL_PATHS = ["avx512_vnni", "avx2", "scalar"]  # every compiled path, reported as skipped where absent
U = 2.0 ** -24


def valid_in_features(qtype: int, blocks: int) -> int:
    return gguf_ops.block_shape(qtype)[0] * blocks


pytestmark = pytest.mark.usefixtures("two_threads")


def rounding_bound(x: torch.Tensor, blocks: torch.Tensor, qtype: int) -> torch.Tensor:
    K = x.shape[1]
    w = gguf_ops.dequantize_reference(blocks, qtype, K).double().abs()
    xr = gguf_ops.rounded_activations(x, gguf_ops.activation_group(qtype))
    return (K / 32 + 4) * U * (xr.abs() @ w.T) + 1e-30


def activation_bound(x: torch.Tensor, blocks: torch.Tensor, qtype: int) -> torch.Tensor:
    K = x.shape[1]
    w = gguf_ops.dequantize_reference(blocks, qtype, K).double().abs()
    group = gguf_ops.activation_group(qtype)
    _, d = gguf_ops.quantize_activations(x, group)
    half_step = (d.double() / 2).repeat_interleave(group, dim=1)
    return half_step @ w.T


def check(x: torch.Tensor, blocks: torch.Tensor, qtype: int, path: str) -> None:
    out = torch.ops.arbitrage_fast.gguf_linear(x, blocks, qtype, path).double()
    ref = gguf_ops.linear_reference(x, blocks, qtype).double()
    bound = rounding_bound(x, blocks, qtype)
    excess = ((out - ref).abs() / bound).max().item()
    assert excess <= 1.0, f"{gguf_ops.PACKED_TYPES[qtype]} {path}: error {excess:.2f}x the rounding bound"


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: gguf_ops.PACKED_TYPES[t])
def test_dequantize_is_gguf_exactly(qtype):
    gen = torch.Generator().manual_seed(qtype)
    K = valid_in_features(qtype, 3)
    blocks = random_blocks(qtype, 37, K, gen)
    assert torch.equal(torch.ops.arbitrage_fast.gguf_dequantize(blocks, qtype, K),
                       gguf_ops.dequantize_reference(blocks, qtype, K))


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: gguf_ops.PACKED_TYPES[t])
@pytest.mark.parametrize("rows", [1, 5, 11])
def test_kernel_matches_twin_on_random_blocks(qtype, path, rows):
    if path not in PATHS:
        pytest.skip(f"this CPU does not run the {path} path")
    gen = torch.Generator().manual_seed(1000 + qtype)
    K = valid_in_features(qtype, 1024 // gguf_ops.block_shape(qtype)[0] + 1)
    blocks = random_blocks(qtype, 67, K, gen)
    x = torch.randn(rows, K, generator=gen) * torch.logspace(-2, 1, K)[torch.randperm(K, generator=gen)]
    check(x, blocks, qtype, path)


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: gguf_ops.PACKED_TYPES[t])
def test_a_row_gets_the_same_bits_alone_or_in_any_batch(qtype, path):
    # Rows go through tiles of 8, 4, 3, 2 and 1; a batched request must see exactly what it would
    # alone, whichever tile its row lands in.
    if path not in PATHS:
        pytest.skip(f"this CPU does not run the {path} path")
    # An odd number of 32-input groups too: the 512-bit kernels take groups in pairs and the
    # last one alone.
    gen = torch.Generator().manual_seed(3000 + qtype)
    op = torch.ops.arbitrage_fast.gguf_linear
    for n_blocks in (512 // gguf_ops.block_shape(qtype)[0], 512 // gguf_ops.block_shape(qtype)[0] + 1):
        K = valid_in_features(qtype, n_blocks)
        blocks = random_blocks(qtype, 19, K, gen)
        x = torch.randn(13, K, generator=gen)
        alone = torch.cat([op(x[i:i + 1], blocks, qtype, path) for i in range(13)])
        for rows in (*range(2, 10), 13):
            assert torch.equal(op(x[:rows], blocks, qtype, path), alone[:rows]), (K, rows)


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: gguf_ops.PACKED_TYPES[t])
def test_a_prefill_walked_in_weight_panels_gets_each_rows_bits(qtype, path):
    # Many rows against wide weight rows: the kernel walks panels of a few weight rows (about
    # 64 KiB; here 7 rows of just over 8 KiB, so 37 outputs span several panels per thread)
    # with every tile of activation rows. Each output must still be the one-row call's.
    if path not in PATHS:
        pytest.skip(f"this CPU does not run the {path} path")
    gen = torch.Generator().manual_seed(4000 + qtype)
    block_bytes = gguf_ops.block_shape(qtype)[1]
    K = valid_in_features(qtype, 8192 // block_bytes + 1)
    blocks = random_blocks(qtype, 37, K, gen)
    x = torch.randn(23, K, generator=gen)  # tiles of 8, 8, 4 and 3 rows
    op = torch.ops.arbitrage_fast.gguf_linear
    alone = torch.cat([op(x[i:i + 1], blocks, qtype, path) for i in range(23)])
    assert torch.equal(op(x, blocks, qtype, path), alone)
    check(x, blocks, qtype, path)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: gguf_ops.PACKED_TYPES[t])
def test_kernel_approximates_the_unrounded_product(qtype):
    gen = torch.Generator().manual_seed(2000 + qtype)
    K = valid_in_features(qtype, 512 // gguf_ops.block_shape(qtype)[0])
    blocks = random_blocks(qtype, 40, K, gen)
    x = torch.randn(3, K, generator=gen)
    out = gguf_ops.gguf_linear(x, blocks, qtype).double()
    exact = gguf_ops.linear_reference(x, blocks, qtype, quantize_x=False).double()
    bound = activation_bound(x, blocks, qtype) + rounding_bound(x, blocks, qtype)
    assert ((out - exact).abs() <= bound).all()
    # The rounding of x is real: the bound is not vacuous, the error is a visible part of it.
    assert ((out - exact).abs() / bound).max() > 0.01


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_give_the_rounded_fp32_result(dtype):
    qtype = gguf_ops.TYPE_IDS["Q8_0"]
    gen = torch.Generator().manual_seed(7)
    blocks = random_blocks(qtype, 48, 256, gen)
    x = torch.randn(4, 256, generator=gen).to(dtype)
    out = gguf_ops.gguf_linear(x, blocks, qtype)
    assert out.dtype == dtype
    assert torch.equal(out, gguf_ops.gguf_linear(x.float(), blocks, qtype).to(dtype))


def test_zero_activations_and_meta_shapes():
    qtype = gguf_ops.TYPE_IDS["Q4_K"]
    blocks = random_blocks(qtype, 8, 512, torch.Generator().manual_seed(3))
    assert torch.equal(gguf_ops.gguf_linear(torch.zeros(2, 512), blocks, qtype), torch.zeros(2, 8))
    meta = torch.ops.arbitrage_fast.gguf_linear(torch.empty(3, 512, device="meta"), blocks.to("meta"), qtype)
    assert meta.shape == (3, 8) and meta.device.type == "meta"


def test_random_blocks_are_whole_blocks_with_finite_scales():
    qtype = gguf_ops.TYPE_IDS["Q4_K"]
    blocks = random_blocks(qtype, 3, 512, torch.Generator().manual_seed(0))
    assert blocks.shape == (3, gguf_ops.row_bytes(qtype, 512)) and gguf_ops.nonfinite_blocks(blocks, qtype) == 0
    with pytest.raises(ValueError, match="in_features=500 is not a whole number of 256-input blocks"):
        random_blocks(qtype, 3, 500, torch.Generator())


def test_malformed_arguments_are_refused_with_the_reason():
    q8 = gguf_ops.TYPE_IDS["Q8_0"]
    blocks = random_blocks(q8, 4, 64, torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match=r"x must be \[rows, 64\]"):
        gguf_ops.gguf_linear(torch.randn(1, 32), blocks, q8)
    with pytest.raises(RuntimeError, match="not a whole number of 34-byte blocks"):
        gguf_ops.gguf_linear(torch.randn(1, 64), blocks[:, :-1], q8)
    with pytest.raises(RuntimeError, match="no kernel here"):
        gguf_ops.gguf_linear(torch.randn(1, 256), blocks, int(gguf.GGMLQuantizationType.Q3_K))
    with pytest.raises(RuntimeError, match="unknown isa"):
        torch.ops.arbitrage_fast.gguf_linear(torch.randn(1, 64), blocks, q8, "sse9")


@settings(max_examples=40, deadline=None)
@given(qtype=st.sampled_from(TYPES), rows=st.integers(1, 9), out_features=st.integers(1, 9),
       blocks_per_row=st.integers(1, 3), seed=st.integers(0, 2**31 - 1), path=st.sampled_from(PATHS),
       scale=st.sampled_from([1e-3, 1.0, 300.0]))
def test_fuzz_kernel_against_twin(qtype, rows, out_features, blocks_per_row, seed, path, scale):
    gen = torch.Generator().manual_seed(seed)
    K = valid_in_features(qtype, blocks_per_row)
    blocks = random_blocks(qtype, out_features, K, gen)
    x = torch.randn(rows, K, generator=gen) * scale
    x[:, : K // 4] = 0.0  # whole zero groups: a zero activation scale
    check(x, blocks, qtype, path)


def test_kernels_run_on_the_threads_torch_is_given():
    """The kernels' parallel loops (at::parallel_for) are compiled into the extension: built
    without OpenMP they would run on one thread whatever torch.set_num_threads says."""
    from arbitrage_fast import _C

    assert torch.get_num_threads() == 2
    assert _C.kernel_threads() == 2


def test_the_packed_types_table_is_the_gguf_packages():
    """gguf_ops writes the packed types' ids and block sizes out (the engine imports without the
    `gguf` package); they must be the format's own."""
    for qtype, name in gguf_ops.PACKED_TYPES.items():
        assert gguf.GGMLQuantizationType[name] == qtype
        assert gguf_ops.block_shape(qtype) == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
    assert gguf_ops.block_shape(int(gguf.GGMLQuantizationType.Q5_K)) == (256, 176)  # others from the package
