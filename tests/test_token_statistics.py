"""The per-token log-prob and entropy every decode row computes, against their definitions,
and the compiled greedy token + log-prob against torch's argmax and log-sum-exp."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arbitrage_fast.kv.ops import native_available
from arbitrage_fast.runtime.sampler import greedy_with_logprob, token_statistics

needs_native = pytest.mark.skipif(not native_available("cpu"), reason="the compiled extension is not built")


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


def _torch_greedy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tokens = logits.argmax(-1)
    return tokens, *token_statistics(logits, tokens)


@needs_native
@settings(max_examples=80, deadline=None)
@given(rows=st.integers(1, 6), vocab=st.integers(1, 5000), scale=st.sampled_from([0.01, 1.0, 30.0, 300.0]),
       ties=st.booleans(), entropy=st.booleans(), seed=st.integers(0, 2**16))
def test_the_greedy_op_is_torchs_token_and_statistics(rows, vocab, scale, ties, entropy, seed):
    """The first index of the max, as torch.argmax (ties: logits rounded to few values), and
    the log-prob and entropy within an ulp-sized bound of torch's (exp in fp32, sums in fp64)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * scale
    if ties:
        logits = logits.round() if scale >= 1 else (logits * 100).round()
    tokens, logprobs, entropies = torch.ops.arbitrage_fast.greedy_logprob(logits, entropy)
    ref_tokens, ref_logprobs, ref_entropies = _torch_greedy(logits)
    assert tokens.dtype == torch.long and logprobs.dtype == entropies.dtype == torch.float32
    assert torch.equal(tokens, ref_tokens)
    tol = 8 * torch.finfo(torch.float32).eps * (1.0 + logits.abs().amax(-1))
    assert ((logprobs - ref_logprobs).abs() <= tol).all()
    if entropy:
        assert ((entropies - ref_entropies).abs() <= tol).all()
    else:
        assert entropies.numel() == 0


@needs_native
def test_rows_with_a_nan_or_an_infinity_take_torchs_ops():
    """NaN anywhere, +inf, -inf entries, every entry -inf: torch's own answer, bit for bit (a
    row with -inf entries has entropy NaN there, 0 * -inf)."""
    logits = torch.randn(5, 300)
    logits[0, 17] = float("nan")
    logits[1, 5] = float("inf")
    logits[2] = float("-inf")
    logits[3, ::3] = float("-inf")
    tokens, logprobs, entropies = torch.ops.arbitrage_fast.greedy_logprob(logits, True)
    ref_tokens, ref_logprobs, ref_entropies = _torch_greedy(logits)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logprobs[:4], ref_logprobs[:4], equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(entropies[:4], ref_entropies[:4], equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(logprobs[4], ref_logprobs[4], rtol=0, atol=1e-5)  # a finite row: the op's sums
    torch.testing.assert_close(entropies[4], ref_entropies[4], rtol=0, atol=1e-5)


@needs_native
def test_the_greedy_op_checks_its_input_and_has_a_meta_shape():
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.arbitrage_fast.greedy_logprob(torch.randn(2, 8).bfloat16())
    with pytest.raises(RuntimeError, match=r"\[rows, vocab\]"):
        torch.ops.arbitrage_fast.greedy_logprob(torch.randn(8))
    tokens, logprobs, entropies = torch.ops.arbitrage_fast.greedy_logprob(torch.empty(3, 10, device="meta"), True)
    assert tokens.shape == logprobs.shape == entropies.shape == (3,) and tokens.dtype == torch.long
    strided = torch.randn(10, 3).t()  # not contiguous: read as its values
    assert all(torch.equal(a, b) for a, b in zip(torch.ops.arbitrage_fast.greedy_logprob(strided, True),
                                                 torch.ops.arbitrage_fast.greedy_logprob(strided.contiguous(), True)))


@pytest.mark.parametrize("entropy", [False, True])
def test_greedy_with_logprob_is_sample_and_token_statistics(entropy):
    """The sampler's entry point, on the CPU (compiled op) and off it (torch's ops): the same."""
    logits = torch.randn(3, 1000) * 10
    ref_tokens, ref_logprobs, ref_entropies = _torch_greedy(logits)
    for x in (logits, logits.double()):  # fp64 is not the op's dtype: torch's ops
        tokens, logprobs, entropies = greedy_with_logprob(x, entropy)
        assert torch.equal(tokens, ref_tokens)
        torch.testing.assert_close(logprobs.float(), ref_logprobs, rtol=0, atol=1e-5)
        if entropy:
            torch.testing.assert_close(entropies.float(), ref_entropies, rtol=0, atol=1e-4)
        else:
            assert entropies is None
