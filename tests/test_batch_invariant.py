"""Batch-invariant mode: a token row's output does not depend on the other rows of its forward.

Op by op, each row computed among others (any row count, any position, other sequences'
rows around it, its own sequence cut into any chunks) equals the same row computed alone,
bit for bit in bfloat16; where this CPU's default op is not invariant, a case shows it, so
each test could fail. Then the model: logits of a prompt prefilled at once, decoded token by
token, or in a batch with other sequences are identical, and greedy bf16 output is the same
alone, in a batch of eight and under `spec_decode`, on tiny models and on the real 0.5B.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from arbitrage_fast import Engine, EngineConfig, SamplingParams
from arbitrage_fast.kv.ops import native_available
from arbitrage_fast.models import gguf_ops
from arbitrage_fast.models.attention import PagedAttention
from arbitrage_fast.models.batch_invariant import RowwiseLinear, make_batch_invariant, rows_invariant
from arbitrage_fast.models.gguf_random import random_blocks
from arbitrage_fast.models.layers import RotaryEmbedding
from arbitrage_fast.models.loader import load_model
from arbitrage_fast.models.quantized_linear import QuantizedLinear
from arbitrage_fast.roles import Role
from arbitrage_fast.runtime.attention_metadata import AttentionMetadata
from arbitrage_fast.triton_kernels.activation import silu_and_mul
from arbitrage_fast.triton_kernels.rms_norm import add_rms_norm
from arbitrage_fast.triton_kernels.rotary_kv import apply_rotary
from helpers.length_prm import MIXED_PROMPTS
from helpers.tiny_models import build_tiny_lm

BF16 = torch.bfloat16
FUZZ = settings(max_examples=40, deadline=None, database=None)
ROWS = st.integers(1, 48)


def _rows_alone(fn, x: torch.Tensor, m: int, at: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row `at` of fn over the first m rows, fn over that row alone)."""
    return fn(x[:m])[at], fn(x[at:at + 1])[0]


def _some_row_differs(fn, x: torch.Tensor) -> bool:
    return any(not torch.equal(*_rows_alone(fn, x, m, at)) for m in (2, 3, 8, 17, 33) for at in (0, m - 1))


# --------------------------------------------------------------------------- linear layers

def _linear(dtype: torch.dtype, k: int = 256, n: int = 384, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).to(dtype).eval().requires_grad_(False)


@pytest.mark.parametrize("dtype", [BF16, torch.float32])
@FUZZ
@given(m=ROWS, data=st.data())
def test_invariant_linear_rows_equal_the_row_alone(dtype, m, data):
    holder = nn.Sequential(_linear(dtype))
    make_batch_invariant(holder, dtype)
    at = data.draw(st.integers(0, m - 1))
    x = torch.randn(48, 256, generator=torch.Generator().manual_seed(m)).to(dtype)
    with torch.inference_mode():
        got, alone = _rows_alone(holder[0], x, m, at)
    assert torch.equal(got, alone)


@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_layers_that_fail_the_probe_go_row_by_row(dtype):
    """The default product's rows can depend on the row count (this CPU's MKL: fp32, one row
    against several); such a layer is wrapped, and a layer that passes keeps its kernel."""
    layer = _linear(dtype)
    x = torch.randn(48, 256, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.inference_mode():
        default_differs = _some_row_differs(layer, x)
    holder = nn.Sequential(layer)
    done = make_batch_invariant(holder, dtype)
    if default_differs:
        assert isinstance(holder[0], RowwiseLinear) and (done.kept, done.rowwise) == (0, 1)
    else:  # this build's kernel is invariant for the shape: nothing to demonstrate, nothing wrapped
        assert holder[0] is layer and (done.kept, done.rowwise) == (1, 0)
    assert make_batch_invariant(holder, dtype).rowwise == 0  # a second call wraps nothing again


@FUZZ
@given(m=ROWS, data=st.data())
def test_rowwise_linear_is_the_one_row_call(m, data):
    inner = _linear(torch.float32, bias=False)
    wrapped = RowwiseLinear(inner)
    at = data.draw(st.integers(0, m - 1))
    x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m))
    with torch.inference_mode():
        assert torch.equal(wrapped(x)[at], inner(x[at:at + 1])[0])
        assert wrapped(x[None]).shape == (1, m, 384)  # leading dims kept


PACKED = [gguf_ops.TYPE_IDS[name] for name in ("Q4_0", "Q8_0", "Q4_K", "Q6_K")]


@pytest.mark.skipif(not native_available("cpu"), reason="needs the compiled extension")
@pytest.mark.parametrize("qtype", PACKED, ids=lambda q: gguf_ops.PACKED_TYPES[q])
@FUZZ
@given(m=ROWS, data=st.data())
def test_packed_gguf_linear_is_row_invariant_as_it_is(qtype, m, data):
    """csrc/gguf_linear.cpp quantizes each row's activations alone and sums each output as one
    row's dot (four rows at a time or one, the same per-row arithmetic): invariant by design,
    so the mode keeps it."""
    gen = torch.Generator().manual_seed(int(qtype))
    layer = QuantizedLinear([(random_blocks(int(qtype), 96, 512, gen), int(qtype))], 512,
                            bias=torch.randn(96, generator=gen).to(BF16))
    at = data.draw(st.integers(0, m - 1))
    x = torch.randn(48, 512, generator=torch.Generator().manual_seed(m)).to(BF16)
    got, alone = _rows_alone(layer, x, m, at)
    assert torch.equal(got, alone)
    assert rows_invariant(layer, BF16, torch.device("cpu"))


# --------------------------------------------------------------------------- row-wise ops

def _rope(positions: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """cos/sin of the positions (RotaryEmbedding) applied to q [T, heads, D]."""
    rot = RotaryEmbedding(1.0 / (1e6 ** (torch.arange(0, 64, 2).float() / 64)), 1.0)
    cos, sin = rot(positions, BF16)
    return apply_rotary(q, cos, sin)


@pytest.mark.parametrize("op", ["add_rms_norm", "silu_and_mul", "rope"])
@FUZZ
@given(m=ROWS, data=st.data())
def test_rowwise_ops_are_invariant_as_they_are(op, m, data):
    """The mode changes nothing here: these ops reduce within one row (their Triton kernels run
    one program per row). Their defaults are invariant on this CPU, so no case can show a
    difference; the test guards against one appearing."""
    g = torch.Generator().manual_seed(m)
    at = data.draw(st.integers(0, m - 1))
    if op == "add_rms_norm":
        x, res = torch.randn(48, 896, generator=g).to(BF16), torch.randn(48, 896, generator=g).to(BF16)
        w = torch.randn(896, generator=g).to(BF16)
        got = add_rms_norm(x[:m], res[:m], w, 1e-6)
        alone = add_rms_norm(x[at:at + 1], res[at:at + 1], w, 1e-6)
        assert all(torch.equal(a[at], b[0]) for a, b in zip(got, alone))
    elif op == "silu_and_mul":
        x = torch.randn(48, 2 * 4864, generator=g).to(BF16)
        assert torch.equal(*_rows_alone(silu_and_mul, x, m, at))
    else:
        positions, q = torch.randint(0, 32768, (48,), generator=g), torch.randn(48, 14, 64, generator=g).to(BF16)
        got, alone = _rope(positions[:m], q[:m])[at], _rope(positions[at:at + 1], q[at:at + 1])[0]
        assert torch.equal(got, alone)


# --------------------------------------------------------------------------- attention

HQ, HKV, D, BS = 14, 2, 64, 16  # the 0.5B's heads


class _Arena:
    """Random bf16 K/V pages holding sequences of given lengths, and one query per position."""

    def __init__(self, lengths: list[int], seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        width = max(-(-n // BS) for n in lengths)
        pages = width * len(lengths) + 1
        self.k = torch.randn(pages, BS, HKV, D, generator=g).to(BF16)
        self.v = torch.randn(pages, BS, HKV, D, generator=g).to(BF16)
        self.tables = torch.randperm(pages, generator=g)[: width * len(lengths)].reshape(len(lengths), width)
        self.q = [torch.randn(n, HQ, D, generator=g).to(BF16) for n in lengths]

    def forward(self, layer: PagedAttention, items: list[tuple[int, int, int]], invariant: bool) -> list[torch.Tensor]:
        """One forward in which sequence s brings its queries at positions start..end-1, for each
        (s, start, end) of items (its KV holds end tokens); each item's outputs."""
        positions = torch.cat([torch.arange(a, b) for _, a, b in items])
        meta = AttentionMetadata(positions=positions, slot_mapping=torch.full_like(positions, -1),
                                 block_tables=self.tables[[s for s, _, _ in items]].to(torch.int32),
                                 query_lens=[b - a for _, a, b in items], seq_lens=[b for _, _, b in items],
                                 block_size=BS, batch_invariant=invariant)
        q = torch.cat([self.q[s][a:b] for s, a, b in items])
        attend = layer._per_query_attention if invariant else layer._torch_attention
        return list(attend(q, self.k, self.v, meta).split(meta.query_lens))

    def alone(self, layer: PagedAttention, s: int, pos: int, invariant: bool) -> torch.Tensor:
        """The query at `pos` decoded by itself: its sequence alone, one row, keys 0..pos."""
        return self.forward(layer, [(s, pos, pos + 1)], invariant)[0][0]


def _layer(window: int | None) -> PagedAttention:
    return PagedAttention(0, HQ * D, HQ, HKV, D, qkv_bias=False, o_bias=False, sliding_window=window)


@pytest.mark.parametrize("window", [None, 24], ids=["full", "sliding window"])
@settings(max_examples=25, deadline=None, database=None)
@given(lengths=st.lists(st.integers(1, 80), min_size=1, max_size=4), data=st.data())
def test_each_query_equals_its_decode_alone(window, lengths, data):
    """Sequence 0 is fed in random chunks (a prefill, a verification, decode rows), each chunk in
    a forward with random chunks of the other sequences; every query of sequence 0 equals the
    query decoded alone."""
    arena, layer = _Arena(lengths, seed=len(lengths) * 100 + lengths[0]), _layer(window)
    n = lengths[0]
    cuts = sorted(set(data.draw(st.lists(st.integers(1, n - 1), max_size=4)) if n > 1 else []))
    bounds = [0, *cuts, n]
    for a, b in zip(bounds, bounds[1:]):
        others = []
        for s in range(1, len(lengths)):
            end = data.draw(st.integers(1, lengths[s]))
            others.append((s, data.draw(st.integers(0, end - 1)), end))
        items = [(0, a, b), *others]
        order = data.draw(st.permutations(range(len(items))))
        outs = dict(zip(order, arena.forward(layer, [items[i] for i in order], invariant=True)))
        for i, pos in enumerate(range(a, b)):
            assert torch.equal(outs[0][i], arena.alone(layer, 0, pos, invariant=True)), (a, b, pos)


def test_default_attention_is_not_invariant_and_decode_rows_are_unchanged():
    """Why the mode exists: the default masked chunk gives a query other bits than its decode
    alone (on this CPU); and a decode row is computed by the default's own call, so the mode
    leaves decoding (and its exactness against transformers) as it was."""
    arena, layer = _Arena([300], seed=0), _layer(None)
    chunk = arena.forward(layer, [(0, 200, 240)], invariant=False)[0]
    differs = [p for i, p in enumerate(range(200, 240)) if not torch.equal(chunk[i], arena.alone(layer, 0, p, False))]
    if not differs:
        pytest.skip("the default attention happens to be invariant for this case on this build")
    for p in (0, 17, 239, 299):
        assert torch.equal(arena.alone(layer, 0, p, invariant=True), arena.alone(layer, 0, p, invariant=False))


def test_invariant_attention_needs_host_lengths():
    one = torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="host form"):
        AttentionMetadata(positions=one, slot_mapping=one, block_tables=torch.zeros(1, 1, dtype=torch.int32),
                          query_lens=None, seq_lens=None, block_size=BS,
                          seq_lens_tensor=torch.ones(1, dtype=torch.int32), batch_invariant=True)


# --------------------------------------------------------------------------- tiny models

PROMPTS = MIXED_PROMPTS
SP = SamplingParams(max_new_tokens=40, max_step_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """Qwen2-style draft and target (QKV bias, GQA) at the default init scale: small logits,
    so near-ties are common and rounding differences would reach the tokens."""
    root = tmp_path_factory.mktemp("invariant")
    draft = build_tiny_lm(root / "draft", "qwen2", hidden=64, layers=2, seed=1, init_std=0.02)
    target = build_tiny_lm(root / "target", "qwen2", hidden=96, layers=3, seed=2, init_std=0.02)
    return str(draft), str(target)


def _tiny_engine(pair, invariant: bool) -> Engine:
    return Engine(EngineConfig(draft=pair[0], target=pair[1], dtype="bfloat16", kv_pages=512, min_block_size=4,
                               batch_invariant=invariant))


def _logits_three_ways(engine: Engine, tokens: list[int], other: list[int]) -> list[torch.Tensor]:
    """The target's logits at every position of `tokens`: prefilled in one chunk; decoded one
    token at a time; and in chunks of 1, 5 and the rest, each in a forward beside another
    sequence's rows (its prefill, then its decode rows)."""
    runner, cache = engine.runners[Role.TARGET], engine.cache
    ids = iter(range(1000, 1100))
    out = []
    seq = next(ids)
    cache.add_sequence(seq)
    out.append(runner.forward_one(seq, tokens, rows="all").logits)
    cache.free_sequence(seq)
    seq = next(ids)
    cache.add_sequence(seq)
    out.append(torch.cat([runner.forward_one(seq, [t]).logits for t in tokens]))
    cache.free_sequence(seq)
    seq, neighbour = next(ids), next(ids)
    cache.add_sequence(seq)
    cache.add_sequence(neighbour)
    pieces, feed = [], [other, [other[0]], [other[1]]]
    for chunk, beside in zip((tokens[:1], tokens[1:6], tokens[6:]), feed):
        res = runner.forward([neighbour, seq], [beside, chunk], rows="all")
        pieces.append(res.logits[len(beside):])
    out.append(torch.cat(pieces))
    cache.free_sequence(seq)
    cache.free_sequence(neighbour)
    assert cache.stats()["used_pages"] == 0
    return out


def test_logits_do_not_depend_on_chunks_or_neighbours(tiny_pair):
    """Bit for bit, in bf16: one prefill, token-by-token decoding and chunks beside another
    sequence give every position the same logits in the mode; the default mode does not."""
    tok = _tiny_engine(tiny_pair, False).tokenizers[Role.TARGET]
    tokens, other = tok.encode(PROMPTS[3]), tok.encode(PROMPTS[5])
    assert len(tokens) > 6
    on = _logits_three_ways(_tiny_engine(tiny_pair, True), tokens, other)
    assert torch.equal(on[0], on[1]) and torch.equal(on[0], on[2])
    off = _logits_three_ways(_tiny_engine(tiny_pair, False), tokens, other)
    assert not (torch.equal(off[0], off[1]) and torch.equal(off[0], off[2])), \
        "the default mode was invariant here too: this test would not notice a broken mode"


def _generate_three_ways(engine: Engine, prompts: list[str], policy: str, sampling: SamplingParams):
    alone = [engine.generate(p, policy=policy, sampling=sampling).token_ids for p in prompts]
    batched = [r.token_ids for r in engine.generate_batch(prompts, policy=policy, sampling=sampling)]
    spec = [engine.generate(p, policy="spec_decode", sampling=sampling).token_ids for p in prompts]
    assert engine.kv_stats()["used_pages"] == 0
    return alone, batched, spec


def test_greedy_bf16_alone_batched_and_speculated_agree(tiny_pair):
    engine = _tiny_engine(tiny_pair, True)
    alone, batched, spec = _generate_three_ways(engine, PROMPTS, "target_only", SP)
    assert batched == alone
    assert spec == alone
    draft_alone = [engine.generate(p, policy="draft_only", sampling=SP).token_ids for p in PROMPTS]
    draft_batched = [r.token_ids for r in engine.generate_batch(PROMPTS, policy="draft_only", sampling=SP)]
    assert draft_batched == draft_alone


@pytest.mark.gpu
def test_cuda_logits_and_greedy_tokens_do_not_depend_on_the_batch(tiny_pair):
    """The same guarantee on CUDA: cuBLAS layers that fail the probe go row by row, the Triton
    norm/activation/RoPE kernels are one program per row, attention is per query."""
    engine = Engine(EngineConfig(draft=tiny_pair[0], target=tiny_pair[1], dtype="bfloat16", device="cuda",
                                 kv_pages=512, min_block_size=4, batch_invariant=True))
    tok = engine.tokenizers[Role.TARGET]
    logits = _logits_three_ways(engine, tok.encode(PROMPTS[3]), tok.encode(PROMPTS[5]))
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])
    alone, batched, spec = _generate_three_ways(engine, PROMPTS, "target_only", SP)
    assert batched == alone and spec == alone


def test_mode_needs_the_per_token_decoder_and_a_bool():
    with pytest.raises(ValueError, match="batch_invariant=True needs decode_chunk=1"):
        EngineConfig(draft="d", target="t", batch_invariant=True, decode_chunk=0)
    with pytest.raises(ValueError, match="batch_invariant must be True or False"):
        EngineConfig(draft="d", target="t", batch_invariant="yes")


# --------------------------------------------------------------------------- the real 0.5B

# Sized for the suite's time: the packed GGUF product is row-invariant by construction (tested
# op by op above), so the real model runs dequantised, the bf16 case the mode is for.
REAL_NEW_TOKENS = 40
REAL_COMPARED = 1  # problems compared alone / batched / speculated; the batch holds eight


@pytest.mark.slow
def test_real_greedy_bf16_alone_batched_and_speculated_agree(qwen_draft_gguf):
    """GSM8K problems 700-707 (the issue's measured 700-703 among them), bf16, greedy: the
    compared problems' tokens are the same alone, among eight requests of different lengths (so
    the batch changes around them), and under spec_decode (draft = target = the 0.5B, k = 4).
    Per-query attention makes the prefills the slow part."""
    from arbitrage_fast.eval.datasets import load_dataset

    torch.set_num_threads(2)
    loaded = load_model(qwen_draft_gguf, "bfloat16", dequantize=True)
    engine = Engine(EngineConfig(draft=str(qwen_draft_gguf), target=str(qwen_draft_gguf), dtype="bfloat16", kv_pages=160,
                                 batch_invariant=True), draft=loaded, target=loaded)
    prompts = [item.question for item in load_dataset("gsm8k", n=None)[700:708]]
    compared = SamplingParams(max_new_tokens=REAL_NEW_TOKENS, ignore_eos=True)
    samplings = [compared] * REAL_COMPARED + [SamplingParams(max_new_tokens=n, ignore_eos=True)
                                              for n in (8, 40, 16, 24, 32, 12, 4)][:8 - REAL_COMPARED]
    batched = engine.generate_batch(prompts, policy="target_only", sampling=samplings)
    for prompt, in_batch in zip(prompts[:REAL_COMPARED], batched):
        alone = engine.generate(prompt, policy="target_only", sampling=compared)
        assert in_batch.token_ids == alone.token_ids
        spec = engine.generate(prompt, policy="spec_decode", sampling=compared)
        assert spec.token_ids == alone.token_ids
        # The draft is the target: a proposal decoded token by token is rejected only where the
        # verification chunk rounds differently, which the mode rules out.
        assert spec.stats["spec_proposed"] > 0
        assert spec.stats["spec_accepted"] == spec.stats["spec_proposed"]
    assert engine.kv_stats()["used_pages"] == 0


@pytest.mark.slow
def test_real_pair_bf16_greedy_alone_batched_and_speculated_agree(qwen_draft_gguf, qwen_target_gguf):
    """The deployed pair, 0.5B drafting for 1.5B, both bf16 (dequantised) in the mode: the 1.5B's
    greedy tokens are the same alone, in a batch of eight, under spec_decode with the 0.5B
    proposing, and rsd's the same alone and batched (its decisions read both models' rows)."""
    from arbitrage_fast.eval.datasets import load_dataset

    torch.set_num_threads(2)
    draft = load_model(qwen_draft_gguf, "bfloat16", dequantize=True)
    target = load_model(qwen_target_gguf, "bfloat16", dequantize=True)
    engine = Engine(EngineConfig(draft=str(qwen_draft_gguf), target=str(qwen_target_gguf), dtype="bfloat16",
                                 kv_pages=160, batch_invariant=True), draft=draft, target=target)
    prompts = [item.question for item in load_dataset("gsm8k", n=None)[700:708]]
    compared = SamplingParams(max_new_tokens=24, ignore_eos=True)
    samplings = [compared] + [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (8, 20, 4, 12, 16, 6, 10)]
    policies = ["target_only", "rsd", *["target_only"] * 6]
    batched = engine.generate_batch(prompts, policy=policies, threshold=[None, 0.5, *[None] * 6], sampling=samplings)
    alone = engine.generate(prompts[0], policy="target_only", sampling=compared)
    assert batched[0].token_ids == alone.token_ids
    assert batched[1].token_ids == engine.generate(prompts[1], policy="rsd", threshold=0.5, sampling=samplings[1]).token_ids
    spec = engine.generate(prompts[0], policy="spec_decode", sampling=compared)
    assert spec.token_ids == alone.token_ids and spec.stats["spec_proposed"] > 0
    assert engine.kv_stats()["used_pages"] == 0
