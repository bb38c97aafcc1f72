"""Greedy outputs of the native engine equal transformers' `generate`, token for token (fp32).

rsd with threshold 0 must equal draft_only and with threshold > 1 target_only: every step
is then rolled back and rewritten by the target, which proves rollback and catch-up.
"""
from __future__ import annotations

import functools

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from arbitrage_fast import Engine, EngineConfig, SamplingParams
from arbitrage_fast.prm.base import ProcessRewardModel
from helpers.tiny_models import build_tiny_lm

PROMPTS = [
    "Janet has 16 eggs. She eats 3 and bakes with 4.\n\n",
    "We compute 12 + 30 = 42",
    "Let x be the number",
]


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def pair(request, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    extra = {"sliding_window": 24} if arch == "mistral" else {}
    draft = build_tiny_lm(root / "draft", arch, hidden=48, layers=2, seed=1, tie=True, boundary_bias=25.0, **extra)
    target = build_tiny_lm(root / "target", arch, hidden=64, layers=3, seed=2, tie=False, boundary_bias=25.0, **extra)
    engine = Engine(EngineConfig(draft=str(draft), target=str(target), kv_pages=64, min_block_size=4))
    return arch, draft, target, engine


@functools.lru_cache(maxsize=4)
def hf_model(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def hf_greedy(folder, prompt_ids, max_new_tokens):
    model = hf_model(folder)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
    return out[0, len(prompt_ids):].tolist()


def prompt_ids(folder, text):
    return AutoTokenizer.from_pretrained(folder)(text)["input_ids"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_draft_only_and_target_only_match_transformers(pair, prompt):
    _, draft, target, engine = pair
    sp = SamplingParams(max_new_tokens=40, max_step_tokens=7)
    ids = prompt_ids(draft, prompt)
    for policy, folder in (("draft_only", draft), ("target_only", target)):
        res = engine.generate(prompt, policy=policy, sampling=sp)
        assert res.token_ids == hf_greedy(folder, ids, 40), policy
        assert sum(len(s.token_ids) for s in res.steps) == len(res.token_ids)
        assert engine.kv_stats()["used_pages"] == 0


def test_steps_end_on_boundaries(pair):
    _, _, _, engine = pair
    res = engine.generate(PROMPTS[0], policy="draft_only", sampling=SamplingParams(max_new_tokens=60, max_step_tokens=50))
    assert len(res.steps) >= 2
    for s in res.steps[:-1]:
        assert s.ended_by in ("boundary", "step_cap")
        if s.ended_by == "boundary":
            assert "\n\n" in engine.tokenizer.decode(s.token_ids[-1:])
    assert any(s.ended_by == "boundary" for s in res.steps)


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_rsd_extremes_equal_single_model_policies(pair, prompt):
    _, _, _, engine = pair
    sp = SamplingParams(max_new_tokens=48, max_step_tokens=6)
    draft_only = engine.generate(prompt, policy="draft_only", sampling=sp)
    target_only = engine.generate(prompt, policy="target_only", sampling=sp)
    keep_all = engine.generate(prompt, policy="rsd", threshold=0.0, sampling=sp)
    escalate_all = engine.generate(prompt, policy="rsd", threshold=1.5, sampling=sp)
    assert keep_all.token_ids == draft_only.token_ids
    assert keep_all.stats["escalations"] == 0
    assert escalate_all.token_ids == target_only.token_ids
    assert escalate_all.stats["escalations"] == len(escalate_all.steps) >= 2
    assert all(s.source == "target" for s in escalate_all.steps)
    assert engine.kv_stats()["used_pages"] == 0


class AlternatingPRM(ProcessRewardModel):
    """Scores every other step low, so rsd alternates between keeping and escalating."""

    def score(self, prompt, previous_steps, step):
        return 0.0 if len(previous_steps) % 2 else 1.0


def test_mixed_acceptance_matches_step_by_step_replay(pair):
    """Some steps kept, some rewritten: each committed step must be exactly what its model
    writes from the committed context at that point (rollback and catch-up leave no trace)."""
    arch, draft, target, _ = pair
    extra = dict(kv_pages=64, min_block_size=4)
    engine = Engine(EngineConfig(draft=str(draft), target=str(target), prm=AlternatingPRM(), **extra))
    sp = SamplingParams(max_new_tokens=48, max_step_tokens=5)
    res = engine.generate(PROMPTS[1], policy="rsd", threshold=0.5, sampling=sp)
    assert [s.source for s in res.steps[:4]] == ["draft", "target", "draft", "target"]
    sources = {s.source for s in res.steps}
    ids = prompt_ids(draft, PROMPTS[1])
    models = {"draft": draft, "target": target}
    for s in res.steps:
        expected = hf_greedy(models[s.source], ids, len(s.token_ids))
        assert s.token_ids == expected, s.source
        ids = ids + s.token_ids
    assert sources == {"draft", "target"}
    assert engine.kv_stats()["used_pages"] == 0
