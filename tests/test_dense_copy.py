"""A packed model with a 16-bit copy for its wide forwards (models/dense_copy.py): forwards
of at least `dense_rows` tokens are the dequantised model's bit for bit, narrower ones the
packed model's bit for bit; the engine's switch and its refusals (the command-line flag:
test_cli_decoding_flags.py; the real 0.5B: test_real_quantized.py)."""
from __future__ import annotations

import gguf
import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer

from arbitrage_fast import Engine, EngineConfig, SamplingParams
from arbitrage_fast.models import loader
from arbitrage_fast.models.cpu_linear import pack_linears
from arbitrage_fast.models.dense_copy import add_dense_copy
from arbitrage_fast.models.packed_layer import PackedLayer
from arbitrage_fast.models.quantized_linear import QuantizedLinear
from helpers.gguf_files import Session, greedy, teacher_forced, write_tiny_gguf
from helpers.tiny_models import build_tiny_lm

pytest.importorskip("arbitrage_fast._C", reason="the native extension is not built")
pytestmark = pytest.mark.usefixtures("two_threads")

QT = gguf.GGMLQuantizationType
# Packed types of the shipped files; layer 1's output projection a float tensor (shared by the copy).
TYPES = {"attn_q": QT.Q4_K, "attn_k": QT.Q4_K, "attn_v": QT.Q6_K, "attn_output": QT.Q8_0,
         "ffn_gate": QT.Q8_0, "ffn_up": QT.Q8_0, "ffn_down": QT.Q4_K, "token_embd": QT.Q8_0,
         "output": QT.Q6_K, "blk.1.attn_output": QT.F16}


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    folder = build_tiny_lm(tmp_path / "hf", "qwen2", hidden=256, heads=4, kv_heads=2, layers=2, tie=False)
    config, tokenizer = AutoConfig.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    path = write_tiny_gguf(tmp_path / "tiny.gguf", config, "qwen2", TYPES)
    monkeypatch.setattr(loader, "_read_gguf_metadata", lambda p: (config, tokenizer))
    return path, tokenizer


def _dense_layers(path, dtype: str):
    """The packed model of `path` with its decoder's packed linears replaced by float layers of
    their dequantised weights, given the float layers' own CPU treatment and rebuilt as one op
    per layer; its LM head stays packed: what a wide forward computes when its logits are one row."""
    model = loader.load_model(path, dtype).model
    for layer in model.layers:
        for parent, name in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"),
                             (layer.mlp, "gate_up_proj"), (layer.mlp, "down_proj")):
            packed = getattr(parent, name)
            if isinstance(packed, QuantizedLinear):
                dense = nn.Linear(packed.in_features, packed.out_features, bias=packed.bias is not None)
                dense.weight = nn.Parameter(packed.dequantized_weight().to(model.norm.weight.dtype), requires_grad=False)
                if packed.bias is not None:
                    dense.bias = nn.Parameter(packed.bias.clone(), requires_grad=False)
                setattr(parent, name, dense)
    pack_linears(model)
    model.set_exact_arithmetic(False)
    return model


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_wide_forwards_are_the_dequantised_model_and_narrow_ones_the_packed(tiny, dtype):
    path, tokenizer = tiny
    torch_dtype = loader.resolve_dtype(dtype)
    packed = loader.load_model(path, dtype)
    spec = packed.spec
    reference_packed = packed.model
    reference_dense = _dense_layers(path, dtype)
    prompt = tokenizer("We compute 12 + 30 = 42.\n\nThen 42 - 2 = 40, so")["input_ids"]
    assert len(prompt) >= 8
    tokens, packed_logits = greedy(reference_packed, spec, prompt, 10, torch_dtype)
    dense_logits = teacher_forced(reference_dense, spec, prompt, tokens, torch_dtype)
    assert not torch.equal(packed_logits, dense_logits)  # the int8 rounding of the inputs shows

    model = loader.load_model(path, dtype).model
    assert add_dense_copy(model, 4) == 3  # both layers and the head
    assert all(layer.wide_op is not None for layer in model.layers)
    o_proj = model.layers[1].self_attn.o_proj  # the float tensor: the copy shares it
    shared = o_proj.packed if hasattr(o_proj, "packed") else o_proj.weight  # oneDNN-packed in bf16
    assert any(part is shared for parts in model.layers[1].wide_op.projections
               if isinstance(parts, list) for part in parts)
    got = teacher_forced(model, spec, prompt, tokens, torch_dtype)
    assert torch.equal(got[0], dense_logits[0])  # the prompt's prefill: wide layers, a 1-row head
    # One-token decodes are narrow: the packed model's, over the KV the wide prefill wrote.
    hybrid = Session(reference_dense, spec, len(prompt) + len(tokens), torch_dtype)
    hybrid.feed(prompt)
    hybrid.model = reference_packed
    assert torch.equal(got[1:], torch.stack([hybrid.feed([t]) for t in tokens[:-1]]))

    # The head chooses by its own rows: four rows of logits take the dense head, three the packed.
    hidden = torch.randn(4, spec.hidden_size).to(torch_dtype)
    dense_head = reference_dense_head(reference_packed)
    assert torch.equal(model.compute_logits(hidden), dense_head(hidden).float())
    assert torch.equal(model.compute_logits(hidden[:3]), reference_packed.lm_head(hidden[:3]).float())
    assert not torch.equal(model.compute_logits(hidden)[:3], model.compute_logits(hidden[:3]))


def reference_dense_head(model):
    head = model.lm_head
    return lambda x: torch.nn.functional.linear(x, head.dequantized_weight().to(x.dtype))


def test_rows_at_the_threshold_take_the_copy(tiny, monkeypatch):
    path, tokenizer = tiny
    model = loader.load_model(path, "float32").model
    add_dense_copy(model, 3)
    used = []
    real = PackedLayer.__call__
    monkeypatch.setattr(PackedLayer, "__call__", lambda self, *a: used.append(self) or real(self, *a))
    spec = loader.load_model(path, "float32").spec
    teacher_forced(model, spec, [5, 6, 7], [8, 9], torch.float32)  # a 3-token prefill, then a decode
    wide = {id(layer.wide_op) for layer in model.layers}
    assert [id(op) in wide for op in used] == [True, True, False, False]


def test_exact_arithmetic_drops_the_copy(tiny):
    path, _ = tiny
    model = loader.load_model(path, "float32").model
    add_dense_copy(model, 2)
    model.set_exact_arithmetic(True)
    assert model.dense_rows is None and model.dense_head is None
    assert all(layer.wide_op is None for layer in model.layers)
    assert add_dense_copy(model, 2) == 1  # no one-op layers left to copy: the head only


def test_a_float_model_gets_no_copy(tmp_path):
    folder = build_tiny_lm(tmp_path / "hf", "qwen2", hidden=64, heads=4, kv_heads=2, layers=1, tie=True)
    model = loader.load_model(folder, "float32").model
    model.set_exact_arithmetic(False)
    assert add_dense_copy(model, 4) == 0
    assert model.dense_rows is None


@pytest.mark.parametrize("rows", [0, -1, True, 2.0])
def test_bad_rows_are_refused(tiny, rows):
    path, _ = tiny
    with pytest.raises(ValueError, match="dense rows must be a positive integer"):
        add_dense_copy(loader.load_model(path, "float32").model, rows)


def test_engine_serves_a_batch_with_the_copy_as_each_prompt_alone(tiny):
    """Greedy, fp32: a batch's decode forwards are wide (four rows), a lone request's narrow,
    so batched and alone may round differently; here the copy is taken by every forward
    (dense_rows=1) so both runs are the dequantised model, token for token."""
    path, tokenizer = tiny
    engine = Engine(EngineConfig(draft=str(path), target=str(path), dense_rows=1, kv_pages=64))
    assert isinstance(engine.draft_model.model.lm_head, QuantizedLinear)
    assert engine.draft_model.model.dense_head is not None
    prompts = ["We compute 12 + 30 = 42.\n\nThen", "Add 7 and 5.\n\n", "Two times three", "Half of ten is"]
    sp = SamplingParams(max_new_tokens=12, ignore_eos=True)
    alone = [engine.generate(p, "draft_only", sampling=sp).token_ids for p in prompts]
    batched = [r.token_ids for r in engine.generate_batch(prompts, "draft_only", sampling=sp)]
    assert batched == alone
    assert engine.kv_stats()["used_pages"] == 0


def test_engine_refusals(tiny, tmp_path):
    path, _ = tiny
    with pytest.raises(ValueError, match="dense_rows must be None or a positive integer"):
        EngineConfig(draft="d", target="t", dense_rows=0)
    with pytest.raises(ValueError, match="dequantize=True keeps no packed weights"):
        EngineConfig(draft="d", target="t", dense_rows=4, dequantize=True)
    with pytest.raises(ValueError, match="dense_rows is for the CPU.*'cuda'"):
        EngineConfig(draft="d", target="t", dense_rows=4, device="cuda")
    with pytest.raises(ValueError, match="batch_invariant=True cannot use dense_rows=4"):
        EngineConfig(draft="d", target="t", dense_rows=4, batch_invariant=True)
    folder = build_tiny_lm(tmp_path / "hf-float", "qwen2", hidden=64, heads=4, kv_heads=2, layers=1, tie=True)
    with pytest.raises(ValueError, match="dense_rows=4 needs packed weights"):
        Engine(EngineConfig(draft=str(folder), target=str(folder), dense_rows=4, exact_arithmetic=False))
