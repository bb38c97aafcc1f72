"""The CPU's int3 blocks (models/int3_blocks.py, csrc/int3_linear.cpp): the layout read back
in torch, the compiled kernel against its torch twin on every code path, row invariance, and
corrupt or truncated blocks refused by name.

Tolerances, derived rather than tuned (U = 2**-24, fp32's unit roundoff):
- Dequantisation is exact: d * q (q <= 7, d fp16) is exact in fp32 and `+ m` rounds once, in
  the kernel's decoder as in the torch twin, so both must agree bit for bit.
- The product with the kernel's own int8 activations: integer dots are exact, and each part
  of 32 inputs adds a float term carrying <= 3 roundings (d * xd, the product, the add) to a
  running fp32 sum, so the error is below (K/32 + 4) * U * sum|w||x^| (the recursive-
  summation bound) with x^ the rounded activations: the bound the GGUF kernels are held to
  (test_gguf_kernels.py), since a part's arithmetic is a Q4_1 block's.
- Stronger and exact: a part of 32 adds the same bits as a Q4_1 block with the same d, m and
  codes on the same path, so the int3 blocks give bit for bit what the Q4_1 blocks they
  replace gave (the model's outputs do not move by the switch).
- Against the unrounded activations the kernel also carries the int8 rounding of x, at most
  half a step (amax/127/2 per 32 inputs) per input: sum_i |w_i| * step_i / 2 on top.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from arbitrage_fast.models import gguf_ops, int3_blocks
from arbitrage_fast.models.group_quant import QuantScheme, quantize, to_gguf_blocks, to_int3_blocks
from arbitrage_fast.models.quantize_on_load import Int3Linear

pytest.importorskip("arbitrage_fast._C", reason="the native extension is not built")

PATHS = int3_blocks.cpu_paths()
ALL_PATHS = ["avx2", "scalar"]  # every compiled path, reported as skipped where absent
GROUPS = int3_blocks.GROUPS
U = 2.0 ** -24
op = torch.ops.arbitrage_fast.int3_linear

pytestmark = pytest.mark.usefixtures("two_threads")


def random_blocks(rows: int, K: int, group: int, gen: torch.Generator, scale: float = 0.02) -> torch.Tensor:
    """Every code random, scales d in (0.05, 1] * scale and minima of either sign up to 4 d."""
    G = -(-K // group)
    q = torch.randint(0, 8, (rows, K), generator=gen)
    d = ((torch.rand(rows, G, generator=gen) * 0.95 + 0.05) * scale).half()
    m = ((torch.rand(rows, G, generator=gen) * 8 - 4) * d.float()).half()
    return int3_blocks.pack(q, d, m, group)


def rounding_bound(x: torch.Tensor, blocks: torch.Tensor, group: int) -> torch.Tensor:
    K = x.shape[1]
    w = int3_blocks.dequantize_reference(blocks, group, K).double().abs()
    xr = gguf_ops.rounded_activations(x)
    return (K / 32 + 4) * U * (xr.abs() @ w.T) + 1e-30


def check(x: torch.Tensor, blocks: torch.Tensor, group: int, path: str) -> None:
    out = op(x, blocks, group, path).double()
    ref = int3_blocks.linear_reference(x, blocks, group).double()
    excess = ((out - ref).abs() / rounding_bound(x, blocks, group)).max().item()
    assert excess <= 1.0, f"int3 g{group} {path}: error {excess:.2f}x the rounding bound"


def _skip_absent(path: str) -> None:
    if path not in PATHS:
        pytest.skip(f"this CPU does not run the {path} path")


# --------------------------------------------------------------------------- the layout

@settings(max_examples=40, deadline=None)
@given(N=st.integers(1, 7), parts=st.integers(1, 9), group=st.sampled_from(GROUPS), seed=st.integers(0, 2 ** 16))
def test_pack_and_unpack_are_inverse(N, parts, group, seed):
    gen = torch.Generator().manual_seed(seed)
    K, G = 32 * parts, -(-32 * parts // group)
    q = torch.randint(0, 8, (N, K), generator=gen)
    d, m = torch.randn(N, G, generator=gen).half(), torch.randn(N, G, generator=gen).half()
    blocks = int3_blocks.pack(q, d, m, group)
    assert blocks.shape == (N, 4 * G + 12 * parts)
    q2, d2, m2 = int3_blocks.unpack(blocks, group, K)
    assert torch.equal(q2, q) and torch.equal(d2, d) and torch.equal(m2, m)


def test_the_bytes_are_where_the_layout_says():
    """One group of 32 written by hand: d, m, then byte j = inputs j, j+8, j+16, j+24 (two bits
    each, low first), then the third bits as a little-endian word."""
    q = torch.zeros(1, 32, dtype=torch.int64)
    q[0, 3], q[0, 11], q[0, 27], q[0, 31] = 1, 2, 7, 4
    blocks = int3_blocks.pack(q, torch.tensor([[1.0]]).half(), torch.tensor([[-2.0]]).half(), 32)
    head = torch.tensor([1.0, -2.0]).half().view(torch.uint8).tolist()
    # Byte 3: input 3 (bits 0-1) = 1, input 11 (bits 2-3) = 2, input 27 (bits 6-7) = 7 & 3;
    # input 31's low bits are 0. Third bits: inputs 27 and 31, bits 3 and 7 of the word's last byte.
    qs = [0, 0, 0, 1 | 2 << 2 | 3 << 6, 0, 0, 0, 0]
    qh = [0, 0, 0, 1 << 3 | 1 << 7]
    want = torch.tensor(head + qs + qh, dtype=torch.uint8)
    assert torch.equal(blocks[0], want)


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("K", [64, 96, 256])
def test_quantized_weights_survive_the_blocks(group, K):
    """An int3 weight rewritten as blocks dequantises to the reference's values bit for bit,
    through the torch twin and the compiled decoder (K=96: a partial last group of 64/128)."""
    w = torch.randn(11, K, generator=torch.Generator().manual_seed(K)) * 0.05
    qw = quantize(w, QuantScheme("int3", group))
    blocks = to_int3_blocks(qw)
    assert blocks.shape == (11, int3_blocks.row_bytes(K, group))
    assert torch.equal(int3_blocks.dequantize_reference(blocks, group, K), qw.dequantize())
    assert torch.equal(torch.ops.arbitrage_fast.int3_dequantize(blocks, group, K), qw.dequantize())


# --------------------------------------------------------------------------- the kernel

@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("rows", [1, 5, 11])
def test_kernel_matches_twin_on_random_blocks(group, path, rows):
    _skip_absent(path)
    gen = torch.Generator().manual_seed(group + rows)
    K = 32 * 37  # a partial last group for 64 and 128
    blocks = random_blocks(67, K, group, gen)
    x = torch.randn(rows, K, generator=gen) * torch.logspace(-2, 1, K)[torch.randperm(K, generator=gen)]
    check(x, blocks, group, path)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 9), out_features=st.integers(1, 9), parts=st.integers(1, 9),
       group=st.sampled_from(GROUPS), seed=st.integers(0, 2 ** 31 - 1), path=st.sampled_from(PATHS),
       scale=st.sampled_from([1e-3, 1.0, 300.0]))
def test_fuzz_kernel_against_twin(rows, out_features, parts, group, seed, path, scale):
    gen = torch.Generator().manual_seed(seed)
    K = 32 * parts
    blocks = random_blocks(out_features, K, group, gen)
    x = torch.randn(rows, K, generator=gen) * scale
    x[:, : K // 4] = 0.0  # whole zero parts: a zero activation scale
    check(x, blocks, group, path)


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("group", GROUPS)
def test_the_same_bits_as_the_q4_1_blocks_they_replace(group, path):
    _skip_absent(path)
    K = 32 * 13
    qw = quantize(torch.randn(45, K, generator=torch.Generator().manual_seed(group)) * 0.05, QuantScheme("int3", group))
    q4, qtype = to_gguf_blocks(qw)
    x = torch.randn(11, K, generator=torch.Generator().manual_seed(1))
    assert torch.equal(op(x, to_int3_blocks(qw), group, path), torch.ops.arbitrage_fast.gguf_linear(x, q4, qtype, path))


@pytest.mark.skipif("avx2" not in PATHS, reason="this CPU does not run the avx2 path")
@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 17), parts=st.integers(1, 12), group=st.sampled_from(GROUPS), seed=st.integers(0, 2 ** 16))
def test_avx2_and_scalar_paths_agree(rows, parts, group, seed):
    """Both sum the same exact terms in different orders: each is within the rounding bound of
    the exact sum, so they are within twice it of each other."""
    gen = torch.Generator().manual_seed(seed)
    K = 32 * parts
    blocks = random_blocks(21, K, group, gen)
    x = torch.randn(rows, K, generator=gen)
    diff = (op(x, blocks, group, "avx2").double() - op(x, blocks, group, "scalar").double()).abs()
    assert (diff <= 2 * rounding_bound(x, blocks, group)).all()


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("group", GROUPS)
def test_a_row_gets_the_same_bits_alone_or_in_any_batch(group, path):
    # Rows go through tiles of 8, 4, 3, 2 and 1; a batched request must see exactly what it would
    # alone, whichever tile its row lands in.
    _skip_absent(path)
    gen = torch.Generator().manual_seed(group)
    K = 32 * 10
    blocks = random_blocks(19, K, group, gen)
    x = torch.randn(13, K, generator=gen)
    alone = torch.cat([op(x[i:i + 1], blocks, group, path) for i in range(13)])
    for rows in (*range(1, 9), 9, 12, 13):
        assert torch.equal(op(x[:rows], blocks, group, path), alone[:rows]), rows


@pytest.mark.parametrize("group", GROUPS)
def test_kernel_approximates_the_unrounded_product(group):
    gen = torch.Generator().manual_seed(2000 + group)
    K = 512
    blocks = random_blocks(40, K, group, gen)
    x = torch.randn(3, K, generator=gen)
    out = int3_blocks.int3_linear(x, blocks, group).double()
    exact = int3_blocks.linear_reference(x, blocks, group, quantize_x=False).double()
    w = int3_blocks.dequantize_reference(blocks, group, K).double().abs()
    _, d = gguf_ops.quantize_activations(x)
    bound = (d.double() / 2).repeat_interleave(32, dim=1) @ w.T + rounding_bound(x, blocks, group)
    assert ((out - exact).abs() <= bound).all()
    # The rounding of x is real: the bound is not vacuous, the error is a visible part of it.
    assert ((out - exact).abs() / bound).max() > 0.01


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_give_the_rounded_fp32_result(dtype):
    gen = torch.Generator().manual_seed(7)
    blocks = random_blocks(48, 256, 64, gen)
    x = torch.randn(4, 256, generator=gen).to(dtype)
    out = int3_blocks.int3_linear(x, blocks, 64)
    assert out.dtype == dtype
    assert torch.equal(out, int3_blocks.int3_linear(x.float(), blocks, 64).to(dtype))


def test_zero_activations_and_meta_shapes():
    blocks = random_blocks(8, 512, 128, torch.Generator().manual_seed(3))
    assert torch.equal(int3_blocks.int3_linear(torch.zeros(2, 512), blocks, 128), torch.zeros(2, 8))
    meta = op(torch.empty(3, 512, device="meta"), blocks.to("meta"), 128)
    assert meta.shape == (3, 8) and meta.device.type == "meta"
    deq = torch.ops.arbitrage_fast.int3_dequantize(blocks.to("meta"), 128, 512)
    assert deq.shape == (8, 512) and deq.dtype == torch.float32


def test_malformed_arguments_are_refused_with_the_reason():
    blocks = random_blocks(4, 64, 64, torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="a row of 32 inputs in groups of 64 takes 16 bytes.*hold 28"):
        op(torch.randn(1, 32), blocks, 64)
    with pytest.raises(RuntimeError, match="takes 28 bytes.*hold 27"):
        op(torch.randn(1, 64), blocks[:, :-1].contiguous(), 64)
    with pytest.raises(RuntimeError, match="group must be 32, 64 or 128, got 48"):
        op(torch.randn(1, 64), blocks, 48)
    with pytest.raises(RuntimeError, match="positive multiple of 32"):
        op(torch.randn(1, 40), blocks, 64)
    with pytest.raises(RuntimeError, match="unknown isa 'avx512_vnni'"):
        op(torch.randn(1, 64), blocks, 64, "avx512_vnni")
    with pytest.raises(RuntimeError, match="2-D uint8"):
        op(torch.randn(1, 64), blocks.to(torch.int8), 64)


# --------------------------------------------------------------------------- the layer

def test_int3_linear_layer_is_the_kernel_with_its_bias():
    qw = quantize(torch.randn(24, 96, generator=torch.Generator().manual_seed(4)) * 0.05, QuantScheme("int3", 64))
    bias = torch.randn(24)
    layer = Int3Linear(to_int3_blocks(qw), 64, 96, bias)
    x = torch.randn(2, 3, 96)
    want = int3_blocks.int3_linear(x.reshape(6, 96), layer.blocks, 64) + bias
    assert torch.equal(layer(x), want.reshape(2, 3, 24))
    assert torch.equal(layer.dequantized_weight(), qw.dequantize())
    torch.testing.assert_close(layer(x), F.linear(x, qw.dequantize(), bias), rtol=0, atol=0.05)
    assert "int3 blocks, group 64" in repr(layer)


def _corrupt(kind: str) -> tuple[torch.Tensor, int]:
    blocks = random_blocks(6, 128, 64, torch.Generator().manual_seed(1))
    if kind == "truncated":
        return blocks[:, :-3].contiguous(), 128
    if kind == "nan scale":
        blocks[2, 28:30] = torch.tensor([float("nan")]).half().view(torch.uint8)  # second group's d (4 + 24 bytes in)
        return blocks, 128
    if kind == "inf minimum":
        blocks[5, 2:4] = torch.tensor([float("inf")]).half().view(torch.uint8)
        return blocks, 128
    if kind == "wrong width":
        return blocks, 96
    return blocks.view(torch.int8), 128  # wrong dtype


@pytest.mark.parametrize("kind, match", [
    ("truncated", "rows of 53 bytes; 128 inputs in groups of 64 take 56"),
    ("nan scale", "1 int3 group.*NaN or infinite"),
    ("inf minimum", "1 int3 group.*NaN or infinite"),
    ("wrong width", "96 inputs in groups of 64 take 44"),
    ("dtype", "2-D uint8"),
])
def test_corrupt_or_truncated_blocks_are_refused_naming_the_tensor(kind, match):
    blocks, K = _corrupt(kind)
    with pytest.raises(int3_blocks.CorruptBlocksError, match=f"layers.3.mlp.down_proj: .*{match}"):
        Int3Linear(blocks, 64, K, None, "layers.3.mlp.down_proj")


def test_the_batch_invariant_mode_keeps_int3_layers_as_they_are():
    """Each row's activations are quantized alone and each output is one row's dot: the
    load-time probe finds the layer row-invariant, so the mode does not wrap it."""
    from arbitrage_fast.models.batch_invariant import rows_invariant

    qw = quantize(torch.randn(96, 512, generator=torch.Generator().manual_seed(6)) * 0.05, QuantScheme("int3", 128))
    layer = Int3Linear(to_int3_blocks(qw), 128, 512, torch.randn(96).to(torch.bfloat16))
    assert rows_invariant(layer, torch.bfloat16, torch.device("cpu"))
