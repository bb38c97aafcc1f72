"""Quantize on load through the engine, on tiny models: every policy runs with a quantized
draft, the target stays exact, the quantized draft decodes as its own greedy loop and mostly as
the fp32 draft, resident bytes shrink as the formats say, and bad settings are refused."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from arbitrage_fast import Engine, EngineConfig, SamplingParams
from arbitrage_fast.models import loader
from arbitrage_fast.models.group_quant import QuantScheme, quantize
from arbitrage_fast.models.quantize_on_load import Int3Linear
from arbitrage_fast.models.quantized_linear import QuantizedLinear
from arbitrage_fast.policies import POLICY_NAMES
from arbitrage_fast.router.head import RouterConfig, RouterHead
from helpers.gguf_files import greedy, teacher_forced
from helpers.length_prm import LengthPRM, build_policy_pair
from helpers.tiny_models import build_tiny_lm

pytest.importorskip("arbitrage_fast._C", reason="the native extension is not built")

SP = SamplingParams(max_new_tokens=24, max_step_tokens=6, ignore_eos=True)
PROMPT = "We compute 12 + 30 = 42"
THRESHOLD = {"rsd": 0.5, "oracle": 0.0, "arbitrage": 0.5, "every_step": 0.5}


@pytest.fixture(autouse=True)
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    draft, target = build_policy_pair(root)
    RouterHead(RouterConfig(hidden_size=32, width=8)).save(root / "router")
    return draft, target, root / "router"


def _engine(draft, target, router=None, **quant) -> Engine:
    return Engine(EngineConfig(draft=str(draft), target=str(target), router=router and str(router),
                               prm=LengthPRM(), kv_pages=64, min_block_size=4, **quant))


def _linears(model: nn.Module) -> list[nn.Module]:
    return [m for name, m in model.layers.named_modules() if name.endswith("_proj")]


def test_every_policy_runs_with_an_int4_draft_and_the_target_is_untouched(folders):
    draft, target, router = folders
    plain = _engine(draft, target, router)
    quant = _engine(draft, target, router, draft_quant="int4", quant_group=32)
    assert all(isinstance(m, QuantizedLinear) for m in _linears(quant.draft_model.model))
    assert all(type(m) is nn.Linear for m in _linears(quant.target_model.model))
    results = {}
    for policy in POLICY_NAMES:
        results[policy] = quant.generate(PROMPT, policy=policy, threshold=THRESHOLD.get(policy), sampling=SP)
        assert len(results[policy].token_ids) == SP.max_new_tokens, policy
        assert quant.kv_stats()["used_pages"] == 0, policy
    # The target is not quantized, and speculation is exact whatever the draft proposes.
    expected = plain.generate(PROMPT, policy="target_only", sampling=SP).token_ids
    assert results["target_only"].token_ids == expected
    assert results["spec_decode"].token_ids == expected


def _prompt_ids(folder, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)(text)["input_ids"]


@pytest.mark.parametrize("name", ["int8", "int4", "int3"])
def test_the_quantized_draft_decodes_its_own_greedy_tokens(folders, name):
    """The engine's draft_only tokens are those of a plain greedy loop over the same quantized
    model: the packed layers change the model, never the engine's bookkeeping."""
    draft, target, _ = folders
    engine = _engine(draft, target, draft_quant=name, quant_group=32)
    got = engine.generate(PROMPT, policy="draft_only", sampling=SP).token_ids
    lm = engine.draft_model
    want, _ = greedy(lm.model, lm.spec, _prompt_ids(draft, PROMPT), SP.max_new_tokens, torch.float32)
    assert got == want


def test_an_int8_draft_chooses_the_fp32_drafts_tokens_where_the_margin_is_clear(tmp_path):
    """A model trained-size weights (init 0.02), 48 greedy tokens: the int8 draft's logits, fed
    the fp32 draft's tokens, stay within a small error, and wherever the fp32 draft's top two
    logits are further apart than twice the largest error seen, both pick the same token."""
    folder = build_tiny_lm(tmp_path / "m", "qwen2", hidden=64, layers=2, seed=5, init_std=0.02)
    fp32 = loader.load_model(folder, "float32")
    int8 = loader.load_model(folder, "float32", quant=QuantScheme("int8"))
    prompt = _prompt_ids(folder, PROMPT)
    tokens, expected = greedy(fp32.model, fp32.spec, prompt, 48, torch.float32)
    got = teacher_forced(int8.model, int8.spec, prompt, tokens, torch.float32)
    err = (got - expected).abs().max(-1).values
    top2 = expected.topk(2, -1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * err.max()
    assert clear.sum() >= 24, f"only {int(clear.sum())} of 48 choices are clear of the error {err.max():.3g}"
    assert torch.equal(got.argmax(-1)[clear], expected.argmax(-1)[clear])
    # The error is int8's: well under a percent of the logits' spread.
    assert err.max() < 0.01 * (expected.max() - expected.min())


# Bytes per 64 weights against bf16's 128: Q8_0 2 x 34, Q4_1 2 x 20, int3 blocks 4 + 2 x 12.
RESIDENT_RATIO = {"int8": 34 / 64, "int4": 20 / 64, "int3": 28 / 128}


@pytest.mark.parametrize("name", ["int8", "int4", "int3"])
def test_resident_weights_shrink_by_the_formats_ratio(tmp_path, name):
    """bf16 checkpoint: every quantized projection holds ratio x its bf16 bytes (the CPU's
    blocks: GGUF Q8_0 for int8 and Q4_1 for int4, the engine's 3-bit blocks at group 64 for
    int3), the (untied) head Q8_0's 34/64, and the embeddings and norms stay bf16."""
    ratio = RESIDENT_RATIO[name]
    folder = build_tiny_lm(tmp_path / "m", "llama", hidden=64, layers=2, tie=False)
    dense = loader.load_model(folder, "bfloat16").model
    quant = loader.load_model(folder, "bfloat16", quant=QuantScheme(name, 64)).model

    def nbytes(model: nn.Module) -> int:
        # Parameters and buffers, shared ones once; bf16 layers packed for oneDNN keep their
        # weight as an opaque tensor outside both, counted from their shape.
        seen = {t.data_ptr(): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
        packed = sum(m.in_features * m.out_features * 2 for m in model.modules() if hasattr(m, "packed"))
        return sum(seen.values()) + packed

    linear_bf16 = sum(m.in_features * m.out_features * 2 for m in _linears(dense))
    linear_quant = sum(b.numel() * b.element_size() for m in _linears(quant) for b in m.buffers())
    assert linear_quant == linear_bf16 * ratio
    head_bf16 = dense.lm_head.in_features * dense.lm_head.out_features * 2
    assert isinstance(quant.lm_head, QuantizedLinear) and type(quant.embed_tokens) is nn.Embedding
    assert nbytes(dense) - nbytes(quant) == linear_bf16 * (1 - ratio) + head_bf16 * (1 - 34 / 64)


@pytest.mark.parametrize("tie", [True, False])
def test_the_head_is_q8_0_and_a_tied_table_shares_its_blocks(tmp_path, tie):
    """On CPU the head becomes Q8_0 whatever the layers' format: its logits are the dequantised
    head's (within the GGUF kernel's rounding bound, test_gguf_kernels), every weight is within half
    a step of the checkpoint's, and a tied embedding table looks its rows up from the same
    blocks (the bf16 table is gone), so an input embedding is the head's dequantised row."""
    from test_gguf_kernels import rounding_bound

    from arbitrage_fast.models import gguf_ops
    from arbitrage_fast.models.quantized_linear import QuantizedEmbedding

    folder = build_tiny_lm(tmp_path / "m", "qwen2", hidden=64, layers=2, tie=tie, seed=3, init_std=0.02)
    dense = loader.load_model(folder, "float32").model
    quant = loader.load_model(folder, "float32", quant=QuantScheme("int4", 32)).model
    head = quant.lm_head
    assert isinstance(head, QuantizedLinear) and head.extra_repr().endswith("Q8_0")
    (blocks, qtype), = head.weights()
    w = dense.lm_head.weight
    back = gguf_ops.dequantize_reference(blocks, qtype, w.shape[1])
    step = blocks.reshape(w.shape[0], -1, 34)[..., :2].contiguous().view(torch.float16).float()
    assert (step * 127 >= w.reshape(w.shape[0], -1, 32).abs().amax(-1, keepdim=True)).all()
    assert ((back - w).abs() <= step.repeat_interleave(32, 1).reshape(w.shape) / 2 + 1e-7).all()
    x = torch.randn(5, w.shape[1], generator=torch.Generator().manual_seed(0))
    err = (head(x).double() - gguf_ops.linear_reference(x, blocks, qtype).double()).abs()
    assert (err <= rounding_bound(x, blocks, qtype)).all()
    if tie:
        assert isinstance(quant.embed_tokens, QuantizedEmbedding)
        assert quant.embed_tokens.blocks.data_ptr() == blocks.data_ptr()
        ids = torch.tensor([0, 7, w.shape[0] - 1])
        assert torch.equal(quant.embed_tokens(ids), back[ids])
    else:
        assert torch.equal(quant.embed_tokens.weight, dense.embed_tokens.weight)


def test_an_int3_model_holds_seven_tenths_of_int4s_weight_bytes(tmp_path):
    """int3 at group 64 is 3.5 bits a weight on the CPU, int4 (Q4_1) 5: the quantized
    projections' resident bytes are in that ratio, whatever else the model holds."""
    folder = build_tiny_lm(tmp_path / "m", "llama", hidden=64, layers=2, tie=False)
    held = {}
    for name in ("int4", "int3"):
        model = loader.load_model(folder, "bfloat16", quant=QuantScheme(name, 64)).model
        assert all(isinstance(m, Int3Linear if name == "int3" else QuantizedLinear) for m in _linears(model))
        held[name] = sum(b.numel() * b.element_size() for m in _linears(model) for b in m.buffers())
    assert held["int3"] / held["int4"] == pytest.approx(3.5 / 5)


def test_a_gguf_draft_is_dequantised_then_quantized(tmp_path, monkeypatch):
    """A GGUF file with a quant takes the dequantising path (as `dequantize=True` does), not
    the packed one, and its float values are what gets quantized. The tiny file carries no
    tokenizer for transformers to parse, so the dequantised read is stood in for by the HF
    checkpoint the file was written from."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    from helpers.gguf_files import write_tiny_gguf

    folder = build_tiny_lm(tmp_path / "hf", "llama", hidden=64, layers=1)
    config = AutoConfig.from_pretrained(folder)
    path = write_tiny_gguf(tmp_path / "tiny.gguf", config, "llama", {"attn_q": gguf.GGMLQuantizationType.Q4_0})
    tensors = load_file(str(folder / "model.safetensors"))
    read = []
    monkeypatch.setattr(loader, "_read_gguf_cached",
                        lambda p, dtype: read.append(p) or (config, AutoTokenizer.from_pretrained(folder), tensors))
    quant = loader.load_model(path, "float32", quant=QuantScheme("int8")).model
    assert read == [path]
    dense = loader.load_model(folder, "float32").model
    for d, q in zip(_linears(dense), _linears(quant)):
        assert torch.equal(q.dequantized_weight(), quantize(d.weight, QuantScheme("int8")).dequantize())


@pytest.mark.parametrize("field, value, match", [
    ("draft_quant", "int2", "draft_quant must be None or one of .*'int2'"),
    ("target_quant", "fp8", "target_quant must be None or one of .*'fp8'"),
    ("quant_group", 48, "quant_group must be one of .*48"),
    ("quant_group", True, "quant_group must be one of .*True"),
])
def test_bad_quant_settings_are_refused(field, value, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(draft="d", target="t", **{field: value})


def test_a_preloaded_model_is_not_quantized_silently(folders):
    draft, target, _ = folders
    loaded = loader.load_model(draft)
    with pytest.raises(ValueError, match="draft_quant='int4'.*already loaded"):
        Engine(EngineConfig(draft=str(draft), target=str(target), draft_quant="int4"), draft=loaded)


def test_the_cli_threads_the_quant_flags(folders, capsys, monkeypatch):
    import arbitrage_fast
    from arbitrage_fast.cli import main

    draft, target, _ = folders
    built = []

    def engine(config):
        built.append(Engine(config))
        return built[-1]

    monkeypatch.setattr(arbitrage_fast, "Engine", engine)
    rc = main(["generate", "--draft", str(draft), "--target", str(target), "--draft-quant", "int3",
               "--quant-group", "32", "--policy", "draft_only", "--max-new-tokens", "8", PROMPT])
    assert rc == 0
    (eng,) = built
    assert (eng.config.draft_quant, eng.config.target_quant, eng.config.quant_group) == ("int3", None, 32)
    assert all(isinstance(m, Int3Linear) and m.group == 32 for m in _linears(eng.draft_model.model))
    for bad in (["--draft-quant", "int5"], ["--quant-group", "48"]):
        with pytest.raises(SystemExit):
            main(["generate", "--draft", str(draft), "--target", str(target), *bad, PROMPT])
        assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["int4", "int3"])
def test_a_quantized_layer_runs_as_one_op_bit_for_bit_the_modules(tmp_path, name):
    """Quantized on load (Q4_1 blocks for int4, the engine's int3 blocks), every layer runs as one
    compiled op, whose logits over a prefill and decode steps are the modules' bits."""
    folder = build_tiny_lm(tmp_path / "m", "qwen2", hidden=64, layers=2)
    loaded = loader.load_model(folder, "float32", quant=QuantScheme(name, 64))
    model = loaded.model
    assert all(layer.one_op is not None for layer in model.layers)
    assert all(layer.one_op.int3_group == (64 if name == "int3" else 0) for layer in model.layers)
    prompt = _prompt_ids(folder, PROMPT)
    tokens, fused = greedy(model, loaded.spec, prompt, 6, torch.float32)
    for layer in model.layers:
        layer.one_op = None
    assert torch.equal(teacher_forced(model, loaded.spec, prompt, tokens, torch.float32), fused)
