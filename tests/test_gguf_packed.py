"""The packed GGUF loader on tiny files written here: the same decoder as the dequantised
model of the same file (weights compared exactly, logits within the activation-rounding
tolerance), mixed types inside fused projections, llama's q/k row order, the fallback for
types without a kernel, resident size, and refusal of corrupt or truncated tensors.

The reference is built without the packed loader's code: the `gguf` package dequantises every
tensor, transformers' own tensor processor undoes llama's q/k permutation, and the
dequantising loader's `_build` fuses and loads it.
"""
from __future__ import annotations

import logging

import gguf
import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from arbitrage_fast.models import loader
from arbitrage_fast.models.layers import GatedMLP, RMSNorm
from arbitrage_fast.models.packed_layer import PackedLayer
from arbitrage_fast.models.quantized_linear import QuantizedEmbedding, QuantizedLinear
from helpers.gguf_files import dequantised_reference, greedy, teacher_forced, write_tiny_gguf
from helpers.tiny_models import build_tiny_lm

pytest.importorskip("arbitrage_fast._C", reason="the native extension is not built")

QT = gguf.GGMLQuantizationType
# Every packed type, two of them inside one fused projection (q/k Q4_K, v Q6_K; gate Q5_0,
# up Q5_1), plus a float tensor and a type without a kernel (Q5_K) in layer 1.
TYPES = {"attn_q": QT.Q4_K, "attn_k": QT.Q4_K, "attn_v": QT.Q6_K, "attn_output": QT.Q8_0,
         "ffn_gate": QT.Q5_0, "ffn_up": QT.Q5_1, "ffn_down": QT.Q4_0, "token_embd": QT.Q4_1,
         "output": QT.Q6_K, "blk.1.attn_output": QT.F16, "blk.1.ffn_down": QT.Q5_K}
# Logits, relative to their largest magnitude. The packed model differs from the dequantised
# one only by the int8 rounding of each packed layer's input: at most half a step (1/254 of
# a group's largest value) per input, about 0.5% rms of a layer's output, which these random
# 2-layer models carry to 0.1-0.9% of their logits (measured over both files); 3% leaves
# room. (Each layer alone is held to fp32 rounding in test_gguf_kernels.py, and the weights
# are compared exactly here, so this bound only has to catch wiring: a wrong block, scale or
# row order moves logits by tens of percent.)
ROUNDED_REL = 0.03


pytestmark = pytest.mark.usefixtures("two_threads")


@pytest.fixture
def tiny_gguf(tmp_path, monkeypatch):
    def make(arch: str, tie: bool, types=TYPES):
        folder = build_tiny_lm(tmp_path / f"hf-{arch}-{tie}", arch, hidden=256, heads=4, kv_heads=2, layers=2, tie=tie)
        config, tokenizer = AutoConfig.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
        path = write_tiny_gguf(tmp_path / f"{arch}-{tie}.gguf", config, arch, types)
        # The tiny file carries no tokenizer; the loader reads its metadata from the HF folder.
        monkeypatch.setattr(loader, "_read_gguf_metadata", lambda p: (config, tokenizer))
        return path, config, tokenizer

    return make


@pytest.mark.parametrize("arch,tie", [("qwen2", True), ("llama", False)])
def test_packed_model_is_the_dequantised_model(tiny_gguf, arch, tie, caplog):
    path, config, tokenizer = tiny_gguf(arch, tie)
    with caplog.at_level(logging.WARNING):
        packed = loader.load_model(path, "float32")
    reference = dequantised_reference(path, config, arch)
    model = packed.model
    assert isinstance(model.embed_tokens, QuantizedEmbedding)
    assert isinstance(model.layers[0].self_attn.qkv_proj, QuantizedLinear)
    assert model.layers[0].self_attn.qkv_proj.qtypes == [int(QT.Q4_K), int(QT.Q6_K)]  # q+k share one call
    assert type(model.layers[1].self_attn.o_proj) is torch.nn.Linear  # the F16 tensor, dense
    assert [r.message for r in caplog.records if "Q5_K" in r.message]  # the fallback is announced
    # Packed weights give up transformers' exact arithmetic: the compiled CPU norm and activation run.
    assert not any(m.exact for m in model.modules() if isinstance(m, (RMSNorm, GatedMLP)))

    for i in range(config.num_hidden_layers):
        for ours, ref in ((model.layers[i].self_attn.qkv_proj, reference.layers[i].self_attn.qkv_proj),
                          (model.layers[i].self_attn.o_proj, reference.layers[i].self_attn.o_proj),
                          (model.layers[i].mlp.gate_up_proj, reference.layers[i].mlp.gate_up_proj),
                          (model.layers[i].mlp.down_proj, reference.layers[i].mlp.down_proj)):
            weight = ours.dequantized_weight() if isinstance(ours, QuantizedLinear) else ours.weight
            assert torch.equal(weight, ref.weight)
            assert (ours.bias is None) == (ref.bias is None)
            assert ours.bias is None or torch.equal(ours.bias, ref.bias)
    assert torch.equal(model.lm_head.dequantized_weight(), reference.lm_head.weight)
    ids = torch.tensor([0, 5, 17, config.vocab_size - 1])
    assert torch.equal(model.embed_tokens(ids), reference.embed_tokens(ids))

    prompt = tokenizer("We compute 12 + 30 = 42.\n\nThen")["input_ids"]
    tokens, expected = greedy(reference, packed.spec, prompt, 12, torch.float32)
    got = teacher_forced(model, packed.spec, prompt, tokens, torch.float32)
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= ROUNDED_REL * scale
    top2 = expected.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * ROUNDED_REL * scale
    assert clear.any()
    assert torch.equal(got.argmax(-1)[clear], expected.argmax(-1)[clear])


def test_resident_weights_are_the_file_size(tiny_gguf):
    path, _, _ = tiny_gguf("qwen2", True, {k: v for k, v in TYPES.items() if not k.startswith("blk.1")})
    model = loader.load_model(path, "float32").model
    held = {t.data_ptr(): t.numel() * t.element_size() for t in [*model.buffers(), *model.parameters()]}
    size = path.stat().st_size
    assert sum(held.values()) <= 1.1 * size


def test_dequantize_switch_keeps_the_reference_path(tiny_gguf, monkeypatch):
    path, _, _ = tiny_gguf("qwen2", True)
    class Dequantising(Exception):
        pass

    def dequantising(*args):
        raise Dequantising

    monkeypatch.setattr(loader, "_read_gguf_cached", dequantising)
    assert isinstance(loader.load_model(path, "float32").model.lm_head, QuantizedLinear)
    with pytest.raises(Dequantising):
        loader.load_model(path, "float32", dequantize=True)


def test_a_nan_scale_is_refused_naming_the_tensor(tiny_gguf):
    path, _, _ = tiny_gguf("qwen2", True)
    reader = gguf.GGUFReader(path)
    t = next(t for t in reader.tensors if t.name == "blk.1.attn_q.weight")  # Q4_K: d at byte 0
    data = bytearray(path.read_bytes())
    data[t.data_offset + 144 * 3: t.data_offset + 144 * 3 + 2] = bytes.fromhex("007e")  # fp16 NaN
    path.write_bytes(bytes(data))
    with pytest.raises(loader.CheckpointError, match=r"'blk\.1\.attn_q\.weight' has 1 Q4_K block"):
        loader.load_model(path, "float32")


def test_a_truncated_file_is_refused_naming_the_tensor(tiny_gguf):
    path, _, _ = tiny_gguf("qwen2", True)
    last = gguf.GGUFReader(path).tensors[-1]
    path.write_bytes(path.read_bytes()[: last.data_offset + 10])
    with pytest.raises(loader.CheckpointError, match=rf"'{last.name}' is truncated"):
        loader.load_model(path, "float32")


def test_a_tensor_of_the_wrong_shape_is_refused_naming_it(tiny_gguf):
    path, config, _ = tiny_gguf("qwen2", True)
    config.intermediate_size *= 2  # the config now disagrees with the file's ffn tensors
    with pytest.raises(loader.CheckpointError, match=r"blk\.0\.ffn_gate/up is \(1024, 256\) in the file, the config implies \(2048, 256\)"):
        loader.load_model(path, "float32")


def test_a_packed_layer_runs_as_one_op_bit_for_bit_the_modules(tiny_gguf, monkeypatch):
    """Every layer runs as one compiled op: layer 0's projections all packed, layer 1's down
    projection a dense tensor (a Q5_K dequantised at load) in a plain linear. The op calls the
    modules' kernels in their order, so the logits over a prefill and decode steps are the same
    bits either way."""
    path, config, tokenizer = tiny_gguf("qwen2", True)
    loaded = loader.load_model(path, "float32")
    model = loaded.model
    assert all(layer.one_op is not None for layer in model.layers)
    assert type(model.layers[1].mlp.down_proj) is torch.nn.Linear
    calls = []
    real = PackedLayer.__call__
    monkeypatch.setattr(PackedLayer, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    prompt = tokenizer("We compute 12 + 30 = 42.\n\nThen")["input_ids"]
    tokens, fused = greedy(model, loaded.spec, prompt, 6, torch.float32)
    assert len(calls) == 12  # two layers, the prefill and five decode steps
    for layer in model.layers:
        layer.one_op = None
    assert torch.equal(teacher_forced(model, loaded.spec, prompt, tokens, torch.float32), fused)
