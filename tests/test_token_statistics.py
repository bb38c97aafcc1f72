"""The per-token log-prob and entropy every decode row computes, against their definitions."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arbitrage_fast.runtime.sampler import token_statistics


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 5), vocab=st.integers(2, 3000), scale=st.sampled_from([0.01, 1.0, 30.0, 300.0]),
       seed=st.integers(0, 2**16), half=st.booleans())
def test_log_prob_and_entropy_match_a_log_softmax(rows, vocab, scale, seed, half):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * scale
    if half:  # the models' own dtype: the statistics are taken in fp32 all the same
        logits = logits.bfloat16()
    tokens = torch.randint(0, vocab, (rows,), generator=g)
    logp_ref = torch.log_softmax(logits.double(), dim=-1)
    chosen_ref = logp_ref.gather(-1, tokens[:, None]).squeeze(-1)
    entropy_ref = -(logp_ref.exp() * logp_ref).sum(-1)
    chosen, entropy = token_statistics(logits, tokens)
    assert chosen.dtype == entropy.dtype == torch.float32
    # fp32 over up to 3k terms against fp64: a few ulps of the largest term involved
    tol = 1e-5 * max(1.0, float(logits.float().abs().max()))
    torch.testing.assert_close(chosen.double(), chosen_ref, rtol=0, atol=tol)
    torch.testing.assert_close(entropy.double(), entropy_ref, rtol=0, atol=tol)
    assert (entropy >= -tol).all() and (entropy <= torch.log(torch.tensor(float(vocab))) + tol).all()
    alone, none = token_statistics(logits, tokens, entropy=False)
    assert none is None and torch.equal(alone, chosen)
