"""The router folded into the draft's final norm, end to end over decode iterations: the scores
the chunked decoder reads (fused pre-activation per position + epilogue at the boundary) equal
the router head applied to the step's features, for every candidate end of the step. Run with
the fused op's torch twin (the CPU path) and with its Triton kernel in the interpreter."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from arbitrage_fast.config import SamplingParams
from arbitrage_fast.models.architecture import DecoderSpec
from arbitrage_fast.models.llama import LlamaDecoder
from arbitrage_fast.router.features import assemble_features
from arbitrage_fast.router.head import RouterConfig, RouterHead
from arbitrage_fast.runtime.chunked_decoder import candidate_scores, folded_router
from arbitrage_fast.runtime.decode_iteration import DecodeBuffers, DecodeIteration
from helpers.triton_kernels import load_kernel

transformers = pytest.importorskip("transformers")
rh = load_kernel("router_head")


def _setup(seed=0, kind="mlp"):
    cfg = transformers.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, architectures=["LlamaForCausalLM"])
    spec = DecoderSpec.from_hf_config(cfg)
    torch.manual_seed(seed)
    model = LlamaDecoder(spec).eval()
    bs = 4
    kv = torch.zeros(4, 1, 2, bs, spec.num_kv_heads, spec.head_dim)
    router = RouterHead(RouterConfig(hidden_size=32, width=8))
    d = router.config.in_features
    # a standardisation far from the identity, so folding it matters
    mean, std = 0.1 * torch.randn(d), 0.5 + torch.rand(d)
    if kind == "linear":  # a logistic score in the MLP's shape (width 2)
        router = RouterHead.linear(32, mean, std, 0.3 * torch.randn(d), 0.2)
    with torch.no_grad():
        router.feature_mean.copy_(mean)
        router.feature_std.copy_(std)
    return SimpleNamespace(model=model, kv_view=kv, block_size=bs), router


def _features(b, k):
    """The definition: assemble_features from the buffers' prefix sums, positions 0..k-1."""
    ends = slice(1, k + 1)
    return assemble_features(b.hidden[0, :k], b.cum_hidden[0, ends], b.cum_logprob[0, ends],
                             b.cum_entropy[0, ends], b.min_logprob[0, ends], b.max_entropy[0, ends],
                             torch.arange(1, k + 1))


@pytest.mark.parametrize("kind", ["mlp", "linear"])
@pytest.mark.parametrize("impl", ["torch twin", "triton"])
def test_fused_router_scores_equal_the_head_on_the_features(impl, kind, monkeypatch):
    if impl == "triton":
        if not rh.triton_usable(torch.empty(0)):
            pytest.skip("Triton cannot run here (not installed, or imported without TRITON_INTERPRET=1)")
        monkeypatch.setattr(rh, "use_triton", lambda *t: True)
    runner, router = _setup(kind=kind)
    with torch.inference_mode():
        folded = folded_router(router, torch.device("cpu"))
        buffers = DecodeBuffers(1, 8, 32, 4, torch.device("cpu"))
        buffers.set_block_table(0, [2, 0, 3, 1])
        buffers.start_row(0, 3)
        it = DecodeIteration(runner, buffers, SamplingParams(), None, track_features=True, router=folded)
        first = runner.model.norm(torch.randn(1, 32))  # a step's first token comes from a prefill
        it.record(first, runner.model.compute_logits(first))
        k = 5
        for _ in range(k - 1):
            it()
        got = candidate_scores(it, folded, 0, k)
        want = router(_features(buffers, k))
    assert got.shape == (k,)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # A later chunk reads its own positions only.
    torch.testing.assert_close(candidate_scores(it, folded, 2, 3), want[2:], rtol=1e-5, atol=1e-6)


def test_a_router_needs_the_features():
    runner, router = _setup()
    buffers = DecodeBuffers(1, 8, 32, 4, torch.device("cpu"))
    with pytest.raises(ValueError, match="track_features"):
        DecodeIteration(runner, buffers, SamplingParams(), None, track_features=False,
                        router=folded_router(router, torch.device("cpu")))
