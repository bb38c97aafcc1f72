"""Continuous batching: a request's output does not depend on what else is in flight.

Every test compares a batched run against each request run alone (fp32, tiny models whose
greedy argmaxes are far from ties), so a scheduling bug that mixes rows, KV pages or
generators between requests shows up as a different token.
"""
from __future__ import annotations

import pytest

from arbitrage_fast import SamplingParams
from arbitrage_fast.kv import KVCacheExhausted
from arbitrage_fast.policies import POLICY_NAMES
from arbitrage_fast.request import RequestState
from arbitrage_fast.roles import Role
from arbitrage_fast.runtime.batch_graphs import BUCKETS, DecodeBuckets, is_decode_batch
from helpers.length_prm import MIXED_PROMPTS, LengthPRM, build_policy_folders, policy_engine

PROMPTS = MIXED_PROMPTS[:7]
SP = SamplingParams(max_new_tokens=24, max_step_tokens=6, ignore_eos=True)
# Thresholds chosen per policy so that batches mix escalated and kept steps.
THRESHOLDS = {"rsd": [0.3, 0.6, 0.9], "oracle": [0.0, 0.1, -0.1], "arbitrage": [0.3, 0.5, 0.7],
              "every_step": [0.3, 0.5, 0.7], "specreason": [4.5, 5.0, 4.0], "lookahead": [0.003, 0.005, 0.01]}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return build_policy_folders(tmp_path_factory.mktemp("batch"), router_seed=3)




@pytest.fixture(scope="module", params=["target_likelihood", "length_prm"])
def engine(request, folders):
    return policy_engine(folders, prm=LengthPRM() if request.param == "length_prm" else None)


def _threshold(policy: str, i: int):
    return THRESHOLDS[policy][i % 3] if policy in THRESHOLDS else None


def _mixed_batch(policy: str, n: int = 6):
    """n prompts: the even ones under `policy` (thresholds varied), the odd ones under the others."""
    others = [p for p in POLICY_NAMES if p != policy]
    policies = [policy if i % 2 == 0 else others[i // 2 % len(others)] for i in range(n)]
    return PROMPTS[:n], policies, [_threshold(p, i) for i, p in enumerate(policies)]


def _same(a, b) -> None:
    assert a.token_ids == b.token_ids
    assert [(s.text, s.source, s.ended_by) for s in a.steps] == [(s.text, s.source, s.ended_by) for s in b.steps]
    assert a.finish_reason == b.finish_reason


def _alone(engine, prompts, policies, thresholds, sampling=SP):
    samplings = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
    return [engine.generate(p, policy=pol, threshold=t, sampling=s)
            for p, pol, t, s in zip(prompts, policies, thresholds, samplings)]


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_every_policy_batched_with_the_others_equals_each_prompt_alone(engine, policy):
    prompts, policies, thresholds = _mixed_batch(policy)
    alone = _alone(engine, prompts, policies, thresholds)
    batched = engine.generate_batch(prompts, policy=policies, threshold=thresholds, sampling=SP)
    for a, b in zip(alone, batched):
        _same(a, b)
    assert engine.kv_stats()["used_pages"] == 0


# Policies whose target forwards return only some rows (a score over the draft step, the
# judgement, a verification), split over iterations here.
@pytest.mark.parametrize("policy", ["rsd", "oracle", "specreason", "spec_decode"])
def test_a_tiny_token_budget_splits_prefills_and_changes_nothing(folders, policy):
    engine = policy_engine(folders, max_batch_tokens=5)
    prompts, policies, thresholds = _mixed_batch(policy, 7)
    reference = _alone(policy_engine(folders), prompts, policies, thresholds)
    batched = engine.generate_batch(prompts, policy=policies, threshold=thresholds, sampling=SP)
    for a, b in zip(reference, batched):
        _same(a, b)
    assert engine.kv_stats()["used_pages"] == 0


def test_each_forward_serves_the_whole_batch(folders, monkeypatch):
    """One forward per role per iteration, and decode rows of different requests share it."""
    engine = policy_engine(folders)
    calls: list[tuple[Role, int]] = []
    for role, runner in engine.runners.items():
        original = runner.run
        monkeypatch.setattr(runner, "run", lambda works, starts, _o=original, _r=role: (
            calls.append((_r, len(works))), _o(works, starts))[1])
    ids = [engine.add_request(p, policy="rsd", threshold=0.6, sampling=SP) for p in PROMPTS[:6]]
    while engine.has_unfinished_requests():
        before = len(calls)
        engine.step()
        roles = [r for r, _ in calls[before:]]
        assert len(roles) == len(set(roles)), "more than one forward of a role in one iteration"
    assert max(n for r, n in calls if r is Role.DRAFT) == 6
    assert max(n for r, n in calls if r is Role.TARGET) > 1
    for i in ids:
        engine.forget(i)
    assert engine.kv_stats()["used_pages"] == 0


@pytest.mark.parametrize("buckets, policy", [(BUCKETS, p) for p in POLICY_NAMES] + [((1, 4), "arbitrage")])
def test_decode_batches_padded_to_graph_buckets_equal_each_prompt_alone(folders, buckets, policy, monkeypatch):
    """The CUDA-graph bucket path (runtime/batch_graphs.py) run eagerly: every decode-only
    forward is padded to its bucket and described in the device form a graph replays. With
    buckets (1, 4), forwards of 5 or 6 decode rows stay eager and unpadded between padded ones."""
    engine = policy_engine(folders)
    decode_forwards = []  # (rows, whether the padded path served it) of each decode-only forward
    for runner in engine.runners.values():
        runner.buckets = DecodeBuckets(runner, padded=True, buckets=buckets)
        original = runner.buckets.run

        def spy(works, starts, _original=original):
            out = _original(works, starts)
            if is_decode_batch(works):
                decode_forwards.append((len(works), out is not None))
            return out

        monkeypatch.setattr(runner.buckets, "run", spy)
    prompts, policies, thresholds = _mixed_batch(policy)
    reference = _alone(policy_engine(folders), prompts, policies, thresholds)
    batched = engine.generate_batch(prompts, policy=policies, threshold=thresholds, sampling=SP)
    for a, b in zip(reference, batched):
        _same(a, b)
    assert any(n not in buckets for n, padded in decode_forwards if padded), "no forward was padded"
    assert all(padded == (n <= buckets[-1]) for n, padded in decode_forwards)
    if buckets[-1] < 6:
        assert any(not padded for _, padded in decode_forwards), "no decode forward was past the largest bucket"
    for runner in engine.runners.values():
        assert set(runner.buckets.served) <= set(buckets) and runner.buckets.captured == ()
    assert engine.kv_stats()["used_pages"] == 0


@pytest.mark.parametrize("decode_chunk", [1, 3])
def test_seeded_sampling_is_the_same_alone_and_batched(folders, decode_chunk):
    """Per-request generators; with decode_chunk != 1 a seeded sampled request keeps the chunked
    decoder beside others (its chunks consume random numbers past a step's end), so its tokens
    are those it draws alone there too."""
    engine = policy_engine(folders, decode_chunk=decode_chunk)
    samplings = [SamplingParams(max_new_tokens=20, max_step_tokens=6, temperature=1.0, top_k=40, seed=s,
                                ignore_eos=True) for s in range(6)]
    policies = ["rsd", "draft_only", "target_only", "oracle", "spec_decode", "arbitrage"]
    thresholds = [_threshold(p, 1) for p in policies]
    alone = _alone(engine, PROMPTS[:6], policies, thresholds, samplings)
    batched = engine.generate_batch(PROMPTS[:6], policy=policies, threshold=thresholds, sampling=samplings)
    for a, b in zip(alone, batched):
        _same(a, b)
    assert len({tuple(r.token_ids) for r in batched}) > 1


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("policy", ["rsd", "lookahead"])  # lookahead: a round preempted whole is redrawn
def test_preemption_under_a_tiny_pool_gives_the_uncontended_tokens(folders, policy, temperature):
    prompts, policies, thresholds = _mixed_batch(policy, 6)
    samplings = [SamplingParams(max_new_tokens=24, max_step_tokens=6, temperature=temperature, seed=i,
                                ignore_eos=True) for i in range(6)]
    reference = _alone(policy_engine(folders), prompts, policies, thresholds, samplings)
    tight = policy_engine(folders, kv_pages=32)  # every request fits alone, not all at once
    batched = tight.generate_batch(prompts, policy=policies, threshold=thresholds, sampling=samplings)
    for a, b in zip(reference, batched):
        _same(a, b)
    assert sum(r.stats["preemptions"] for r in batched) > 0, "the pool was meant to force preemption"
    assert tight.kv_stats()["used_pages"] == 0


def test_a_request_that_cannot_fit_alone_fails_and_the_others_finish(folders):
    engine = policy_engine(folders, kv_pages=8)
    short = SamplingParams(max_new_tokens=6, max_step_tokens=6, ignore_eos=True)
    long = SamplingParams(max_new_tokens=200, max_step_tokens=6, ignore_eos=True)
    ok = engine.add_request(PROMPTS[1], policy="draft_only", sampling=short)
    doomed = engine.add_request(PROMPTS[0], policy="rsd", threshold=0.9, sampling=long)
    ended = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                ended[out.request_id] = out
    assert ended[ok].state is RequestState.FINISHED and len(ended[ok].result.token_ids) == 6
    assert ended[doomed].state is RequestState.FAILED
    assert isinstance(ended[doomed].error, KVCacheExhausted)
    assert "does not fit in the KV pool even alone" in str(ended[doomed].error)
    assert engine.kv_stats()["used_pages"] == 0


def test_a_prompt_the_pool_can_never_hold_is_refused_up_front(folders):
    engine = policy_engine(folders, kv_pages=2)
    with pytest.raises(KVCacheExhausted, match="the prompt needs .* KV pages"):
        engine.add_request(PROMPTS[3], policy="rsd")
    assert engine.kv_stats()["used_pages"] == 0 and not engine.has_unfinished_requests()


def test_step_api_streams_each_step_once_and_abort_frees_pages(folders):
    engine = policy_engine(folders)
    prompts, policies, thresholds = _mixed_batch("oracle", 6)
    reference = _alone(engine, prompts, policies, thresholds)
    ids = [engine.add_request(p, policy=pol, threshold=t, sampling=SP)
           for p, pol, t in zip(prompts, policies, thresholds)]
    victim = ids[2]
    steps = {i: [] for i in ids}
    results = {}
    iterations = 0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        iterations += 1
        if iterations == 3:
            assert engine.abort(victim) and not engine.abort(victim)
        for out in outputs:
            assert out.request_id != victim or iterations < 3, "an aborted request kept running"
            steps[out.request_id] += out.steps
            if out.finished:
                results[out.request_id] = out.result
    assert engine.kv_stats()["used_pages"] == 0
    assert victim not in results
    for rid, ref in zip(ids, reference):
        if rid != victim:
            _same(ref, results[rid])
            assert [s.text for s in steps[rid]] == [s.text for s in ref.steps]


def test_max_batch_caps_the_running_set(folders):
    engine = policy_engine(folders, max_batch=2)
    prompts, policies, thresholds = _mixed_batch("arbitrage", 6)
    reference = _alone(engine, prompts, policies, thresholds)
    ids = [engine.add_request(p, policy=pol, threshold=t, sampling=SP)
           for p, pol, t in zip(prompts, policies, thresholds)]
    results = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.result
        assert engine.num_requests()["running"] <= 2
    for rid, ref in zip(ids, reference):
        _same(ref, results[rid])
    assert all(results[i].stats["queue_s"] >= 0 for i in ids)


def test_completions_keeps_exactly_its_window_in_flight_and_aborts_the_rest_when_stopped(folders, monkeypatch):
    """`Engine.completions`: never more than `in_flight` requests in the engine, a new one added
    as soon as one ends (so the window stays full while work remains), each result equal to its
    request alone; a caller that stops early leaves nothing running and no page held."""
    engine = policy_engine(folders)
    prompts, policies, thresholds = _mixed_batch("rsd", 6)
    reference = _alone(engine, prompts, policies, thresholds)
    in_engine = []
    step = engine.step

    def counting_step():
        in_engine.append(sum(engine.num_requests().values()))
        return step()

    monkeypatch.setattr(engine, "step", counting_step)
    runs = [(i, {"prompt": p, "policy": pol, "threshold": t, "sampling": SP})
            for i, (p, pol, t) in enumerate(zip(prompts, policies, thresholds))]
    ended = list(engine.completions(runs, 3))
    assert sorted(i for i, _, _ in ended) == list(range(6)) and all(s > 0 for _, _, s in ended)
    for i, result, _ in ended:
        _same(reference[i], result)
    assert max(in_engine) == 3 and in_engine[0] == 3
    assert engine.kv_stats()["used_pages"] == 0 and not engine.has_unfinished_requests()

    flight = engine.completions(runs, 2)
    next(flight)
    flight.close()  # the caller stops: the other request in flight is aborted
    assert not engine.has_unfinished_requests() and engine.kv_stats()["used_pages"] == 0
    with pytest.raises(ValueError, match="in_flight must be >= 1"):
        next(engine.completions(runs, 0))


def test_closing_a_stream_cancels_it_between_other_requests(folders):
    engine = policy_engine(folders)
    other = engine.add_request(PROMPTS[0], policy="rsd", sampling=SP)
    stream = engine.stream(PROMPTS[1], policy="oracle", sampling=SP)
    next(stream)
    stream.close()
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.request(other).state is RequestState.FINISHED
    assert engine.kv_stats()["used_pages"] == 0


def test_per_prompt_arguments_must_match_the_prompts(folders):
    engine = policy_engine(folders)
    with pytest.raises(ValueError, match="policy has 2 values for 3 prompts"):
        engine.generate_batch(PROMPTS[:3], policy=["rsd", "draft_only"])
    with pytest.raises(ValueError, match="unknown policy"):
        engine.generate_batch(PROMPTS[:2], policy=["rsd", "nope"])
    assert not engine.has_unfinished_requests() and engine.kv_stats()["used_pages"] == 0


def test_a_denormal_temperature_samples_greedily(folders):
    engine = policy_engine(folders)
    greedy = engine.generate(PROMPTS[0], policy="draft_only", sampling=SP)
    tiny = SamplingParams(max_new_tokens=24, max_step_tokens=6, ignore_eos=True, temperature=1.2e-38)
    _same(greedy, engine.generate(PROMPTS[0], policy="draft_only", sampling=tiny))


def _shared_chunks(engine, monkeypatch) -> list[int]:
    """Rows of each chunk the engine's shared chunked loops run (runtime/chunked_rows.py)."""
    from arbitrage_fast.runtime.chunked_rows import ChunkedRows

    rows: list[int] = []
    original = ChunkedRows.run_chunk
    monkeypatch.setattr(ChunkedRows, "run_chunk", lambda self, works: (rows.append(len(works)),
                                                                       original(self, works))[1])
    return rows


def _same_scores(a, b) -> None:
    for x, y in zip(a.steps, b.steps):
        for name in ("draft_prm", "target_prm", "router_score"):
            u, v = getattr(x, name), getattr(y, name)
            assert (u is None) == (v is None), name
            if u is not None:
                assert u == pytest.approx(v, rel=1e-4, abs=1e-6), name


@pytest.mark.parametrize("decode_chunk", [0, 3])
@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_greedy_steps_share_one_chunked_loop_and_equal_each_prompt_alone(folders, policy, decode_chunk,
                                                                         monkeypatch):
    """With decode_chunk != 1 a lone request decodes in chunks on its own loop (fewer host reads
    than tokens); beside others its greedy steps are rows of one shared chunked loop per model,
    several rows a chunk, and every token, score and stop equals the prompt run alone, with no
    page left behind."""
    engine = policy_engine(folders, decode_chunk=decode_chunk)
    prompts, policies, thresholds = _mixed_batch(policy, 6)
    alone = _alone(engine, prompts, policies, thresholds)
    per_token = _alone(policy_engine(folders), prompts, policies, thresholds)
    for pol, chunked, tokenwise in zip(policies, alone, per_token):
        _same(chunked, tokenwise)
        if pol != "spec_decode":  # its steps are the speculative decoder's, whatever the chunk
            assert chunked.stats["decode_host_syncs"] < tokenwise.stats["decode_host_syncs"]  # chunks, not tokens
    rows = _shared_chunks(engine, monkeypatch)
    batched = engine.generate_batch(prompts, policy=policies, threshold=thresholds, sampling=SP)
    for a, b in zip(alone, batched):
        _same(a, b)
        _same_scores(a, b)
    assert max(rows) > 1
    shared = [r for r, pol in zip(batched, policies) if pol != "spec_decode"]
    assert sum(r.stats["decode_host_syncs"] for r in shared) < sum(
        r.stats["decode_host_syncs"] for r, pol in zip(per_token, policies) if pol != "spec_decode")
    assert engine.kv_stats()["used_pages"] == 0


@pytest.mark.parametrize("policy", ["rsd", "arbitrage"])
def test_shared_chunked_rows_under_a_tiny_pool_preempt_and_give_the_uncontended_tokens(folders, policy,
                                                                                      monkeypatch):
    prompts, policies, thresholds = _mixed_batch(policy, 6)
    reference = _alone(policy_engine(folders), prompts, policies, thresholds)
    tight = policy_engine(folders, kv_pages=32, decode_chunk=4)
    rows = _shared_chunks(tight, monkeypatch)
    batched = tight.generate_batch(prompts, policy=policies, threshold=thresholds, sampling=SP)
    for a, b in zip(reference, batched):
        _same(a, b)
    assert max(rows) > 1
    assert sum(r.stats["preemptions"] for r in batched) > 0, "the pool was meant to force preemption"
    assert tight.kv_stats()["used_pages"] == 0


def test_aborting_a_request_mid_step_frees_its_row_and_pages(folders):
    engine = policy_engine(folders, decode_chunk=3)
    prompts, policies, thresholds = _mixed_batch("arbitrage", 4)
    ids = [engine.add_request(p, policy=pol, threshold=t, sampling=SP)
           for p, pol, t in zip(prompts, policies, thresholds)]
    rows = engine.scheduler.chunked_rows(Role.DRAFT)
    for _ in range(20):  # until a request holds a row between chunks
        engine.step()
        holding = [r for r in engine.scheduler.running if r.seq.seq_id in rows]
        if holding:
            break
    victim = holding[0]
    engine.abort(victim.request_id)
    assert victim.seq.seq_id not in rows
    while engine.has_unfinished_requests():
        engine.step()
    assert not len(rows) and not len(engine.scheduler.chunked_rows(Role.TARGET))
    for i in ids:
        engine.forget(i)
    assert engine.kv_stats()["used_pages"] == 0


def test_a_shared_loop_refuses_rows_it_cannot_hold():
    """Full, a step cap past its room, or another router than its rows' (a graph bakes one in):
    no row, and the flow decodes that step per token instead."""
    from arbitrage_fast.runtime.chunked_rows import ChunkedRows
    from arbitrage_fast.runtime.step_decoder import StopRule

    stop = StopRule(frozenset({1}), frozenset({2}), max_step_tokens=8, budget=100)
    r1, r2 = object(), object()
    rows = ChunkedRows(None, rows=2, max_step_tokens=16, chunk=4)
    assert not rows.reserve(9, StopRule(frozenset({1}), frozenset(), 17, 100), None)  # cap 17 > 16
    assert rows.reserve(1, stop, r1)
    assert not rows.reserve(2, stop, r2)  # another router while r1's row runs
    assert rows.reserve(2, stop, None)  # no router: rides along unscored
    assert not rows.reserve(3, stop, r1)  # full
    with pytest.raises(ValueError, match="already holds a row"):
        rows.reserve(1, stop, r1)
    rows.drop(1)
    rows.drop(2)
    assert rows.reserve(3, stop, r2) and 3 in rows and len(rows) == 1  # empty: any router
