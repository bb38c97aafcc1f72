"""The prefix cache: ended requests' KV kept for later requests with the same leading tokens.

Every answer is compared with the same request run by an engine without the cache (fp32, tiny
models, greedy or seeded): taking KV from the cache must change nothing but what is computed.
What is computed is counted by wrapping the runners' forwards, as in test_prefix_sharing.py.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from arbitrage_fast import EngineConfig, SamplingParams
from arbitrage_fast.policies import POLICY_NAMES
from arbitrage_fast.roles import Role
from helpers.length_prm import LengthPRM, build_policy_folders, policy_engine
from test_prefix_sharing import THRESHOLDS, FedCounter, _same

SP = SamplingParams(max_new_tokens=20, max_step_tokens=6, ignore_eos=True)
BASE = [5, 17, 3, 9, 22, 41, 7, 13, 2, 30, 11, 19, 8, 27, 6, 14, 33, 4, 21, 10]  # 20 token ids


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return build_policy_folders(tmp_path_factory.mktemp("prefix_cache"), router_seed=5)


@pytest.fixture(scope="module")
def reference(folders):
    return policy_engine(folders, prm=LengthPRM())


def cached_engine(folders, **extra):
    return policy_engine(folders, prm=LengthPRM(), prefix_cache=True, **extra)


def used_pages(engine) -> int:
    return engine.kv_stats()["used_pages"]


@pytest.mark.parametrize("policy", [p for p in POLICY_NAMES if p not in ("specreason", "lookahead")])
def test_a_repeated_prompt_reuses_the_kept_pages_and_answers_the_same(folders, reference, policy, monkeypatch):
    engine = cached_engine(folders)
    threshold = THRESHOLDS.get(policy)
    first = engine.generate(BASE, policy=policy, threshold=threshold, sampling=SP)
    assert engine.kv_stats()["prefix_cache"]["entries"] == 1 and used_pages(engine) > 0
    fed = FedCounter(engine, monkeypatch)
    again = engine.generate(BASE, policy=policy, threshold=threshold, sampling=SP)
    alone = reference.generate(BASE, policy=policy, threshold=threshold, sampling=SP)
    _same(first, alone)
    _same(again, alone)
    # The prompt's whole pages came from the cache in every model the policy prefilled.
    for role in Role:
        if again.stats[f"{role.label}_prefill_tokens"] + again.stats[f"{role.label}_cached_tokens"] == 0:
            continue
        page = engine.cache.block_size(role)
        whole = (len(BASE) - 1) - (len(BASE) - 1) % page
        assert again.stats[f"{role.label}_cached_tokens"] >= whole > 0
        assert all(pos >= whole for _, pos in fed.fed[role]), role
    assert engine.kv_stats()["prefix_cache"]["hits"] >= 1
    engine.reset_prefix_cache()
    assert used_pages(engine) == 0 and engine.kv_stats()["prefix_cache"]["entries"] == 0


def test_the_next_turn_takes_the_whole_previous_answer(folders, reference):
    """Multi-turn: the second prompt is the first prompt, its answer and a new turn."""
    engine = cached_engine(folders)
    first = engine.generate(BASE, policy="target_only", sampling=SP)
    turn = BASE + first.token_ids + [12, 24, 36, 48, 15]
    second = engine.generate(turn, policy="target_only", sampling=SP)
    _same(second, reference.generate(turn, policy="target_only", sampling=SP))
    page = engine.cache.block_size(Role.TARGET)
    # Everything the first request computed (its last token has no KV yet), in whole pages.
    kept = len(BASE) + len(first.token_ids) - 1
    assert second.stats["target_cached_tokens"] == kept - kept % page > len(BASE)
    engine.reset_prefix_cache()
    assert used_pages(engine) == 0


def test_a_kept_prefix_extended_by_a_later_request_is_kept_once(folders):
    engine = cached_engine(folders)
    first = engine.generate(BASE, policy="target_only", sampling=SP)
    engine.generate(BASE + first.token_ids, policy="target_only", sampling=SP)
    assert engine.kv_stats()["prefix_cache"]["entries"] == 1  # the longer entry holds the shorter's pages
    engine.generate(BASE[:9], policy="target_only", sampling=SamplingParams(max_new_tokens=2, ignore_eos=True))
    assert engine.kv_stats()["prefix_cache"]["entries"] <= 2
    engine.reset_prefix_cache()
    assert used_pages(engine) == 0


def test_an_aborted_request_leaves_its_computed_prefix(folders, reference):
    engine = cached_engine(folders)
    rid = engine.add_request(BASE, policy="rsd", threshold=0.6, sampling=SP)
    while not engine.request(rid).seq.steps:
        engine.step()
    assert engine.abort(rid)
    assert engine.kv_stats()["prefix_cache"]["entries"] == 1
    again = engine.generate(BASE, policy="rsd", threshold=0.6, sampling=SP)
    _same(again, reference.generate(BASE, policy="rsd", threshold=0.6, sampling=SP))
    assert again.stats["draft_cached_tokens"] > 0
    engine.reset_prefix_cache()
    assert used_pages(engine) == 0


def test_kept_prefixes_are_evicted_before_anything_fails_or_is_preempted(folders, reference):
    """A pool that holds about two requests: a stream of distinct prompts evicts the oldest
    entries and every answer is still the uncontended one; no request is preempted."""
    engine = cached_engine(folders, kv_pages=24)
    prompts = [[(7 * i + j) % 50 + 1 for j in range(14)] for i in range(6)]
    for prompt in prompts:
        out = engine.generate(prompt, policy="rsd", threshold=0.6, sampling=SP)
        _same(out, reference.generate(prompt, policy="rsd", threshold=0.6, sampling=SP))
        assert out.stats["preemptions"] == 0
    assert 1 <= engine.kv_stats()["prefix_cache"]["entries"] < len(prompts)
    engine.reset_prefix_cache()
    assert used_pages(engine) == 0


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.integers(0, 2), st.lists(st.integers(1, 60), min_size=1, max_size=6),
                          st.sampled_from(["rsd", "draft_only", "target_only", "oracle", "every_step"]),
                          st.integers(0, 3)), min_size=2, max_size=6),
       st.booleans())
def test_batches_over_a_tiny_pool_answer_as_alone(folders, reference, asks, batched):
    """Random batches of prompts that share prefixes of several lengths, some seeded samples,
    over a pool small enough to evict and preempt: each answer equals the request alone on an
    engine without the cache, and once the cache is reset no page is used."""
    engine = cached_engine(folders, kv_pages=40)
    prompts = [BASE[: 6 + 7 * cut] + tail for cut, tail, _, _ in asks]
    policies = [policy for _, _, policy, _ in asks]
    samplings = [SamplingParams(max_new_tokens=12, max_step_tokens=5, ignore_eos=True, temperature=1.0 if seed else 0.0,
                                seed=seed or None) for _, _, _, seed in asks]
    thresholds = [THRESHOLDS.get(p) for p in policies]
    if batched:
        outs = engine.generate_batch(prompts, policy=policies, threshold=thresholds, sampling=samplings)
        outs += engine.generate_batch(prompts[::-1], policy=policies[::-1], threshold=thresholds[::-1],
                                      sampling=samplings[::-1])[::-1]
        order = list(range(len(asks))) * 2
    else:
        outs = [engine.generate(p, policy=pol, threshold=t, sampling=s)
                for p, pol, t, s in zip(prompts, policies, thresholds, samplings)]
        order = list(range(len(asks)))
    for i, out in zip(order, outs):
        _same(out, reference.generate(prompts[i], policy=policies[i], threshold=thresholds[i], sampling=samplings[i]))
    engine.reset_prefix_cache()
    assert used_pages(engine) == 0


def test_the_cache_is_off_by_default_and_its_switch_is_checked(folders):
    engine = policy_engine(folders, prm=LengthPRM())
    engine.generate(BASE, policy="rsd", threshold=0.6, sampling=SP)
    assert used_pages(engine) == 0 and "prefix_cache" not in engine.kv_stats()
    draft, target, _ = folders
    with pytest.raises(ValueError, match="prefix_cache must be True or False"):
        EngineConfig(draft=str(draft), target=str(target), prefix_cache="yes")


def test_entries_are_evicted_least_recently_used_and_free_only_unshared_pages():
    import torch

    from arbitrage_fast.kv import KVSpec, PagedKVCache
    from arbitrage_fast.prefix_cache import PrefixCache
    from arbitrage_fast.sequence import Sequence

    pool = PagedKVCache([KVSpec(1, 1, 8), KVSpec(1, 1, 8)], 32, torch.float32, "cpu", min_block_size=4)
    page = pool.block_size(0)
    kept = PrefixCache(pool)

    def ended(tokens):  # a sequence that computed KV for all its tokens but the last
        seq = Sequence({0: tokens, 1: tokens}, "", shared_vocab=True)
        pool.add_sequence(seq.seq_id)
        pool.extend(seq.seq_id, 0, len(tokens) - 1)
        return seq

    a, b = ended(list(range(1, 3 * page + 2))), ended(list(range(50, 50 + 2 * page + 1)))
    for seq in (a, b):
        kept.retain(seq, tuple(Role))
        pool.free_sequence(seq.seq_id)
    entry_a, entry_b = kept.entries()
    assert entry_a.tokens == {Role.DRAFT: list(range(1, 3 * page + 1))}  # whole pages, one model
    assert pool.stats()["used_pages"] == 5
    kept.hit(entry_a.seq_id)  # a is now the most recently used
    assert kept.evict_one() and [e.seq_id for e in kept.entries()] == [entry_a.seq_id]
    assert pool.stats()["used_pages"] == 3
    # A running sequence sharing a's pages keeps them when a's entry goes.
    reader = Sequence({0: list(range(1, 3 * page + 1)), 1: []}, "", shared_vocab=False)
    pool.add_sequence(reader.seq_id)
    pool.share_prefix(entry_a.seq_id, reader.seq_id, 0, 2 * page)
    kept.clear()
    assert len(kept) == 0 and pool.stats()["used_pages"] == 2
    pool.free_sequence(reader.seq_id)
    assert pool.stats()["used_pages"] == 0
