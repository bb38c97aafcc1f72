"""The chunked decoder on a GPU: decode iterations replayed from CUDA graphs, boundaries found
by the Triton kernel, router features from the fused norm kernel. Same contract as on the CPU
(tests/test_chunked_decoder.py): greedy output identical to the per-token decoder."""
from __future__ import annotations

import pytest
import torch

from arbitrage_fast import Engine, EngineConfig, SamplingParams
from arbitrage_fast.router.head import RouterConfig, RouterHead
from arbitrage_fast.runtime.graphs import decode_graphs
from helpers.tiny_models import build_tiny_lm

pytestmark = pytest.mark.gpu

PROMPT = "We compute 12 + 30 = 42"
SP = SamplingParams(max_new_tokens=40, max_step_tokens=16)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("chunk-gpu")
    draft = build_tiny_lm(root / "draft", "llama", hidden=32, layers=1, seed=1, tie=False, boundary_bias=4.0)
    target = build_tiny_lm(root / "target", "llama", hidden=48, layers=2, seed=3, tie=False, boundary_bias=4.0)
    router = root / "router"
    RouterHead(RouterConfig(hidden_size=32, width=8)).save(router)
    return str(draft), str(target), str(router)


def _engine(folders, chunk: int, dtype: str = "float32") -> Engine:
    draft, target, router = folders
    return Engine(EngineConfig(draft=draft, target=target, router=router, device="cuda", dtype=dtype,
                               kv_pages=64, min_block_size=4, decode_chunk=chunk))


@pytest.mark.parametrize("policy, threshold", [("draft_only", None), ("target_only", None), ("rsd", 0.5),
                                               ("arbitrage", 1.0), ("arbitrage", 0.0)])
def test_graph_replayed_chunks_equal_per_token_decoding(folders, policy, threshold):
    per_token = _engine(folders, 1)
    reference = per_token.generate(PROMPT, policy=policy, threshold=threshold, sampling=SP)
    for chunk in (0, 8):
        engine = _engine(folders, chunk)
        res = engine.generate(PROMPT, policy=policy, threshold=threshold, sampling=SP)
        assert res.token_ids == reference.token_ids, chunk
        assert [(s.token_ids, s.source, s.ended_by) for s in res.steps] == \
            [(s.token_ids, s.source, s.ended_by) for s in reference.steps], chunk
        for a, b in zip(res.steps, reference.steps):
            if b.router_score is not None:
                assert a.router_score == pytest.approx(b.router_score, rel=1e-4, abs=1e-5)
        runners = [engine.draft] if policy in ("draft_only", "arbitrage") else [engine.target]
        assert all(decode_graphs(r).captured for r in runners), "decode iterations were not graph-captured"
        if chunk == 0:  # each committed step decoded once, escalated ones twice (draft, then target)
            assert res.stats["decode_host_syncs"] <= 2 * (len(res.steps) + res.stats["escalations"])
        assert engine.kv_stats()["used_pages"] == 0


def test_router_features_from_the_fused_kernel_match(folders):
    reference = _engine(folders, 1).generate(PROMPT, policy="draft_only", sampling=SP, record_features=True)
    res = _engine(folders, 0).generate(PROMPT, policy="draft_only", sampling=SP, record_features=True)
    assert [s.token_ids for s in res.steps] == [s.token_ids for s in reference.steps]
    for a, b in zip(res.steps, reference.steps):
        torch.testing.assert_close(a.features, b.features, rtol=1e-4, atol=1e-5)


def test_adaptive_chunks_read_the_host_at_most_twice_per_step(folders):
    sp = SamplingParams(max_new_tokens=40, max_step_tokens=40)
    res = _engine(folders, 0).generate(PROMPT, policy="arbitrage", threshold=1.0, sampling=sp)
    per_token = _engine(folders, 1).generate(PROMPT, policy="arbitrage", threshold=1.0, sampling=sp)
    assert res.token_ids == per_token.token_ids
    assert res.stats["host_syncs"] <= 2 * len(res.steps) < per_token.stats["host_syncs"]


def test_sampled_and_bf16_chunks_run(folders):
    sp = SamplingParams(max_new_tokens=30, max_step_tokens=12, temperature=1.0, seed=5, ignore_eos=True)
    reference = _engine(folders, 1).generate(PROMPT, policy="draft_only", sampling=sp)
    engine = _engine(folders, 0)
    res = engine.generate(PROMPT, policy="draft_only", sampling=sp)
    assert res.steps[0].token_ids == reference.steps[0].token_ids
    assert len(res.token_ids) == 30 and engine.kv_stats()["used_pages"] == 0
    bf16 = _engine(folders, 0, dtype="bfloat16")
    for policy in ("draft_only", "rsd", "arbitrage"):
        out = bf16.generate(PROMPT, policy=policy, threshold=0.5, sampling=SP)
        assert len(out.token_ids) == 40 or out.finish_reason == "eos"
        assert bf16.kv_stats()["used_pages"] == 0
    assert decode_graphs(bf16.draft).captured
