"""Decode batches replayed from CUDA graphs per batch bucket (runtime/batch_graphs.py), on a GPU.

The CPU tests (tests/test_batch_graphs.py, the padded engine runs in tests/test_batching.py)
check the padded forward eagerly; here the same forward is captured once per bucket and
replayed. A replay runs the kernels the eager padded forward runs, on the same shapes (tables
at the buffers' full width both ways), so it must agree with it to rounding (cuBLAS may pick
another algorithm inside a capture); against the unpadded eager forward the attention splits
and GEMM shapes differ, hence the looser tolerance there. Greedy engine output must be the same
with graphs as without (fp32, tiny models whose argmaxes are far from ties).
"""
from __future__ import annotations

import pytest
import torch

from arbitrage_fast import Engine, EngineConfig, SamplingParams
from arbitrage_fast.roles import Role
from arbitrage_fast.runtime.batch_graphs import BUCKETS, DecodeBuckets, bucket_for
from arbitrage_fast.runtime.cuda_graph import ENV
from helpers.decode_batches import prefilled_decode_batch
from helpers.length_prm import build_policy_pair

pytestmark = pytest.mark.gpu

PROMPTS = ["We compute 12 + 30 = 42", "Let x be the number", "A", "Q: 3 * 4 = ?",
           "Ann has 7 apples and buys 5 more apples at the shop", "Start with 12. Add 30."]
POLICIES = ["draft_only", "target_only", "rsd", "arbitrage", "spec_decode", "oracle"]
THRESHOLDS = [None, None, 0.6, 0.5, None, 0.0]
SP = SamplingParams(max_new_tokens=24, max_step_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from arbitrage_fast.router.head import RouterConfig, RouterHead

    root = tmp_path_factory.mktemp("bucket-gpu")
    draft, target = build_policy_pair(root)
    RouterHead(RouterConfig(hidden_size=32, width=8)).save(root / "router")
    return str(draft), str(target), str(root / "router")


def _engine(folders, dtype: str = "float32") -> Engine:
    draft, target, router = folders
    return Engine(EngineConfig(draft=draft, target=target, router=router, device="cuda", dtype=dtype,
                               kv_pages=512, min_block_size=4, decode_chunk=1))


@pytest.mark.parametrize("role", list(Role))
def test_each_bucket_replay_equals_the_eager_forward(folders, role, monkeypatch):
    engine = _engine(folders)
    runner, cache = engine.runners[role], engine.cache
    graphed = DecodeBuckets(runner)  # CUDA: padded and captured
    monkeypatch.setenv(ENV, "0")
    eager_padded = DecodeBuckets(runner, padded=True)
    assert graphed.capturing and not eager_padded.capturing
    for bucket in BUCKETS:
        rows = bucket // 2 + 1  # 1, 2, 3, 5, 9, 17: padded rows in every bucket past the second
        seqs, works, starts = prefilled_decode_batch(engine, role, rows, seed=rows)
        before = cache.arena.clone()
        hidden, logits = graphed.run(works, starts)
        assert bucket in graphed.captured and bucket_for(rows) == bucket
        after = cache.arena.clone()
        changed = (after != before).view(cache.num_pages, -1).any(dim=1)
        owned = {p for seq in seqs for p in cache.block_table(seq, int(role))}
        assert set(changed.nonzero().flatten().tolist()) <= owned, "a padded row wrote a page"

        cache.arena.copy_(before)
        ref_hidden, ref_logits = eager_padded.run(works, starts)
        torch.testing.assert_close(hidden, ref_hidden, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.arena, after, rtol=1e-5, atol=1e-5)

        cache.arena.copy_(before)
        runner.buckets = DecodeBuckets(runner, padded=False)
        eager = runner.run(works, starts)
        torch.testing.assert_close(torch.cat([o.logits for o in eager]), logits, rtol=1e-4, atol=1e-4)
        assert torch.equal(torch.cat([o.logits for o in eager]).argmax(-1), logits.argmax(-1))
        for seq in seqs:
            cache.free_sequence(seq)
    assert graphed.captured == BUCKETS and eager_padded.captured == ()
    assert dict(graphed.served) == {b: 1 for b in BUCKETS}
    assert cache.stats()["used_pages"] == 0


def test_a_replay_overwrites_its_outputs_but_not_what_it_returned(folders):
    engine = _engine(folders)
    runner = engine.draft
    seqs, works, starts = prefilled_decode_batch(engine, Role.DRAFT, 3, seed=3)
    first = runner.run(works, starts)
    kept = [o.logits.clone() for o in first]
    starts = [runner.reserve(seq, 1) for seq in seqs]
    runner.run(works, starts)  # the same bucket's graph again, one position later
    assert all(torch.equal(o.logits, k) for o, k in zip(first, kept))
    assert runner.buckets.captured == (4,)
    for seq in seqs:
        engine.cache.free_sequence(seq)


def test_a_batched_engine_with_graphs_equals_the_eager_engine(folders, monkeypatch):
    engine = _engine(folders)
    batched = engine.generate_batch(PROMPTS, policy=POLICIES, threshold=THRESHOLDS, sampling=SP)
    captured = set(engine.draft.buckets.captured) | set(engine.target.buckets.captured)
    assert captured and captured <= set(BUCKETS)
    assert engine.graph_buckets() == {"draft": list(engine.draft.buckets.captured),
                                      "target": list(engine.target.buckets.captured)}
    alone = [engine.generate(p, policy=pol, threshold=t, sampling=SP)
             for p, pol, t in zip(PROMPTS, POLICIES, THRESHOLDS)]
    monkeypatch.setenv(ENV, "0")
    eager_engine = _engine(folders)
    eager = eager_engine.generate_batch(PROMPTS, policy=POLICIES, threshold=THRESHOLDS, sampling=SP)
    assert eager_engine.draft.buckets.captured == () and not eager_engine.draft.buckets.padded
    for g, a, e in zip(batched, alone, eager):
        assert g.token_ids == e.token_ids == a.token_ids
        assert [(s.text, s.source) for s in g.steps] == [(s.text, s.source) for s in e.steps]
    assert engine.kv_stats()["used_pages"] == 0 and eager_engine.kv_stats()["used_pages"] == 0


def test_bf16_batches_replay_and_free_their_pages(folders):
    engine = _engine(folders, dtype="bfloat16")
    out = engine.generate_batch(PROMPTS, policy="draft_only", sampling=SP)
    assert all(len(r.token_ids) == SP.max_new_tokens for r in out)
    assert engine.draft.buckets.captured and engine.kv_stats()["used_pages"] == 0


def test_shared_chunked_rows_replayed_from_a_graph_equal_each_prompt_alone(folders):
    """decode_chunk=3 on the GPU: greedy steps of several requests as rows of one captured
    chunked loop per model (runtime/chunked_rows.py) give each prompt's tokens alone."""
    draft, target, router = folders
    engine = Engine(EngineConfig(draft=draft, target=target, router=router, device="cuda", kv_pages=512,
                                 min_block_size=4, decode_chunk=3))
    alone = [engine.generate(p, policy=pol, threshold=t, sampling=SP) for p, pol, t in zip(PROMPTS, POLICIES,
                                                                                         THRESHOLDS)]
    batched = engine.generate_batch(PROMPTS, policy=POLICIES, threshold=THRESHOLDS, sampling=SP)
    for a, b in zip(alone, batched):
        assert a.token_ids == b.token_ids
    from arbitrage_fast.runtime.graphs import decode_graphs

    rows = engine.scheduler.chunked_rows(Role.DRAFT).rows
    assert any(key[0] == rows for key in decode_graphs(engine.runners[Role.DRAFT]).captured)
    assert engine.kv_stats()["used_pages"] == 0
