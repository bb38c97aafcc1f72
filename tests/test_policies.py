"""Each policy's decision rule, and what each costs in target work (on tiny models)."""
from __future__ import annotations

import pytest
import torch

from arbitrage_fast import Engine, EngineConfig, SamplingParams
from arbitrage_fast.policies import POLICY_NAMES, StepEvidence, default_threshold, make_policy
from arbitrage_fast.router.head import RouterConfig, RouterHead
from helpers.length_prm import LengthPRM, build_policy_pair


@pytest.mark.parametrize("name, threshold, evidence, expected", [
    ("rsd", 0.7, StepEvidence(draft_prm=0.69), True),
    ("rsd", 0.7, StepEvidence(draft_prm=0.7), False),
    ("oracle", 0.0, StepEvidence(draft_prm=0.5, target_prm=0.6), True),
    ("oracle", 0.0, StepEvidence(draft_prm=0.5, target_prm=0.5), False),
    ("oracle", 0.2, StepEvidence(draft_prm=0.5, target_prm=0.6), False),
    ("arbitrage", 0.5, StepEvidence(router_score=0.51), True),
    ("arbitrage", 0.5, StepEvidence(router_score=0.5), False),
    ("target_only", None, StepEvidence(), True),
    ("draft_only", None, StepEvidence(), False),
])
def test_decision_rules(name, threshold, evidence, expected):
    assert make_policy(name, threshold).escalate(evidence) is expected


def test_every_step_follows_router_or_rsd_rule():
    with_router = make_policy("every_step", 0.3, have_router=True)
    assert with_router.needs_router and with_router.generates_target_candidate
    assert with_router.escalate(StepEvidence(router_score=0.4)) is True
    without = make_policy("every_step", 0.3, have_router=False)
    assert without.needs_draft_prm and not without.needs_router
    assert without.escalate(StepEvidence(draft_prm=0.2)) is True


def test_evidence_each_policy_asks_for():
    assert not make_policy("target_only").drafts
    assert make_policy("rsd").needs_draft_prm and not make_policy("rsd").generates_target_candidate
    o = make_policy("oracle")
    assert o.needs_draft_prm and o.needs_target_prm and o.generates_target_candidate
    a = make_policy("arbitrage")
    assert a.needs_router and not a.needs_draft_prm and not a.generates_target_candidate
    assert set(POLICY_NAMES) == {"target_only", "draft_only", "spec_decode", "rsd", "oracle", "arbitrage", "every_step",
                                 "specreason", "spec_thinking", "lookahead"}


def test_default_threshold_is_the_one_a_policy_runs_at_when_given_none():
    """What the server reports for a request naming no threshold is what make_policy runs."""
    for name in (*POLICY_NAMES, "rsd:exact", "arbitrage:exact"):
        assert default_threshold(name) == make_policy(name).threshold
    assert default_threshold("rsd") == 0.7 and default_threshold("target_only") is None
    with pytest.raises(ValueError, match="unknown policy 'rsdd'"):
        default_threshold("rsdd")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pol")
    draft, target = build_policy_pair(root)
    router_dir = root / "router"
    head = RouterHead(RouterConfig(hidden_size=32, width=8))
    head.save(router_dir)
    return draft, target, router_dir


SP = SamplingParams(max_new_tokens=30, max_step_tokens=6, ignore_eos=True)
PROMPT = "We compute 12 + 30 = 42"


def test_oracle_keeps_the_better_step(folders):
    draft, target, _ = folders
    engine = Engine(EngineConfig(draft=str(draft), target=str(target), prm=LengthPRM(), kv_pages=64, min_block_size=4))
    res = engine.generate(PROMPT, policy="oracle", threshold=0.0, sampling=SP)
    for s in res.steps:
        assert s.draft_prm is not None and s.target_prm is not None
        assert (s.source == "target") == (s.target_prm - s.draft_prm > 0)
    # Oracle writes a target candidate at every step, whichever is kept.
    assert res.stats["target_tokens"] >= res.stats["steps"]
    assert engine.kv_stats()["used_pages"] == 0


def test_arbitrage_runs_the_target_only_on_escalated_steps(folders):
    draft, target, router_dir = folders
    engine = Engine(EngineConfig(draft=str(draft), target=str(target), router=str(router_dir), kv_pages=64, min_block_size=4))
    never = engine.generate(PROMPT, policy="arbitrage", threshold=1.0, sampling=SP)
    always = engine.generate(PROMPT, policy="arbitrage", threshold=0.0, sampling=SP)
    draft_only = engine.generate(PROMPT, policy="draft_only", sampling=SP)
    target_only = engine.generate(PROMPT, policy="target_only", sampling=SP)
    assert never.token_ids == draft_only.token_ids
    assert never.stats["target_tokens"] == 0 and never.stats["target_prefill_tokens"] == 0
    assert always.token_ids == target_only.token_ids
    assert all(0.0 <= s.router_score <= 1.0 for s in never.steps)
    # every_step writes the target's step every time, yet commits what arbitrage commits.
    every = engine.generate(PROMPT, policy="every_step", threshold=1.0, sampling=SP)
    assert every.token_ids == never.token_ids
    assert every.stats["target_tokens"] >= every.stats["steps"]
    assert engine.kv_stats()["used_pages"] == 0


def test_sampling_is_seeded(folders):
    draft, target, _ = folders
    engine = Engine(EngineConfig(draft=str(draft), target=str(target), kv_pages=64, min_block_size=4))
    sp = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    a = engine.generate(PROMPT, policy="rsd", threshold=0.5, sampling=sp)
    b = engine.generate(PROMPT, policy="rsd", threshold=0.5, sampling=sp)
    assert a.token_ids == b.token_ids
    assert len(a.token_ids) == 20


def test_label_generation_records_advantage_and_features(folders):
    from arbitrage_fast.router.data import generate_labels
    from arbitrage_fast.router.features import feature_dim

    draft, target, _ = folders
    engine = Engine(EngineConfig(draft=str(draft), target=str(target), prm=LengthPRM(), kv_pages=64, min_block_size=4))
    data = generate_labels(engine, [PROMPT, "Let x be the number"], SP, progress=False)
    assert data.features.shape == (len(data), feature_dim(32))
    assert torch.allclose(data.advantage, data.target_prm - data.draft_prm)
    assert set(data.problem.tolist()) == {0, 1}
    assert torch.isfinite(data.features).all()
    assert engine.kv_stats()["used_pages"] == 0


def test_a_policy_name_may_choose_its_prm():
    p = make_policy("rsd:likelihood", 0.4)
    assert (p.name, p.base_name, p.prm, p.threshold) == ("rsd:likelihood", "rsd", "likelihood", 0.4)
    assert p.escalate(StepEvidence(draft_prm=0.3)) and not p.escalate(StepEvidence(draft_prm=0.4))
    assert make_policy("oracle:exact").prm == "exact" and make_policy("rsd").prm is None
    with pytest.raises(ValueError, match="empty variant"):
        make_policy("arbitrage:")
    assert make_policy("every_step:likelihood", 0.5, have_router=False).needs_draft_prm
    with pytest.raises(ValueError, match="unknown PRM 'judge'"):
        make_policy("rsd:judge")
    with pytest.raises(ValueError, match="reads neither a PRM nor a router"):
        make_policy("target_only:exact")
    with pytest.raises(ValueError, match="reads neither a PRM nor a router"):
        make_policy("target_only:likelihood")
    # A router-reading policy's variant names a router head (the engine checks it holds one).
    assert make_policy("arbitrage:exact").variant == "exact" and make_policy("arbitrage:exact").prm is None
    assert make_policy("every_step:exact", 0.5, have_router=True).prm is None
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("rsdx:exact")


def test_prm_variants_are_built_once_per_engine():
    from arbitrage_fast.prm.build import PolicyPRMs
    from arbitrage_fast.prm.exact import ExactCheckerPRM

    default = LengthPRM()
    prms = PolicyPRMs(default)
    assert prms.for_policy(None) is default and prms.for_policy("likelihood") is None
    exact = prms.for_policy("exact")
    assert isinstance(exact, ExactCheckerPRM) and prms.for_policy("exact") is exact


def test_rsd_variants_equal_an_engine_built_with_that_prm(folders):
    # One engine, three RSD rows: its own PRM, the target's likelihood, and each the same as
    # an engine whose only PRM is that one.
    draft, target, _ = folders
    cfg = dict(draft=str(draft), target=str(target), kv_pages=64, min_block_size=4)
    with_prm = Engine(EngineConfig(**cfg, prm=LengthPRM()))
    likelihood_only = Engine(EngineConfig(**cfg))
    own = with_prm.generate(PROMPT, policy="rsd", threshold=0.6, sampling=SP)
    alone = Engine(EngineConfig(**cfg, prm=LengthPRM())).generate(PROMPT, policy="rsd", threshold=0.6, sampling=SP)
    assert own.token_ids == alone.token_ids
    via_name = with_prm.generate(PROMPT, policy="rsd:likelihood", threshold=0.6, sampling=SP)
    reference = likelihood_only.generate(PROMPT, policy="rsd", threshold=0.6, sampling=SP)
    assert via_name.token_ids == reference.token_ids
    assert [s.draft_prm for s in via_name.steps] == [s.draft_prm for s in reference.steps]
    assert [s.draft_prm for s in own.steps] != [s.draft_prm for s in via_name.steps]
    assert with_prm.kv_stats()["used_pages"] == 0


def test_arbitrage_variants_read_their_own_router_head(folders, tmp_path):
    # An engine holding a second head: "arbitrage:other" equals an engine whose only head it is.
    draft, target, router_dir = folders
    torch.manual_seed(11)
    RouterHead(RouterConfig(hidden_size=32, width=8)).save(tmp_path / "other")
    cfg = dict(draft=str(draft), target=str(target), kv_pages=64, min_block_size=4)
    both = Engine(EngineConfig(**cfg, router=str(router_dir), routers={"other": str(tmp_path / "other")}))
    only_other = Engine(EngineConfig(**cfg, router=str(tmp_path / "other")))
    via_name = both.generate(PROMPT, policy="arbitrage:other", threshold=0.5, sampling=SP)
    reference = only_other.generate(PROMPT, policy="arbitrage", threshold=0.5, sampling=SP)
    own = both.generate(PROMPT, policy="arbitrage", threshold=0.5, sampling=SP)
    assert via_name.token_ids == reference.token_ids
    assert [s.router_score for s in via_name.steps] == [s.router_score for s in reference.steps]
    assert [s.router_score for s in via_name.steps] != [s.router_score for s in own.steps]
    with pytest.raises(ValueError, match="router head 'missing'"):
        both.generate(PROMPT, policy="arbitrage:missing", threshold=0.5, sampling=SP)
    assert both.kv_stats()["used_pages"] == 0
