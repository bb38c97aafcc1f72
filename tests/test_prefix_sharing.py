"""Prefix sharing: requests with the same leading tokens compute their KV once.

Each test compares a batch against every request run alone (fp32, tiny models, greedy or
seeded), and counts what the models were actually fed by wrapping each runner's forward: a
prompt shared by several running requests must be computed once per model, except its last
token, which every request feeds itself (its logits start the request's first step).
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from arbitrage_fast import Engine, EngineConfig, SamplingParams
from arbitrage_fast.policies import POLICY_NAMES
from arbitrage_fast.prefix_sharing import common_prefix_len
from arbitrage_fast.request import RequestState
from arbitrage_fast.roles import Role
from helpers.length_prm import LengthPRM, build_policy_folders, policy_engine

PROMPT = "Ann has 7 apples and buys 5 more apples at the shop, then gives 3 to Bob"
OTHERS = ["We compute 12 + 30 = 42", "Ann has 7 apples and buys 2 pears", "x"]
SP = SamplingParams(max_new_tokens=24, max_step_tokens=6, ignore_eos=True)
# Not oracle at 0.0: when draft and target write the same step their PRM scores tie, and a tie
# decided by the last bit of a sum that another chunking of the prefill rounds differently is
# not a sharing bug.
THRESHOLDS = {"rsd": 0.6, "oracle": 0.05, "arbitrage": 0.5, "every_step": 0.5}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return build_policy_folders(tmp_path_factory.mktemp("prefix"), router_seed=3)


@pytest.fixture(scope="module", params=["target_likelihood", "length_prm"])
def engine(request, folders):
    return policy_engine(folders, prm=LengthPRM() if request.param == "length_prm" else None)


def _same(a, b) -> None:
    assert a.token_ids == b.token_ids
    assert [(s.text, s.source, s.ended_by) for s in a.steps] == [(s.text, s.source, s.ended_by) for s in b.steps]
    assert a.finish_reason == b.finish_reason


class FedCounter:
    """Every (sequence, position) each model computed, read off the runners' forwards."""

    def __init__(self, engine: Engine, monkeypatch) -> None:
        self.fed: dict[Role, list[tuple[int, int]]] = {Role.DRAFT: [], Role.TARGET: []}
        self.page = {m: engine.cache.block_size(m) for m in Role}
        for role, runner in engine.runners.items():
            monkeypatch.setattr(runner, "run", self._wrap(runner.run, role))

    def _wrap(self, run, role):
        def counted(works, starts):
            for work, start in zip(works, starts):
                self.fed[role] += [(work.seq_id, start + j) for j in range(len(work.tokens))]
            return run(works, starts)
        return counted

    def prompt_tokens_computed(self, role: Role, prompts: dict[int, list[int]]) -> int:
        """Positions before each sequence's last prompt token that `role` computed, all sequences together."""
        return sum(1 for seq, pos in self.fed[role] if seq in prompts and pos < len(prompts[seq]) - 1)

    def ran(self, role: Role) -> set[int]:
        return {seq for seq, _ in self.fed[role]}


def computed_once(prompts: list[list[int]], page: int) -> int:
    """Prompt tokens (each prompt without its last one) left to compute when every whole page of
    leading tokens that prompts share is computed once: a position counts once per distinct
    run of tokens up to the end of its page when that page lies wholly before the prompt's last
    token, else once per prompt. Exact for prompts none of which is a prefix of another."""
    pages, single = set(), 0
    for p in prompts:
        for j in range(len(p) - 1):
            end = j - j % page + page
            if end <= len(p) - 1:
                pages.add((tuple(p[:end]), j))
            else:
                single += 1
    return len(pages) + single


def _shared(engine, prompt_len: int) -> dict[Role, int]:
    """Tokens a copy of a running request's prompt takes over in each model: whole pages only."""
    n = prompt_len - 1  # the last prompt token is always fed
    return {m: n - n % engine.cache.block_size(m) for m in Role}


def _run(engine, requests) -> tuple[list, dict[int, list[int]]]:
    """Submit (prompt, policy, threshold, sampling) requests and run them to the end through the
    step API; returns the results in order and each sequence's prompt ids."""
    ids = [engine.add_request(p, policy=pol, threshold=t, sampling=s) for p, pol, t, s in requests]
    seqs = {i: engine.request(i).seq for i in ids}
    results = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                assert out.state is RequestState.FINISHED, out.error
                results[out.request_id] = out.result
                engine.forget(out.request_id)
    return [results[i] for i in ids], {s.seq_id: list(s.tokens(Role.TARGET)[:s.prompt_len[Role.TARGET]])
                                        for s in seqs.values()}


def _alone(engine, requests) -> list:
    return [engine.generate(p, policy=pol, threshold=t, sampling=s) for p, pol, t, s in requests]


def _check_computed_once(counter: FedCounter, prompts: dict[int, list[int]]) -> None:
    for role in Role:
        ran = counter.ran(role)
        expected = computed_once([p for seq, p in prompts.items() if seq in ran], counter.page[role])
        assert counter.prompt_tokens_computed(role, prompts) == expected, f"{role.label} recomputed a shared prefix"


def _batch_equals_alone_computing_shared_pages_once(engine, monkeypatch, requests):
    """`requests` in one batch: each equals its run alone, and every whole page of leading tokens
    that running prompts share was computed once per model. Returns (alone, batched, prompt
    tokens by sequence id)."""
    alone = _alone(engine, requests)
    counter = FedCounter(engine, monkeypatch)
    batched, prompts = _run(engine, requests)
    for a, b in zip(alone, batched):
        _same(a, b)
    _check_computed_once(counter, prompts)
    return alone, batched, prompts


# ---------------------------------------------------------------------- the same prompt, many requests
def _every_policy_on_one_prompt(engine, monkeypatch):
    """PROMPT under every policy in one batch (see _batch_equals_alone_computing_shared_pages_once)."""
    requests = [(PROMPT, pol, THRESHOLDS.get(pol), SP) for pol in POLICY_NAMES]
    return _batch_equals_alone_computing_shared_pages_once(engine, monkeypatch, requests)


def test_one_prompt_under_every_policy_prefills_once_and_equals_each_alone(engine, monkeypatch):
    alone, batched, prompts = _every_policy_on_one_prompt(engine, monkeypatch)
    shared = _shared(engine, len(next(iter(prompts.values()))))
    # target_only and draft_only, admitted first, computed the prompt in the target and the
    # draft; every later request took over its whole pages but the last token's.
    assert POLICY_NAMES[:2] == ("target_only", "draft_only") and shared[Role.DRAFT] == shared[Role.TARGET] > 0
    assert [r.stats["cached_prompt_tokens"] for r in batched] == [0, 0] + [shared[Role.DRAFT]] * (len(batched) - 2)
    assert all(a.stats["cached_prompt_tokens"] == 0 for a in alone)
    assert engine.kv_stats()["used_pages"] == 0


def test_shared_prompts_mixed_with_other_prompts(engine, monkeypatch):
    requests = [(PROMPT, pol, THRESHOLDS.get(pol), SP) for pol in ("rsd", "target_only", "arbitrage")]
    requests += [(p, pol, THRESHOLDS.get(pol), SP) for p, pol in zip(OTHERS, ("oracle", "rsd", "spec_decode"))]
    requests += [(OTHERS[0], "draft_only", None, SP), (PROMPT, "every_step", 0.5, SP)]
    _batch_equals_alone_computing_shared_pages_once(engine, monkeypatch, requests)
    assert engine.kv_stats()["used_pages"] == 0


def test_generate_batch_of_repeated_prompts_reports_cached_tokens(folders, monkeypatch):
    engine = policy_engine(folders)
    alone = engine.generate(PROMPT, policy="rsd", threshold=0.6, sampling=SP)
    counter = FedCounter(engine, monkeypatch)
    batched = engine.generate_batch([PROMPT] * 4, policy="rsd", threshold=0.6, sampling=SP)
    for b in batched:
        _same(alone, b)
    plen = len(engine.tokenizer(PROMPT)["input_ids"])
    shared = _shared(engine, plen)
    for role in Role:  # one request computed the prompt; three computed only what follows its whole pages
        assert sum(1 for _, pos in counter.fed[role] if pos < plen) == plen + 3 * (plen - shared[role])
    assert [b.stats["cached_prompt_tokens"] for b in batched] == [0] + [max(shared.values())] * 3
    for b in batched:  # what a copy computes plus what it took over is what it computed alone
        for role in ("draft", "target"):
            assert (b.stats[f"{role}_prefill_tokens"] + b.stats[f"{role}_cached_tokens"]
                    == alone.stats[f"{role}_prefill_tokens"])
    assert engine.kv_stats()["used_pages"] == 0


def test_seeded_samples_of_one_prompt_equal_each_alone(folders, monkeypatch):
    engine = policy_engine(folders)
    samplings = [SamplingParams(max_new_tokens=20, max_step_tokens=6, temperature=1.0, top_k=40, seed=s,
                                ignore_eos=True) for s in range(5)]
    policies = ["rsd", "rsd", "spec_decode", "target_only", "arbitrage"]
    requests = [(PROMPT, pol, THRESHOLDS.get(pol), s) for pol, s in zip(policies, samplings)]
    _, batched, _ = _batch_equals_alone_computing_shared_pages_once(engine, monkeypatch, requests)
    assert len({tuple(r.token_ids) for r in batched}) > 1, "the seeds were meant to give different samples"
    assert engine.kv_stats()["used_pages"] == 0


# ---------------------------------------------------------------------- the request shared from leaves
def _shares_pages(engine, req) -> bool:
    """Whether another sequence holds one of this request's pages right now."""
    cache, sid = engine.cache, req.seq.seq_id
    return cache.has_sequence(sid) and any(cache.pool.refcount(p) > 1 for m in Role
                                           for p in cache.block_table(sid, m))


def _record_leaving_while_shared(engine, monkeypatch, method: str) -> list:
    """Requests that left the batch through Scheduler.`method` (_finish, _preempt) while another
    sequence held some of their pages."""
    left = []
    original = getattr(engine.scheduler, method)

    def recorded(req, *args):
        if _shares_pages(engine, req):
            left.append(req)
        return original(req, *args)
    monkeypatch.setattr(engine.scheduler, method, recorded)
    return left


def test_aborting_the_request_whose_prompt_others_share(folders):
    engine = policy_engine(folders)
    followers = [(PROMPT, "rsd", 0.6, SP), (PROMPT, "oracle", 0.0, SP), (PROMPT, "draft_only", None, SP)]
    alone = _alone(engine, followers)
    donor = engine.add_request(PROMPT, policy="every_step", threshold=0.5, sampling=SP)
    ids = [engine.add_request(p, policy=pol, threshold=t, sampling=s) for p, pol, t, s in followers]
    for _ in range(10):  # the followers wait one iteration for the donor's prefill, then take it over
        if all(engine.request(i).stats.cached_prompt_tokens for i in ids):
            break
        engine.step()
    assert all(engine.request(i).stats.cached_prompt_tokens for i in ids)
    assert _shares_pages(engine, engine.request(donor))
    assert engine.abort(donor)
    results = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.result
    for i, ref in zip(ids, alone):
        _same(ref, results[i])
    assert donor not in results and engine.kv_stats()["used_pages"] == 0


def test_the_request_whose_prompt_others_share_finishing_first(folders, monkeypatch):
    engine = policy_engine(folders)
    short = SamplingParams(max_new_tokens=4, max_step_tokens=6, ignore_eos=True)
    requests = [(PROMPT, "rsd", 0.6, short)] + [(PROMPT, pol, THRESHOLDS.get(pol), SP)
                                                 for pol in ("rsd", "oracle", "spec_decode", "target_only")]
    alone = _alone(engine, requests)
    finished = _record_leaving_while_shared(engine, monkeypatch, "_finish")
    batched, _ = _run(engine, requests)
    for a, b in zip(alone, batched):
        _same(a, b)
    assert finished and finished[0].seq.num_generated == 4, "the donor was meant to finish while shared"
    assert engine.kv_stats()["used_pages"] == 0


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_preempting_requests_that_share_pages_changes_nothing(folders, monkeypatch, temperature):
    requests = [(PROMPT, pol, THRESHOLDS.get(pol), SamplingParams(max_new_tokens=30, max_step_tokens=6,
                                                                  temperature=temperature, seed=i, ignore_eos=True))
                for i, pol in enumerate(("rsd", "target_only", "rsd", "oracle", "draft_only", "spec_decode"))]
    alone = _alone(policy_engine(folders), requests)
    tight = policy_engine(folders, kv_pages=40)
    preempted = _record_leaving_while_shared(tight, monkeypatch, "_preempt")
    batched, _ = _run(tight, requests)
    for a, b in zip(alone, batched):
        _same(a, b)
    assert preempted, "the pool was meant to preempt a request whose pages another one shares"
    assert tight.kv_stats()["used_pages"] == 0


@pytest.mark.gpu
def test_on_the_gpu_with_graph_decoding_copies_equal_each_alone(folders, monkeypatch):
    """Copy-on-write through the CUDA page copy, and steps decoded by the chunked graph loop."""
    draft, target, router = folders
    engine = Engine(EngineConfig(draft=str(draft), target=str(target), router=str(router), device="cuda",
                                 kv_pages=256, min_block_size=4, decode_chunk=0))
    _every_policy_on_one_prompt(engine, monkeypatch)
    assert engine.kv_stats()["used_pages"] == 0


# ---------------------------------------------------------------------- random prompt sets and pools
def test_common_prefix_len_against_a_loop():
    @given(st.lists(st.integers(0, 3), max_size=40), st.lists(st.integers(0, 3), max_size=40))
    @settings(max_examples=300, deadline=None, database=None)
    def check(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        assert common_prefix_len(a, b) == n
    check()


_BASE = st.lists(st.integers(3, 250), min_size=4, max_size=40)
_REQUEST = st.tuples(st.integers(0, 45), st.lists(st.integers(3, 250), max_size=6), st.sampled_from(POLICY_NAMES),
                     st.sampled_from([None, 0, 1]))


@given(base=_BASE, shapes=st.lists(_REQUEST, min_size=3, max_size=6), budget=st.sampled_from([3, 7, 2048]),
       room=st.integers(0, 12))
@settings(max_examples=15, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_prompt_sets_and_pools_equal_each_alone_and_leak_nothing(folders, base, shapes, budget, room):
    """Prompts cut from one base at random lengths with random tails (copies, shared prefixes,
    strangers), random policies and seeds, a random token budget (chunked prefills to wait on)
    and a random pool from barely one request's worth up (preemption of shared pages)."""
    sp = dict(max_new_tokens=12, max_step_tokens=4, ignore_eos=True)
    requests = []
    for cut, tail, pol, seed in shapes:
        prompt = base[:max(1, cut)] + tail
        sampling = SamplingParams(**sp) if seed is None else SamplingParams(**sp, temperature=1.0, seed=seed)
        requests.append((prompt, pol, THRESHOLDS.get(pol), sampling))
    reference = _reference_engine(folders)
    alone = _alone(reference, requests)
    bs = reference.cache.block_sizes
    longest = max(len(p) for p, *_ in requests) + sp["max_new_tokens"] + sp["max_step_tokens"] + 2
    if any(pol == "specreason" for _, pol, *_ in requests):  # its judge prompt sits in the target's KV
        longest += len(reference.target_judge.prompt_ids)
    fits_one = sum(-(-longest // b) for b in bs)
    engine = policy_engine(folders, kv_pages=fits_one + 4 + room, max_batch_tokens=budget)
    batched, _ = _run(engine, requests)
    for a, b in zip(alone, batched):
        _same(a, b)
    assert engine.kv_stats()["used_pages"] == 0


_REFERENCE: dict = {}


def _reference_engine(folders) -> Engine:
    if "engine" not in _REFERENCE:
        _REFERENCE["engine"] = policy_engine(folders)
    return _REFERENCE["engine"]
