"""The quantile grid's pilot: each policy at its keep-all threshold writes the draft's own answer
and scores every step of it."""
from __future__ import annotations

import pytest

from arbitrage_fast.commands.common import build_engine
from arbitrage_fast.config import SamplingParams
from arbitrage_fast.eval.datasets import load_dataset
from arbitrage_fast.eval.score_pilot import pilot_scores
from arbitrage_fast.policies import StepEvidence
from arbitrage_fast.presets import resolve
from arbitrage_fast.testbed import CHECKPOINTS

pytestmark = pytest.mark.skipif(not (CHECKPOINTS / "draft" / "config.json").is_file(),
                                reason="testbed checkpoints not built")


def test_the_pilot_scores_every_step_of_the_drafts_own_answers(one_thread):
    preset = resolve("testbed")
    engine = build_engine(preset, max_batch=3)
    items = load_dataset("testbed", n=3, split="train", seed=0, instruction=preset.instruction)
    sampling = SamplingParams(max_new_tokens=64)
    policies = ["rsd", "arbitrage", "oracle", "lookahead"]
    scores = pilot_scores(engine, items, policies, sampling, {"chat": preset.chat}, in_flight=3)
    drafts = [engine.generate(item.prompt, policy="draft_only", sampling=sampling, chat=preset.chat)
              for item in items]
    assert engine.kv_stats()["used_pages"] == 0
    steps = sum(len(d.steps) for d in drafts)
    assert steps > 3 and {len(scores[p]) for p in policies} == {steps}
    # the scores are the ones its steps carry when its problems run alone (in flight
    # together they must not change): rsd's are the PRM's scores of the draft's steps
    policy = engine.policy("rsd")
    alone = [policy.score(StepEvidence(draft_prm=s.draft_prm)) for item in items
             for s in engine.generate(item.prompt, policy="rsd", threshold=0.0, sampling=sampling,
                                      chat=preset.chat).steps]
    assert sorted(scores["rsd"]) == pytest.approx(sorted(alone), abs=1e-6)  # runs end in any order
