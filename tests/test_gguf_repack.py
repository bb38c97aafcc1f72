"""GGUF blocks repacked in the engine's group-wise layout (models/gguf_repack.py), the layers
that hold them (models/group_quant_linear.py) and a GGUF built in that layout, the form it
takes on a GPU.

- The repacking is exact: every dequantised value equals `gguf.quants.dequantize`'s (llama.cpp's
  own Python reader, independent of ours) bit for bit, on random blocks of every type and on
  real tensors of the shipped files. Scales and zero points are products of an fp16 and a small
  integer, exact in fp32, and the kernel forms q * scale + zero once, as the reader does.
- The Triton kernel (under TRITON_INTERPRET=1 on CPU) against the torch twin over the new
  shapes the repacking brings (int8 with zero points, groups of 16, fp32 scales), with the
  bound of test_group_quant.py.
- The model in the group layout (on CPU it runs the kernel's torch twin: dequantise, fp32
  matmul) holds the dequantised model's weights exactly and its logits to fp32 rounding; on a
  GPU, a gpu-marked test loads the same file onto CUDA.
"""
from __future__ import annotations

import gguf
import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from arbitrage_fast.models import gguf_ops, gguf_packed, loader
from arbitrage_fast.models.architecture import DecoderSpec
from arbitrage_fast.models.gguf_directory import GGUFDirectory
from arbitrage_fast.models.gguf_random import random_blocks
from arbitrage_fast.models.gguf_repack import repack
from arbitrage_fast.models.group_quant_linear import GroupQuantEmbedding, GroupQuantLinear
from helpers.gguf_files import dequantised_reference, greedy, teacher_forced, write_tiny_gguf
from helpers.tiny_models import build_tiny_lm
from helpers.triton_kernels import DEVICE, check_quant_matmul, load_kernel, needs_triton

QT = gguf.GGMLQuantizationType
qm = load_kernel("quant_matmul")
TYPES = sorted(gguf_ops.PACKED_TYPES)  # every type with a CPU kernel has a repacking
names = lambda t: gguf_ops.PACKED_TYPES[t]  # noqa: E731
# (bits, group, bits a weight in the layout) per type, as the module's table says.
LAYOUT = {QT.Q8_0: (8, 32, 8.5), QT.Q4_0: (4, 32, 5), QT.Q4_1: (4, 32, 5), QT.Q5_0: (8, 32, 8.5),
          QT.Q5_1: (8, 32, 9), QT.Q4_K: (4, 32, 6), QT.Q6_K: (8, 16, 10)}


def _blocks(qtype: int, rows: int, K: int, seed: int) -> torch.Tensor:
    return random_blocks(qtype, rows, K, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("qtype", TYPES, ids=names)
def test_repacked_values_are_the_gguf_readers_to_the_bit(qtype):
    K = 512  # two K-quant super-blocks, sixteen 32-blocks
    blocks = _blocks(qtype, 7, K, qtype)
    qw = repack(blocks, qtype, K)
    want = gguf_ops.dequantize_reference(blocks, qtype, K)
    assert torch.equal(qw.dequantize(), want)
    bits, group, per_weight = LAYOUT[QT(qtype)]
    assert (qw.bits, qw.group, qw.in_features) == (bits, group, K)
    assert qw.nbytes() * 8 / (7 * K) <= per_weight
    # The 32-input types' scales are file fp16 values (or -8 of one): kept in fp16.
    if qtype not in (QT.Q4_K, QT.Q6_K):
        assert qw.scales.dtype == torch.float16


def test_large_q4_0_scales_keep_their_zero_point_exact_in_fp32():
    """-8 d overflows fp16 for d above 8188: the zero points then stay fp32, still exact."""
    blocks = _blocks(QT.Q4_0, 3, 64, 0)
    blocks[0, 0:2] = torch.tensor([10000.0], dtype=torch.float16).view(torch.uint8)
    qw = repack(blocks, QT.Q4_0, 64)
    assert qw.mins.dtype == torch.float32
    assert torch.equal(qw.dequantize(), gguf_ops.dequantize_reference(blocks, QT.Q4_0, 64))


def test_bad_blocks_are_refused_naming_what_is_wrong():
    with pytest.raises(ValueError, match="no repacking.*repacked types"):
        repack(_blocks(QT.Q8_0, 2, 64, 0), int(QT.Q5_K), 256)
    with pytest.raises(ValueError, match=r"Q8_0 blocks for 96 inputs must be uint8 \[rows, 102\]"):
        repack(_blocks(QT.Q8_0, 2, 64, 0), int(QT.Q8_0), 96)


@pytest.mark.parametrize("fixture", ["qwen_draft_gguf", "qwen_target_gguf"])
def test_real_tensors_repack_exactly(fixture, request):
    """One tensor of each packed type the shipped file holds, rows from its start and end."""
    directory = GGUFDirectory(request.getfixturevalue(fixture))
    seen = set()
    for name, t in directory.tensors.items():
        qtype = int(t.qtype)
        if qtype not in gguf_ops.PACKED_TYPES or qtype in seen:
            continue
        seen.add(qtype)
        blocks = torch.from_numpy(directory.array(t))
        rows = torch.cat([blocks[:64], blocks[-64:]])
        elems, size = gguf_ops.block_shape(qtype)
        K = blocks.shape[1] // size * elems
        assert torch.equal(repack(rows, qtype, K).dequantize(), gguf_ops.dequantize_reference(rows, qtype, K)), name
    assert len(seen) >= 2


def _check_triton(qtype: int, M: int, N: int, K: int, dtype: torch.dtype, device: str) -> None:
    qw = repack(_blocks(qtype, N, K, M + N), qtype, K)
    check_quant_matmul(qw, torch.randn(M, K, generator=torch.Generator().manual_seed(K)).to(dtype), device)


@needs_triton(qm)
@pytest.mark.parametrize("qtype", TYPES, ids=names)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_kernel_on_repacked_weights(qtype, dtype):
    _check_triton(qtype, 3, 9, 256, dtype, DEVICE)


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", TYPES, ids=names)
@pytest.mark.parametrize("M, N, K, dtype", [(1, 4864, 768, torch.bfloat16), (77, 896, 4608, torch.float32)])
def test_triton_kernel_on_repacked_weights_on_the_gpu(qtype, M, N, K, dtype):
    _check_triton(qtype, M, N, K, dtype, "cuda")


def test_a_layer_joins_neighbouring_parts_of_one_kind_and_keeps_the_order():
    K = 256
    q4k_a, q4k_b, q6k = (repack(_blocks(t, n, K, n), t, K) for t, n in ((QT.Q4_K, 8, ), (QT.Q4_K, 4), (QT.Q6_K, 4)))
    dense = torch.randn(3, K)
    bias = torch.randn(19)
    layer = GroupQuantLinear([q4k_a, q4k_b, q6k, dense], bias)
    assert layer.kinds == [(4, 32), (8, 16), None] and layer.out_features == 19
    weight = torch.cat([q4k_a.dequantize(), q4k_b.dequantize(), q6k.dequantize(), dense])
    assert torch.equal(layer.dequantized_weight(), weight)
    x = torch.randn(2, 5, K, generator=torch.Generator().manual_seed(0))
    want = x.double() @ weight.double().T + bias.double()
    # fp32 sums of K products in some order, then the bias: the recursive-summation bound.
    bound = (K + 3) * 2.0 ** -24 * (x.double().abs() @ weight.double().abs().T + bias.double().abs())
    assert ((layer(x).double() - want).abs() <= bound).all()
    assert "int4 group 32+int8 group 16+dense" in repr(layer)
    with pytest.raises(ValueError, match="share in_features"):
        GroupQuantLinear([q6k, torch.randn(2, 128)])


TINY_TYPES = {"attn_q": QT.Q4_K, "attn_k": QT.Q4_K, "attn_v": QT.Q6_K, "attn_output": QT.Q8_0,
              "ffn_gate": QT.Q5_0, "ffn_up": QT.Q5_1, "ffn_down": QT.Q4_0, "token_embd": QT.Q4_1,
              "output": QT.Q6_K, "blk.1.attn_output": QT.F16, "blk.1.ffn_down": QT.Q5_K}


@pytest.fixture
def tiny_file(tmp_path):
    def make(arch: str, tie: bool):
        folder = build_tiny_lm(tmp_path / f"hf-{arch}-{tie}", arch, hidden=256, heads=4, kv_heads=2, layers=2, tie=tie)
        config, tokenizer = AutoConfig.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
        return write_tiny_gguf(tmp_path / f"{arch}-{tie}.gguf", config, arch, TINY_TYPES), config, tokenizer

    return make


@pytest.mark.parametrize("arch,tie", [("qwen2", True), ("llama", False)])
def test_the_group_layout_model_is_the_dequantised_model(tiny_file, arch, tie):
    path, config, tokenizer = tiny_file(arch, tie)
    spec = DecoderSpec.from_hf_config(config)
    model = gguf_packed.build(path, spec, torch.float32, "cpu", layout="group")
    reference = dequantised_reference(path, config, arch)
    qkv = model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, GroupQuantLinear) and qkv.kinds == [(4, 32), (8, 16)]  # q+k one call, v another
    assert isinstance(model.embed_tokens, GroupQuantEmbedding)
    assert type(model.layers[1].self_attn.o_proj) is torch.nn.Linear  # the F16 tensor stays dense
    if tie:  # the head reads the embedding's packed table, not a copy
        assert model.lm_head.qweight0.data_ptr() == model.embed_tokens.qweight.data_ptr()
    for ours, ref in [(model.lm_head, reference.lm_head)] + [
            (getattr(getattr(model.layers[i], block), name), getattr(getattr(reference.layers[i], block), name))
            for i in range(2) for block, name in (("self_attn", "qkv_proj"), ("self_attn", "o_proj"),
                                                  ("mlp", "gate_up_proj"), ("mlp", "down_proj"))]:
        weight = ours.dequantized_weight() if isinstance(ours, GroupQuantLinear) else ours.weight
        assert torch.equal(weight, ref.weight)
    ids = torch.tensor([0, 5, 17, config.vocab_size - 1])
    assert torch.equal(model.embed_tokens(ids), reference.embed_tokens(ids))

    prompt = tokenizer("We compute 12 + 30 = 42.\n\nThen")["input_ids"]
    tokens, expected = greedy(reference, spec, prompt, 12, torch.float32)
    got = teacher_forced(model, spec, prompt, tokens, torch.float32)
    # Same weights, both fp32 matmuls: only the summation order differs.
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_the_gguf_layout_is_refused_off_the_cpu(tiny_file):
    path, config, _ = tiny_file("qwen2", True)
    with pytest.raises(ValueError, match="CPU only.*group layout"):
        gguf_packed.build(path, DecoderSpec.from_hf_config(config), torch.float32, "meta", layout="gguf")
    with pytest.raises(ValueError, match="unknown packed layout 'int4'"):
        gguf_packed.build(path, DecoderSpec.from_hf_config(config), torch.float32, "cpu", layout="int4")


@pytest.mark.gpu
def test_a_gguf_loads_packed_onto_the_gpu(tiny_file, monkeypatch):
    path, config, tokenizer = tiny_file("qwen2", True)
    monkeypatch.setattr(loader, "_read_gguf_metadata", lambda p: (config, tokenizer))
    loaded = loader.load_model(path, "bfloat16", "cuda")
    model = loaded.model
    assert isinstance(model.layers[0].mlp.gate_up_proj, GroupQuantLinear)
    assert model.layers[0].mlp.gate_up_proj.qweight0.is_cuda
    assert model.lm_head.qweight0.data_ptr() == model.embed_tokens.qweight.data_ptr()  # still one table
    reference = dequantised_reference(path, config, "qwen2")
    prompt = tokenizer("We compute 12 + 30 = 42.\n\nThen")["input_ids"]
    tokens, expected = greedy(reference, loaded.spec, prompt, 8, torch.float32)
    got = teacher_forced(model, loaded.spec, prompt, tokens, torch.bfloat16).float().cpu()
    # bf16 activations and weights in the dot: a few bf16 steps of the logits' scale.
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()
