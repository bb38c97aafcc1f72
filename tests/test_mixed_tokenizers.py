"""Draft and target with different vocabularies: steps are handed over as text, each model
keeps its own ids and KV, and outputs stay exact for each model's own decisions."""
from __future__ import annotations

import functools

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from arbitrage_fast import Engine, EngineConfig, SamplingParams
from arbitrage_fast.prm.base import ProcessRewardModel
from helpers.tiny_models import build_tiny_lm

PROMPT = "Janet has 16 eggs. She eats 3"


class AlternatingPRM(ProcessRewardModel):
    def score(self, prompt, previous_steps, step):
        return 0.0 if len(previous_steps) % 2 else 1.0


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    draft = build_tiny_lm(root / "draft", "llama", hidden=32, layers=2, seed=1, vocab_size=270, boundary_bias=3.0)
    target = build_tiny_lm(root / "target", "qwen2", hidden=48, layers=2, seed=2, vocab_size=300, boundary_bias=3.0)
    return draft, target


@functools.lru_cache(maxsize=4)
def _hf(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(folder)


def greedy(folder, ids, n):
    model, _ = _hf(folder)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def test_single_model_policies_are_exact_in_their_own_vocabulary(pair):
    draft, target = pair
    engine = Engine(EngineConfig(draft=str(draft), target=str(target), kv_pages=64, min_block_size=4))
    assert not engine.shared_vocab
    sp = SamplingParams(max_new_tokens=24, max_step_tokens=6)
    d = engine.generate(PROMPT, policy="draft_only", sampling=sp)
    assert [t for s in d.steps for t in s.token_ids] == greedy(draft, _hf(draft)[1](PROMPT)["input_ids"], 24)
    t = engine.generate(PROMPT, policy="target_only", sampling=sp)
    assert t.token_ids == greedy(target, _hf(target)[1](PROMPT)["input_ids"], 24)
    # rsd at its extremes reproduces them (target-likelihood PRM over re-tokenized draft steps).
    assert engine.generate(PROMPT, policy="rsd", threshold=0.0, sampling=sp).text == d.text
    assert engine.generate(PROMPT, policy="rsd", threshold=1.5, sampling=sp).token_ids == t.token_ids
    assert engine.kv_stats()["used_pages"] == 0


def test_text_handoff_replays_step_by_step(pair):
    """Each committed step is what its writer produces from the committed text, re-tokenized
    step by step into its own vocabulary."""
    draft, target = pair
    engine = Engine(EngineConfig(draft=str(draft), target=str(target), prm=AlternatingPRM(), kv_pages=64,
                                 min_block_size=4))
    res = engine.generate(PROMPT, policy="rsd", threshold=0.5, sampling=SamplingParams(max_new_tokens=30, max_step_tokens=5))
    assert [s.source for s in res.steps[:4]] == ["draft", "target", "draft", "target"]
    folders = {"draft": draft, "target": target}
    ids = {k: _hf(f)[1](PROMPT)["input_ids"] for k, f in folders.items()}
    for step in res.steps:
        assert step.token_ids == greedy(folders[step.source], ids[step.source], len(step.token_ids))
        for k, f in folders.items():
            ids[k] = ids[k] + (step.token_ids if k == step.source else
                               _hf(f)[1](step.text, add_special_tokens=False)["input_ids"])
    assert res.text == "".join(s.text for s in res.steps)
    assert engine.kv_stats()["used_pages"] == 0
