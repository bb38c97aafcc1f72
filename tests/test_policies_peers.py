"""The peer step-level methods as policies: SpecReason (`specreason`, the target judges the
draft step 0-9) and Speculative Thinking (`spec_thinking`, a reflection cue hands the next step
to the target). Their decision rules on fake evidence, the judge's score against an independent
full forward, their extremes, batching, KV accounting, and that no policy but the router's
pays for the router."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from arbitrage_fast import EngineConfig, SamplingParams
from arbitrage_fast.decision import decide_step, run_now
from arbitrage_fast.policies import (DEFAULT_REFLECTION_CUES, POLICY_NAMES, StepEvidence, check_cues, make_policy,
                                     opens_with_cue)
from arbitrage_fast.prm.target_judge import JUDGE_PROMPT, JudgeTokenError, TargetJudge
from arbitrage_fast.roles import Role
from helpers.length_prm import build_policy_folders, policy_engine

SP = SamplingParams(max_new_tokens=24, max_step_tokens=6, ignore_eos=True)
CUE_PROMPT = "Let x be the number"  # the tiny draft's first step here is "rrrrrr"


# ---------------------------------------------------------------- decision rules
@pytest.mark.parametrize("threshold, score, escalate", [
    (7.0, 6.99, True), (7.0, 7.0, False), (0.0, 0.0, False), (10.0, 9.0, True), (4.5, 4.6, False)])
def test_specreason_keeps_the_draft_step_at_or_above_the_threshold(threshold, score, escalate):
    pol = make_policy("specreason", threshold)
    assert pol.needs_judge and not pol.needs_draft_prm and not pol.needs_router
    assert pol.escalate(StepEvidence(judge_score=score)) is escalate


def test_specreason_threshold_range_and_default():
    assert make_policy("specreason").threshold == 7.0
    for bad in (-0.1, 10.5, float("nan")):
        with pytest.raises(ValueError, match="threshold"):
            make_policy("specreason", bad)


@pytest.mark.parametrize("text, expected", [
    ("Wait, that is wrong.\n\n", True), ("  wait we forgot\n\n", True), ("But 3 > 2\n\n", True),
    ("Butter costs 3.\n\n", False), ("Hmm.", True), ("Alternatively", True), ("So wait.\n\n", False),
    ("\n\n", False), ("", False)])
def test_reflection_cue_matches_the_first_word_only(text, expected):
    assert opens_with_cue(text, DEFAULT_REFLECTION_CUES) is expected


def test_spec_thinking_hands_over_only_after_a_drafted_cue_step():
    pol = make_policy("spec_thinking")
    assert pol.reads_previous_step and pol.threshold is None
    assert pol.takes_over(StepEvidence(previous_draft_step="Wait, 2 + 3 = 6?\n\n"))
    assert not pol.takes_over(StepEvidence(previous_draft_step="So 2 + 3 = 5.\n\n"))
    assert not pol.takes_over(StepEvidence(previous_draft_step=None))  # the target wrote the last step
    assert not pol.escalate(StepEvidence())  # a drafted step is always kept
    custom = make_policy("spec_thinking", reflection_cues=("Check",))
    assert custom.takes_over(StepEvidence(previous_draft_step="check: 5\n\n"))
    assert not custom.takes_over(StepEvidence(previous_draft_step="Wait\n\n"))


@pytest.mark.parametrize("cues, match", [((), "at least one"), (("",), "non-empty"), ((" Wait",), "whitespace"),
                                         ("Wait", "list of words")])
def test_bad_reflection_cues_are_refused(cues, match):
    with pytest.raises(ValueError, match=match):
        check_cues(cues)
    with pytest.raises(ValueError, match=match):
        EngineConfig(draft="d", target="t", reflection_cues=cues)


class _Source:
    """A step source answering at once, recording what the decision asked for."""

    def __init__(self, previous=None, judge=5.0):
        self.calls, self.previous, self.judge = [], previous, judge

    def draft_step(self):
        self.calls.append("draft_step")
        return "d"

    def target_step(self):
        self.calls.append("target_step")
        return "t"

    def judge_score(self, drafted):
        self.calls.append("judge_score")
        return self.judge

    def previous_draft_step(self):
        self.calls.append("previous_draft_step")
        return self.previous

    def router_score(self, drafted):
        raise AssertionError("router scored")

    def draft_prm(self, drafted):
        self.calls.append("draft_prm")
        return 0.5

    def target_prm(self, candidate):
        raise AssertionError("target PRM scored")

    def reject_draft(self, drafted):
        self.calls.append("reject_draft")

    def discard_candidate(self, candidate):
        raise AssertionError("no candidate was written")


def test_decide_step_asks_each_peer_policy_for_its_evidence_only():
    src = _Source(previous="Wait, no.\n\n")
    d = run_now(decide_step(make_policy("spec_thinking"), src))
    assert src.calls == ["previous_draft_step", "target_step"]  # the draft never writes this step
    assert d.escalated and d.kept == "t" and d.drafted is None and d.evidence.previous_draft_step == "Wait, no.\n\n"
    src = _Source(previous="So 5.\n\n")
    d = run_now(decide_step(make_policy("spec_thinking"), src))
    assert src.calls == ["previous_draft_step", "draft_step"] and not d.escalated
    src = _Source(judge=6.0)
    d = run_now(decide_step(make_policy("specreason", 7.0), src))
    assert src.calls == ["draft_step", "judge_score", "reject_draft", "target_step"] and d.escalated
    assert d.evidence.judge_score == 6.0
    src = _Source(judge=8.0)
    assert not run_now(decide_step(make_policy("specreason", 7.0), src)).escalated
    assert src.calls == ["draft_step", "judge_score"]
    for name in ("draft_only", "rsd"):
        src = _Source()
        run_now(decide_step(make_policy(name, have_router=True), src))
        assert "judge_score" not in src.calls and "previous_draft_step" not in src.calls


# ---------------------------------------------------------------- the judge's tokens
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return build_policy_folders(tmp_path_factory.mktemp("peers"), router_seed=5)


def test_judge_reads_ten_single_digit_tokens_and_refuses_a_tokenizer_that_splits_them(folders):
    tok = AutoTokenizer.from_pretrained(folders[1])
    judge = TargetJudge(tok)
    assert [tok.decode([i]) for i in judge.digit_ids] == [str(d) for d in range(10)]
    assert tok.decode(judge.prompt_ids) == JUDGE_PROMPT
    logits = torch.full((len(tok),), -30.0)
    logits[judge.digit_ids[7]] = logits[judge.digit_ids[3]] = 5.0
    assert judge.score(logits) == pytest.approx(5.0, abs=1e-5)  # half 7, half 3

    def splitting(text, add_special_tokens=False):
        return {"input_ids": [1, 2] if text == "7" else [ord(text[0])]}

    with pytest.raises(JudgeTokenError, match="splits '7' into 2 tokens"):
        TargetJudge(splitting, "a split-digit model")


# ---------------------------------------------------------------- in the engine


@pytest.fixture(scope="module")
def engine(folders):
    return policy_engine(folders, reflection_cues=("rrrrrr",))


@pytest.mark.parametrize("prompt", ["We compute 12 + 30 = 42", CUE_PROMPT])
def test_specreason_extremes_are_draft_only_and_target_only(engine, prompt):
    assert (engine.generate(prompt, policy="specreason", threshold=0.0, sampling=SP).token_ids
            == engine.generate(prompt, policy="draft_only", sampling=SP).token_ids)
    always = engine.generate(prompt, policy="specreason", threshold=10.0, sampling=SP)
    assert always.token_ids == engine.generate(prompt, policy="target_only", sampling=SP).token_ids
    assert all(s.source == "target" for s in always.steps)
    assert engine.kv_stats()["used_pages"] == 0


def test_specreason_scores_equal_a_full_forward_of_the_judge_prompt(engine, folders):
    """Each step's score equals the target's fresh forward over prompt + committed steps + the
    draft step + the judge prompt: the catch-up, the rollback of the judge prompt and the reuse
    of the judge's row for an escalation leave nothing stale in the target's KV."""
    hf = AutoModelForCausalLM.from_pretrained(folders[1], torch_dtype=torch.float32).eval()
    judge, tok = engine.target_judge, engine.tokenizers[Role.TARGET]
    prompt = "We compute 12 + 30 = 42"
    res = engine.generate(prompt, policy="specreason", threshold=4.5, sampling=SP)
    assert {s.source for s in res.steps} == {"draft", "target"}  # the threshold splits this run
    context = tok(prompt)["input_ids"]
    for s in res.steps:
        drafted = s.token_ids if s.source == "draft" else tok(s.rejected_draft, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = hf(torch.tensor([context + drafted + judge.prompt_ids])).logits[0, -1]
        assert s.judge_score == pytest.approx(judge.score(logits), abs=1e-4)
        assert (s.source == "target") == (s.judge_score < 4.5)
        context += s.token_ids
    assert engine.kv_stats()["used_pages"] == 0


def test_spec_thinking_gives_the_step_after_each_drafted_cue_to_the_target(engine):
    res = engine.generate(CUE_PROMPT, policy="spec_thinking", sampling=SP)
    steps = res.steps
    assert steps[0].text == "rrrrrr" and steps[0].source == "draft" and steps[1].source == "target"
    for prev, step in zip(steps, steps[1:]):
        assert (step.source == "target") == (prev.source == "draft" and opens_with_cue(prev.text, ("rrrrrr",)))
    assert res.stats["escalations"] == sum(s.source == "target" for s in steps) >= 1
    assert engine.kv_stats()["used_pages"] == 0
    # Cues that never open a step: every step is the draft's, token for token.
    plain = policy_engine(folders_of(engine))
    assert (plain.generate(CUE_PROMPT, policy="spec_thinking", sampling=SP).token_ids
            == plain.generate(CUE_PROMPT, policy="draft_only", sampling=SP).token_ids)


def folders_of(engine):
    return engine.draft_model.path, engine.target_model.path, engine.config.router


def test_peer_policies_batched_with_the_others_equal_each_prompt_alone(engine):
    prompts = ["We compute 12 + 30 = 42", CUE_PROMPT, "A", CUE_PROMPT, "Q: 3 * 4 = ?", "x", CUE_PROMPT, "x"]
    policies = ["specreason", "spec_thinking", "specreason", "rsd", "specreason", "arbitrage", "specreason",
                "spec_thinking"]
    thresholds = [4.5, None, 5.0, 0.6, 0.0, 0.5, 10.0, None]
    alone = [engine.generate(p, policy=pol, threshold=t, sampling=SP) for p, pol, t in zip(prompts, policies, thresholds)]
    batched = engine.generate_batch(prompts, policy=policies, threshold=thresholds, sampling=SP)
    for a, b in zip(alone, batched):
        assert a.token_ids == b.token_ids
        assert [(s.text, s.source) for s in a.steps] == [(s.text, s.source) for s in b.steps]
        # batched matmuls round differently in the last bits; the decisions above are the same
        assert [s.judge_score for s in a.steps] == pytest.approx([s.judge_score for s in b.steps], abs=1e-5)
    assert any(s.source == "target" for s in batched[1].steps)
    assert engine.kv_stats()["used_pages"] == 0


def test_a_target_whose_digits_split_is_refused_before_the_request_starts(folders, monkeypatch):
    eng = policy_engine(folders)

    def refuse(self):
        raise JudgeTokenError("splits '7'")

    monkeypatch.setattr(type(eng), "target_judge", property(refuse))
    with pytest.raises(JudgeTokenError):
        eng.generate("x", policy="specreason", sampling=SP)
    assert eng.kv_stats()["used_pages"] == 0 and not eng.has_unfinished_requests()


# ---------------------------------------------------------------- the router is paid for only where it is read
class _Spy(torch.nn.Module):
    """Stands in for the router head and counts every way a score could be computed."""

    def __init__(self, head):
        super().__init__()
        self.head, self.calls = head, 0

    def forward(self, features):
        self.calls += 1
        return self.head(features)

    def folded(self):
        self.calls += 1
        return self.head.folded()


@pytest.mark.parametrize("decode_chunk", [1, 2])
def test_only_policies_that_read_the_router_compute_its_score(folders, decode_chunk):
    eng = policy_engine(folders, decode_chunk=decode_chunk, reflection_cues=("rrrrrr",))
    spy = _Spy(eng.router)
    eng.router = spy
    for name in POLICY_NAMES:
        pol = make_policy(name, have_router=True)
        if pol.needs_router:
            continue
        eng.generate_batch([CUE_PROMPT, "We compute 12 + 30 = 42"], policy=name, sampling=SP)
        assert spy.calls == 0, f"{name} computed router scores"
    res = eng.generate(CUE_PROMPT, policy="arbitrage", threshold=0.5, sampling=SP)
    assert spy.calls >= 1 and all(s.router_score is not None for s in res.steps)
    assert eng.kv_stats()["used_pages"] == 0
