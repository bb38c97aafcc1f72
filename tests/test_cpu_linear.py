"""Pre-packed bf16 linears on CPU: same bits as F.linear, or not used at all."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer

from arbitrage_fast.models import cpu_linear, loader
from arbitrage_fast.models.cpu_linear import Bf16Linear, PackedLinear, pack, pack_linears, packing_supported
from arbitrage_fast.models.packed_layer import PackedLayer
from helpers.gguf_files import greedy, teacher_forced
from helpers.tiny_models import build_tiny_lm



pytestmark = pytest.mark.usefixtures("one_thread")


needs_packing = pytest.mark.skipif(not packing_supported("cpu", torch.bfloat16),
                                   reason="oneDNN bf16 linear is not available on this CPU/torch build")


def _model(bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 160, bias=bias), nn.Sequential(nn.Linear(160, 96, bias=False)))
    return model.to(torch.bfloat16).eval()


def test_only_bf16_on_cpu(monkeypatch):
    assert not packing_supported("cpu", torch.float32)
    assert not packing_supported("meta", torch.bfloat16)
    monkeypatch.setenv(cpu_linear.ENV, "0")
    assert not packing_supported("cpu", torch.bfloat16)


def test_fp32_model_is_left_alone():
    model = _model().float()
    assert pack_linears(model) == 0
    assert type(model[0]) is nn.Linear


@needs_packing
@pytest.mark.parametrize("rows", [1, 2, 7, 33, 200])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_output_is_bit_identical(rows, bias):
    linear = _model(bias)[0]
    x = torch.randn(rows, 96).to(torch.bfloat16)
    assert torch.equal(pack(linear)(x), F.linear(x, linear.weight, linear.bias))


@needs_packing
def test_pack_linears_replaces_nested_layers_and_keeps_outputs():
    model = _model()
    x = torch.randn(5, 96).to(torch.bfloat16)
    with torch.no_grad():
        expected = model(x)
    assert pack_linears(model) == 2
    assert isinstance(model[0], PackedLinear) and isinstance(model[1][0], PackedLinear)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    assert pack_linears(model) == 0  # already packed: nothing left to do


@needs_packing
def test_a_shape_that_does_not_match_stays_unpacked(monkeypatch):
    monkeypatch.setattr(cpu_linear, "_matches", lambda linear, packed: False)
    model = _model()
    assert pack_linears(model) == 0
    assert type(model[0]) is nn.Linear


@needs_packing
def test_loader_packs_a_bf16_model_and_keeps_the_embedding(tmp_path):
    from helpers.tiny_models import build_tiny_lm

    from arbitrage_fast.models.loader import load_model

    path = build_tiny_lm(tmp_path / "m", "qwen2", hidden=64, layers=2, heads=4, kv_heads=2)
    loaded = load_model(path, "bfloat16")
    assert isinstance(loaded.model.lm_head, PackedLinear)  # the tied head gets its own packed copy
    assert isinstance(loaded.model.layers[0].self_attn.qkv_proj, PackedLinear)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert type(load_model(path, "float32").model.lm_head) is nn.Linear


@needs_packing
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bf16_engine_with_packed_linears_matches_transformers(tmp_path, arch):
    from helpers.tiny_models import build_tiny_lm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from arbitrage_fast import Engine, EngineConfig, SamplingParams

    path = build_tiny_lm(tmp_path / "m", arch, hidden=64, layers=2, heads=4, kv_heads=2, boundary_bias=25.0)
    engine = Engine(EngineConfig(draft=str(path), target=str(path), dtype="bfloat16", kv_pages=64, min_block_size=4))
    assert isinstance(engine.target_model.model.lm_head, PackedLinear)
    prompt = "Janet has 16 eggs. She eats 3 and bakes with 4.\n\n"
    ids = AutoTokenizer.from_pretrained(path)(prompt)["input_ids"]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=40, do_sample=False)
    res = engine.generate(prompt, policy="target_only", sampling=SamplingParams(max_new_tokens=40, max_step_tokens=7))
    assert res.token_ids == out[0, len(ids):].tolist()


LAYER_LINEARS = {  # how each kind of bf16 linear is made at load: packing allowed, kernel allowed
    "onednn": (True, True, PackedLinear, -3),
    "kernel": (False, True, Bf16Linear, -4),
    "plain": (False, False, nn.Linear, -5),
}


@pytest.mark.parametrize("kind", LAYER_LINEARS)
def test_a_bf16_layer_runs_as_one_op_bit_for_bit_the_modules(tmp_path, monkeypatch, kind):
    """With exact arithmetic off, a bf16 checkpoint's layers run as one compiled op each,
    whatever linear the load chose (oneDNN-packed, the row-invariant kernel, or plain, with
    Qwen2's qkv bias): the logits over a prefill and decode steps are the modules' bits."""
    allow_packing, allow_kernel, linear_type, tag = LAYER_LINEARS[kind]
    if allow_packing and not packing_supported("cpu", torch.bfloat16):
        pytest.skip("oneDNN bf16 linear is not available on this CPU/torch build")
    if allow_kernel and not allow_packing and not cpu_linear.kernel_supported("cpu", torch.bfloat16):
        pytest.skip("the bf16 kernel has no vector path on this CPU")
    monkeypatch.setattr(cpu_linear, "packing_supported", lambda *a: allow_packing and packing_supported(*a))
    monkeypatch.setattr(cpu_linear, "kernel_supported", lambda *a: allow_kernel)
    folder = build_tiny_lm(tmp_path / "m", "qwen2", hidden=64, layers=2)
    loaded = loader.load_model(folder, "bfloat16")
    model = loaded.model
    assert all(layer.one_op is None for layer in model.layers)  # exact arithmetic by default
    gen = torch.Generator().manual_seed(1)
    for layer in model.layers:  # the tiny checkpoint's biases are zero: give them weight
        bias = layer.self_attn.qkv_proj.bias
        bias.copy_(torch.randn(bias.shape, generator=gen))
    model.set_exact_arithmetic(False)
    for layer in model.layers:
        assert type(layer.self_attn.qkv_proj) is linear_type and layer.self_attn.qkv_proj.bias is not None
        assert layer.one_op is not None and all(types == [tag] for types in layer.one_op.projections[1::3])
    calls = []
    real = PackedLayer.__call__
    monkeypatch.setattr(PackedLayer, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    prompt = AutoTokenizer.from_pretrained(folder)("We compute 12 + 30 = 42")["input_ids"]
    tokens, fused = greedy(model, loaded.spec, prompt, 6, torch.bfloat16)
    assert len(calls) == 12  # two layers, the prefill and five decode steps
    for layer in model.layers:
        layer.one_op = None
    assert torch.equal(teacher_forced(model, loaded.spec, prompt, tokens, torch.bfloat16), fused)
