"""The engine's own weight formats (models/group_quant.py) and their products: round-trip
bounds, the packed layout, the CPU form (GGUF blocks) read back by the `gguf` package, the
Triton kernel under TRITON_INTERPRET=1 (and on the GPU), each against the torch reference
(dequantise, then an fp32 matmul).

Tolerances, derived rather than tuned (U = 2**-24, fp32's unit roundoff):
- Round trip: round to nearest on a grid of step s puts every weight within s / 2 of its grid
  point; the quotient (w - min) / s and the dequantised q * s + min are each rounded once in
  fp32, which may add a few U times the magnitudes involved.
- Triton, fp32 (IEEE dot): both sides sum K exact-ish products in fp32 in different orders:
  (K + 2) * U * sum|x||w| (the recursive-summation bound).
- Triton, fp16/bf16: the kernel rounds each dequantised weight to the input's dtype before the
  dot (relative u = 2**-11 for fp16, 2**-8 for bf16) and both sides round the output once:
  u * sum|x||w| + 2u * |y| on top of the fp32 bound.
- CPU (GGUF blocks): the kernels' own bound (test_gguf_kernels.check), plus the int8 rounding
  of the input against the unrounded reference.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from arbitrage_fast.config import QUANT_FORMATS, QUANT_GROUPS
from arbitrage_fast.models import gguf_ops
from arbitrage_fast.models.group_quant import (FORMATS, GROUPS, Q8_0, GroupQuantized, QuantizationError,
                                               QuantScheme, quantize, to_gguf_blocks, to_int3_blocks, to_q8_0)
from arbitrage_fast.models.group_quant_linear import GroupQuantLinear
from helpers.triton_kernels import DEVICE, check_quant_matmul, load_kernel, needs_triton

qm = load_kernel("quant_matmul")
U = 2.0 ** -24
SCHEMES = [QuantScheme("int8")] + [QuantScheme(n, g) for n in ("int4", "int3") for g in GROUPS]
ids = lambda s: f"{s.name}-g{s.group}"  # noqa: E731


def _weight(N: int, K: int, seed: int, scale: float = 0.05) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=gen) * scale
    w[0, 0] = 4 * scale  # an outlier, as trained weights have
    return w


def _grid_step(qw: GroupQuantized) -> torch.Tensor:
    """Each weight's quantization step s, [N, K]."""
    idx = torch.arange(qw.in_features) // qw.group
    return qw.scales.float()[:, idx]


@settings(max_examples=60, deadline=None)
@given(N=st.integers(1, 9), K=st.integers(1, 300), scheme=st.sampled_from(SCHEMES),
       log_scale=st.floats(-6, 2), seed=st.integers(0, 2 ** 16), constant_rows=st.booleans())
def test_round_trip_is_within_half_a_step(N, K, scheme, log_scale, seed, constant_rows):
    w = _weight(N, K, seed, 10.0 ** log_scale)
    if constant_rows:  # flat groups: a zero row (s = 0) must come back as zeros, not 0/0
        w[-1] = 0.0
        w[0] = w[0, 0]
    qw = quantize(w, scheme)
    back = qw.dequantize()
    s = _grid_step(qw)
    mins = 0.0 if qw.mins is None else qw.mins.float()[:, torch.arange(K) // qw.group].abs()
    slack = 8 * U * (w.abs() + mins + s * (2 ** scheme.bits))
    err = (w - back).abs()
    assert (err <= s / 2 + slack).all(), f"worst: {(err - s / 2).max().item():.3g} over half a step"
    if constant_rows:
        assert torch.equal(back[-1], torch.zeros(K))


@settings(max_examples=40, deadline=None)
@given(N=st.integers(1, 5), K=st.integers(1, 70), bits=st.sampled_from([3, 4]), seed=st.integers(0, 2 ** 16))
def test_words_pack_and_unpack(N, K, bits, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2 ** bits, (N, K), generator=gen)
    words = qm.pack_words(q, bits)
    assert words.dtype == torch.int32 and words.shape == (N, -(-K // (32 // bits)))
    assert torch.equal(qm.unpack_words(words, bits, K), q.to(torch.int32))


@pytest.mark.parametrize("scheme", SCHEMES, ids=ids)
@pytest.mark.parametrize("K", [64, 96, 256])
def test_cpu_blocks_hold_the_same_weights(scheme, K):
    """The GGUF blocks the CPU runs, read by the `gguf` package (llama.cpp's own reader),
    equal the reference dequantisation bit for bit (K=96: a partial last group of 64/128)."""
    qw = quantize(_weight(7, K, 1), scheme)
    blocks, qtype = to_gguf_blocks(qw)
    assert blocks.shape == (7, gguf_ops.row_bytes(qtype, K))
    assert torch.equal(gguf_ops.dequantize_reference(blocks, qtype, K), qw.dequantize())


def test_q8_0_blocks_in_chunks_are_whole_blocks_of_32():
    """`to_q8_0` (the CPU's quantized LM head): each 32 inputs get their own scale, which is
    int8 quantization of every block as a row; chunking the rows changes nothing."""
    w = _weight(7, 96, 2)
    blocks = to_q8_0(w)
    assert blocks.shape == (7, gguf_ops.row_bytes(Q8_0, 96))
    per_block = quantize(w.reshape(-1, 32), QuantScheme("int8"))
    assert torch.equal(gguf_ops.dequantize_reference(blocks, Q8_0, 96), per_block.dequantize().reshape(7, 96))
    assert torch.equal(to_q8_0(w, rows_per_chunk=3), blocks)
    with pytest.raises(QuantizationError, match="multiple of 32.*40"):
        to_q8_0(_weight(3, 40, 0))


def test_cpu_blocks_need_rows_of_32():
    with pytest.raises(QuantizationError, match="multiple of 32.*40"):
        to_gguf_blocks(quantize(_weight(3, 40, 0), QuantScheme("int4", 32)))


@pytest.mark.parametrize("scheme", SCHEMES, ids=ids)
def test_cpu_kernel_against_the_reference(scheme):
    pytest.importorskip("arbitrage_fast._C", reason="the native extension is not built")
    from test_gguf_kernels import activation_bound, check, rounding_bound

    K = 160
    qw = quantize(_weight(37, K, 2), scheme)
    blocks, qtype = to_gguf_blocks(qw)
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(3))
    for path in gguf_ops.cpu_paths():
        check(x, blocks, qtype, path)
    got = gguf_ops.gguf_linear(x, blocks, qtype).double()
    want = qm.quant_matmul_reference(x, qw.qweight, qw.scales, qw.mins, qw.bits, qw.group).double()
    bound = rounding_bound(x, blocks, qtype) + activation_bound(x, blocks, qtype) + K * U * want.abs()
    assert ((got - want).abs() <= bound).all()


def _check_triton(scheme: QuantScheme, M: int, N: int, K: int, dtype: torch.dtype, device: str) -> None:
    qw = quantize(_weight(N, K, M + N + K), scheme)
    check_quant_matmul(qw, torch.randn(M, K, generator=torch.Generator().manual_seed(K)).to(dtype), device)


# Odd row counts, K a multiple of neither the group nor a word's values, decode (M = 1) and
# prefill (M > 16, the 64-row tile).
SHAPES = [(1, 33, 100), (3, 7, 70), (20, 64, 256), (1, 5, 37)]


@needs_triton(qm)
@pytest.mark.parametrize("scheme", SCHEMES, ids=ids)
@pytest.mark.parametrize("M, N, K", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_kernel_against_the_reference(scheme, M, N, K, dtype):
    _check_triton(scheme, M, N, K, dtype, DEVICE)


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", SCHEMES, ids=ids)
@pytest.mark.parametrize("M, N, K", SHAPES + [(1, 4864, 896), (77, 896, 4864)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_kernel_on_the_gpu(scheme, M, N, K, dtype):
    _check_triton(scheme, M, N, K, dtype, "cuda")


@pytest.mark.gpu
def test_a_quantized_layer_on_the_gpu_runs_the_kernel():
    qw = quantize(_weight(96, 128, 0).cuda(), QuantScheme("int4", 32))
    layer = GroupQuantLinear(qw, torch.randn(96, device="cuda"))
    x = torch.randn(2, 3, 128, device="cuda")
    want = F.linear(x, qw.dequantize(), layer.bias)
    torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-4)


def test_group_quant_linear_is_the_dequantised_linear():
    """On CPU tensors the layer takes the torch twin: the dequantised weight's F.linear."""
    qw = quantize(_weight(24, 96, 4), QuantScheme("int3", 64))
    bias = torch.randn(24)
    layer = GroupQuantLinear(qw, bias)
    x = torch.randn(2, 3, 96)
    assert torch.equal(layer(x), (x.reshape(6, 96) @ qw.dequantize().T + bias).reshape(2, 3, 24))
    assert "int3 group 64" in repr(layer)


def test_resident_bytes_of_each_format():
    """Bytes at a real layer's shape ([4864, 896], the 0.5B's gate) and the ratio to bf16:
    int8 a byte a weight + an fp16 scale a row (0.50); int4 8 values and int3 10 to a 4-byte
    word + two fp16 values a group (int4/64 0.28, int3/64 0.23); the CPU's GGUF blocks: Q8_0
    34 bytes and Q4_1 20 bytes per 32 weights (0.53, 0.31); the CPU's int3 blocks 12 bytes per
    32 weights and 4 per group (int3/64 0.22, int3/32 0.25)."""
    N, K = 4864, 896
    w = _weight(N, K, 0)
    for scheme, row_bytes, ratio in [(QuantScheme("int8"), K + 2, 0.501), (QuantScheme("int4", 64), K // 2 + 4 * 14, 0.282),
                                     (QuantScheme("int4", 128), K // 2 + 4 * 7, 0.266),
                                     (QuantScheme("int3", 64), 4 * 90 + 4 * 14, 0.232),
                                     (QuantScheme("int3", 32), 4 * 90 + 4 * 28, 0.263)]:
        qw = quantize(w, scheme)
        assert qw.nbytes() == N * row_bytes, scheme
        assert qw.nbytes() / (N * K * 2) == pytest.approx(ratio, abs=1e-3)
        blocks, _ = to_gguf_blocks(qw)
        assert blocks.numel() / (N * K * 2) == (34 / 64 if scheme.bits == 8 else 20 / 64)
        if scheme.bits == 3:
            assert to_int3_blocks(qw).numel() == N * (K // 32 * 12 + 4 * K // scheme.group)


def test_bad_weights_are_refused_naming_the_layer():
    w = _weight(4, 64, 0)
    w[1, 3] = float("nan")
    with pytest.raises(QuantizationError, match="layers.0.mlp.down_proj.*NaN"):
        quantize(w, QuantScheme("int4"), "layers.0.mlp.down_proj")
    with pytest.raises(QuantizationError, match="float16"):
        quantize(_weight(4, 64, 0) * 1e7, QuantScheme("int4"))


@pytest.mark.parametrize("name, group, match", [("int2", 64, "unknown quantization 'int2'"),
                                                ("int4", 48, "group must be one of .*48")])
def test_schemes_are_validated(name, group, match):
    with pytest.raises(ValueError, match=match):
        QuantScheme(name, group)


def test_the_config_names_the_same_formats():
    assert tuple(FORMATS) == QUANT_FORMATS and GROUPS == QUANT_GROUPS
