"""Lookahead Reasoning as a policy (`lookahead`): the draft writes k steps ahead, the target
judges them in one forward by their likelihood, the longest prefix scoring >= the threshold is
kept and the target writes the step at the first rejection.

The round's decision against a Python model of it (hypothesis), the rule's extremes against
draft_only and target_only, and the property that pins the KV rollback: under greedy decoding
a step is kept or rewritten from the committed context alone, so k cannot change the answer,
and lookahead at any k gives RSD's tokens (RSD scores with the same target likelihood) while
paying one target forward per round. Batching, preemption and prefix sharing are checked with
every other policy in tests/test_batching.py and tests/test_prefix_sharing.py."""
from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from arbitrage_fast import EngineConfig, SamplingParams
from arbitrage_fast.decision import decide_ahead, run_now
from arbitrage_fast.policies import DEFAULT_LOOKAHEAD_K, make_policy
from arbitrage_fast.prm.target_likelihood import mean_token_probability, steps_mean_probabilities
from arbitrage_fast.roles import Role
from helpers.length_prm import MIXED_PROMPTS, build_policy_folders, policy_engine

SP = SamplingParams(max_new_tokens=24, max_step_tokens=6, ignore_eos=True)
# On the tiny pair the target finds most first steps unlikely (scores 0.0001-0.008), later
# ones near 1: these thresholds keep some steps and reject others, mid-round included.
THRESHOLDS = (0.003, 0.005, 0.01)


# ---------------------------------------------------------------- the rule
@pytest.mark.parametrize("scores, threshold, kept", [
    ([0.6, 0.5, 0.4, 0.9], 0.5, 2),  # 0.5 passes (>=), 0.4 fails, and 0.9 after it is dropped
    ([0.4, 0.9, 0.9], 0.5, 0),
    ([0.9, 0.8, 0.7], 0.5, 3),
    ([0.0, 0.0], 0.0, 2),  # threshold 0 keeps every draft step
    ([1.0, 1.0], 1.01, 0),  # above 1 no mean probability passes
])
def test_the_longest_prefix_at_or_above_the_threshold_is_kept(scores, threshold, kept):
    pol = make_policy("lookahead", threshold)
    assert pol.accepted_steps(scores) == kept
    assert pol.drafts and pol.drafts_ahead == DEFAULT_LOOKAHEAD_K
    assert not (pol.needs_draft_prm or pol.needs_judge or pol.needs_router or pol.generates_target_candidate)


@pytest.mark.parametrize("k", [0, -1, 2.5, True, "3"])
def test_a_bad_k_is_refused_with_its_name(k):
    with pytest.raises(ValueError, match="lookahead_k"):
        make_policy("lookahead", 0.5, lookahead_k=k)
    with pytest.raises(ValueError, match="lookahead_k"):
        EngineConfig(draft="d", target="t", lookahead_k=k)


@pytest.mark.parametrize("threshold", [-0.1, math.nan])
def test_a_bad_threshold_is_refused(threshold):
    with pytest.raises(ValueError, match="threshold"):
        make_policy("lookahead", threshold)


class _Round:
    """A StepSource in plain Python: the draft's steps are 'd0', 'd1', ...; the target's 't'."""

    def __init__(self, scores):
        self.scores, self.calls = scores, []

    def draft_ahead(self, k):
        self.calls.append(("draft_ahead", k))
        return [f"d{i}" for i in range(len(self.scores))]

    def judge_ahead(self, drafted):
        self.calls.append(("judge_ahead", len(drafted)))
        return list(self.scores)

    def keep_ahead(self, drafted, kept):
        self.calls.append(("keep_ahead", kept))

    def target_step(self):
        self.calls.append(("target_step",))
        return "t"


@given(scores=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6), threshold=st.floats(0.0, 1.5),
       k=st.integers(1, 6))
def test_a_round_commits_the_accepted_prefix_then_the_targets_step(scores, threshold, k):
    scores = scores[:k]  # the draft writes at most k steps
    src = _Round(scores)
    decisions = run_now(decide_ahead(make_policy("lookahead", threshold, lookahead_k=k), src))
    # The model: walk the steps, keep while the score passes, at the first failure the target writes.
    expected, rejected = [], None
    for i, s in enumerate(scores):
        if s < threshold:
            rejected = i
            break
        expected.append((f"d{i}", False, f"d{i}", s))
    if rejected is not None:
        expected.append(("t", True, f"d{rejected}", scores[rejected]))
    assert [(d.kept, d.escalated, d.drafted, d.evidence.judge_score) for d in decisions] == expected
    kept = len(expected) - (rejected is not None)
    assert src.calls == [("draft_ahead", k), ("judge_ahead", len(scores)), ("keep_ahead", kept)] + (
        [("target_step",)] if rejected is not None else [])


@given(steps=st.lists(st.lists(st.integers(0, 9), max_size=4), min_size=1, max_size=4), seed=st.integers(0, 99))
def test_steps_scored_from_one_forward_equal_each_step_scored_alone(steps, seed):
    import torch

    flat = [t for s in steps for t in s]
    logits = torch.randn(len(flat), 10, generator=torch.Generator().manual_seed(seed))
    scores = steps_mean_probabilities(logits, steps)
    start = 0
    for step, score in zip(steps, scores):
        alone = mean_token_probability(logits[start:start + len(step)], step) if step else 0.0
        assert score == pytest.approx(alone, abs=1e-6)
        start += len(step)


# ---------------------------------------------------------------- in the engine
@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return policy_engine(build_policy_folders(tmp_path_factory.mktemp("lookahead"), router_seed=3))


@pytest.mark.parametrize("prompt", MIXED_PROMPTS[:3])
def test_extremes_are_draft_only_and_target_only(engine, prompt):
    keep_all = engine.generate(prompt, policy="lookahead", threshold=0.0, sampling=SP)
    assert keep_all.token_ids == engine.generate(prompt, policy="draft_only", sampling=SP).token_ids
    assert all(s.source == "draft" for s in keep_all.steps) and keep_all.stats["wasted_draft_steps"] == 0
    rewrite_all = engine.generate(prompt, policy="lookahead", threshold=1.01, sampling=SP)
    assert rewrite_all.token_ids == engine.generate(prompt, policy="target_only", sampling=SP).token_ids
    assert all(s.source == "target" for s in rewrite_all.steps)
    assert rewrite_all.stats["escalations"] == rewrite_all.stats["steps"]
    # each round drafted k steps (fewer where the budget ran out) and kept none of them
    assert len(rewrite_all.steps) <= rewrite_all.stats["wasted_draft_steps"] <= 3 * len(rewrite_all.steps)
    assert engine.kv_stats()["used_pages"] == 0


def _target_forwards(engine, monkeypatch) -> list:
    runner, calls = engine.runners[Role.TARGET], []
    original = runner.run
    monkeypatch.setattr(runner, "run", lambda works, starts: (calls.append(len(works)), original(works, starts))[1])
    return calls


def test_one_target_forward_judges_each_round(engine, monkeypatch):
    calls = _target_forwards(engine, monkeypatch)
    res = engine.generate(MIXED_PROMPTS[0], policy="lookahead", threshold=0.0, sampling=SP)
    # every round drafts k = 3 steps (the budget may cut the last) and the target reads them at once
    rounds = math.ceil(len(res.steps) / 3)
    assert len(calls) == rounds and res.stats["target_tokens"] == 0
    # the prompt and every step, plus the last token of each round but the last, fed again
    # after the rollback that leaves each model short of its last token
    prompt = len(engine._encode(MIXED_PROMPTS[0], False)[0][Role.TARGET])
    assert res.stats["target_prefill_tokens"] == prompt + len(res.token_ids) + rounds - 1


@pytest.fixture(scope="module")
def engines_by_k(engine):
    return {k: policy_engine(_folders(engine), lookahead_k=k) for k in (1, 2, 5)}


@pytest.mark.parametrize("prompt", MIXED_PROMPTS[:4])
@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_any_k_gives_rsds_tokens(engine, engines_by_k, prompt, threshold):
    """Greedy, a step's fate depends only on the committed context: k only changes how many
    draft steps are written past a rejection and how many target forwards judge them."""
    rsd = engine.generate(prompt, policy="rsd", threshold=threshold, sampling=SP)
    for k, eng in engines_by_k.items():
        res = eng.generate(prompt, policy="lookahead", threshold=threshold, sampling=SP)
        assert res.token_ids == rsd.token_ids, f"k={k}"
        assert [(s.text, s.source) for s in res.steps] == [(s.text, s.source) for s in rsd.steps]
        assert [s.judge_score for s in res.steps] == pytest.approx([s.draft_prm for s in rsd.steps], abs=1e-5)
        assert res.stats["escalations"] == rsd.stats["escalations"]
        if k == 1:  # one step a round, as RSD: a rejected draft step is the only waste
            assert res.stats["wasted_draft_steps"] == rsd.stats["wasted_draft_steps"] == rsd.stats["escalations"]
        assert eng.kv_stats()["used_pages"] == 0


@pytest.mark.parametrize("option", [{"decode_chunk": 2}, {"spec_k": 2}])
def test_chunked_decoding_and_speculated_rewrites_give_the_same_tokens(engine, option):
    """The draft's steps ahead through the chunked decoder; the target's step after kept draft
    steps (not committed yet) speculated by the draft from that uncommitted context."""
    other = policy_engine(_folders(engine), **option)
    proposed = 0
    for prompt in MIXED_PROMPTS[:4]:
        want = engine.generate(prompt, policy="lookahead", threshold=0.005, sampling=SP)
        got = other.generate(prompt, policy="lookahead", threshold=0.005, sampling=SP)
        assert got.token_ids == want.token_ids
        assert [(s.text, s.source) for s in got.steps] == [(s.text, s.source) for s in want.steps]
        proposed += got.stats.get("spec_proposed", 0)
    assert (proposed > 0) == ("spec_k" in option)
    assert other.kv_stats()["used_pages"] == 0


def _folders(engine):
    return engine.draft_model.path, engine.target_model.path, engine.config.router


def test_the_budget_is_never_overdrafted(engine):
    """Drafting ahead stops at max_new_tokens: no round commits a step past it, and no round
    is cut short of what draft_only writes."""
    for n in (1, 5, 7, 13):
        sp = SamplingParams(max_new_tokens=n, max_step_tokens=6, ignore_eos=True)
        res = engine.generate(MIXED_PROMPTS[1], policy="lookahead", threshold=0.0, sampling=sp)
        assert res.token_ids == engine.generate(MIXED_PROMPTS[1], policy="draft_only", sampling=sp).token_ids
        assert len(res.token_ids) == n and res.finish_reason == "length"
        mixed = engine.generate(MIXED_PROMPTS[1], policy="lookahead", threshold=0.005, sampling=sp)
        assert len(mixed.token_ids) == n and mixed.finish_reason == "length"
    assert engine.kv_stats()["used_pages"] == 0


# ---------------------------------------------------------------- in the sweep
def test_the_sweep_grid_and_records_know_lookahead():
    from types import SimpleNamespace

    from arbitrage_fast.commands.sweep import parse_thresholds, sweep_settings

    assert parse_thresholds(None, ["lookahead"])["lookahead"] == parse_thresholds(None, ["rsd"])["rsd"]
    preset = SimpleNamespace(name="p", draft="d", target="t", router=None, routers={}, prm=None, label_prm=None, audit_prm=None, dataset="gsm8k",
                             dtype="float32", instruction=None)
    args = dict(dataset=None, seed=0, max_new_tokens=64, dtype=None, spec_k=0, dequantize=False, draft_quant=None,
                target_quant=None, quant_group=64)
    # k changes lookahead's answers, so a records file or calibration made at another k is refused;
    # the default is left out, so files written before the flag existed still resume
    assert sweep_settings(preset, SimpleNamespace(**args, lookahead_k=5))["lookahead_k"] == 5
    for k in (None, DEFAULT_LOOKAHEAD_K):
        assert "lookahead_k" not in sweep_settings(preset, SimpleNamespace(**args, lookahead_k=k))
