"""Token-level speculative decoding: greedy output is the target's, token for token; sampled
output follows the target's distribution (the rejection rule, checked exactly on small vocabularies)."""
from __future__ import annotations

import pytest
import torch

from arbitrage_fast import Engine, EngineConfig, SamplingParams
from arbitrage_fast.runtime.speculative import verify
from helpers.tiny_models import build_tiny_lm

PROMPTS = ["We compute 12 + 30 = 42", "Janet has 16 eggs. She eats 3"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    draft = build_tiny_lm(root / "draft", "llama", hidden=48, layers=2, seed=1, boundary_bias=2.0)
    # The target agrees with the draft often but not always: a noisy copy of it.
    target = build_tiny_lm(root / "target", "llama", hidden=48, layers=2, seed=1, boundary_bias=2.0, noise=0.3)
    return draft, target


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_spec_decode_equals_target_only(folders, k):
    draft, target = folders
    engine = Engine(EngineConfig(draft=str(draft), target=str(target), spec_k=k, kv_pages=64, min_block_size=4))
    sp = SamplingParams(max_new_tokens=40, max_step_tokens=12)
    for prompt in PROMPTS:
        ref = engine.generate(prompt, policy="target_only", sampling=sp)
        spec = engine.generate(prompt, policy="spec_decode", sampling=sp)
        assert spec.token_ids == ref.token_ids
        assert [s.token_ids for s in spec.steps] == [s.token_ids for s in ref.steps]
        assert 0 <= spec.stats["spec_accepted"] <= spec.stats["spec_proposed"]
        assert engine.kv_stats()["used_pages"] == 0
    if k > 1:
        assert spec.stats["spec_accepted"] > 0, "a noisy copy of the draft should accept some proposals"


def test_speculation_inside_escalations_changes_nothing_but_speed(folders):
    draft, target = folders
    plain = Engine(EngineConfig(draft=str(draft), target=str(target), kv_pages=64, min_block_size=4))
    spec = Engine(EngineConfig(draft=str(draft), target=str(target), spec_k=3, kv_pages=64, min_block_size=4))
    sp = SamplingParams(max_new_tokens=40, max_step_tokens=8)
    for threshold in (0.3, 1.5):
        a = plain.generate(PROMPTS[0], policy="rsd", threshold=threshold, sampling=sp)
        b = spec.generate(PROMPTS[0], policy="rsd", threshold=threshold, sampling=sp)
        assert a.token_ids == b.token_ids
        assert [s.source for s in a.steps] == [s.source for s in b.steps]
    assert spec.kv_stats()["used_pages"] == 0


def _output_distribution(p, q, k, trials=None):
    """Exact distribution of the first committed token under `verify`, by enumerating proposals."""
    V = p.shape[1]
    out = torch.zeros(V, dtype=torch.float64)
    for x in range(V):
        if q[0, x] == 0:
            continue
        accept = min(1.0, float(p[0, x] / q[0, x]))
        out[x] += q[0, x] * accept
        residual = (p[0] - q[0]).clamp_min(0)
        if residual.sum() > 0:
            out += q[0, x] * (1 - accept) * residual / residual.sum()
    return out


def test_rejection_rule_preserves_the_target_distribution():
    torch.manual_seed(0)
    V = 6
    p = torch.softmax(torch.randn(2, V, dtype=torch.float64), -1)
    q = torch.softmax(torch.randn(1, V, dtype=torch.float64), -1)
    assert torch.allclose(_output_distribution(p, q, 1), p[0], atol=1e-12)
    # And `verify` itself, sampled: frequencies of its first token match p within noise.
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros(V)
    n = 20000
    for _ in range(n):
        x = int(torch.multinomial(q[0], 1, generator=g))
        n_acc, nxt = verify(p, q, [x], greedy=False, generator=g)
        counts[x if n_acc == 1 else nxt] += 1
    assert torch.allclose(counts / n, p[0].float(), atol=0.015)


def test_greedy_verify():
    p = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.0, 0.0, 1.0]])
    onehot = torch.eye(3)
    assert verify(torch.eye(3)[[1, 0, 2]], onehot[[1, 0]], [1, 0], greedy=True, generator=None) == (2, 2)
    assert verify(torch.eye(3)[[1, 2, 2]], onehot[[1, 0]], [1, 0], greedy=True, generator=None) == (1, 2)
    assert p.shape == (3, 3)


def test_the_sampler_survives_huge_logits_over_a_small_temperature():
    """Scaling happens after shifting the top logit to 0, so nothing overflows to inf (a NaN
    softmax made torch.multinomial raise)."""
    from arbitrage_fast.config import SamplingParams
    from arbitrage_fast.runtime.sampler import probabilities, sample

    logits = torch.tensor([[3.0e38, 2.9e38, -1.0e38, 0.0]])
    params = SamplingParams(temperature=0.5, seed=0)
    p = probabilities(logits, params)
    assert torch.isfinite(p).all() and torch.allclose(p.sum(-1), torch.ones(1))
    assert p[0, 0] == 1.0  # the others are infinitely less likely at this scale
    assert int(sample(logits, params, torch.Generator().manual_seed(0))) == 0
