"""Chunked on-device step decoding (EngineConfig.decode_chunk != 1) against its slow twin,
the per-token decoder (decode_chunk=1).

Greedy fp32 output must be identical token for token, step for step, for every policy, since
both decoders sample from the same logits; what differs is how often the host reads the
device, how many tokens a chunk decodes past the boundary (rolled back), and how the arena
is used while a chunk is in flight. Those are checked here too: host reads are counted
independently of the engine's own counter, the KV invariant is checked after every step, and
a nearly full arena makes a chunk shrink (or fail exactly where the per-token decoder fails).
"""
from __future__ import annotations

import math
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

import arbitrage_fast.request_flow as flow_module
from arbitrage_fast import Engine, EngineConfig, SamplingParams
from arbitrage_fast.kv import KVCacheExhausted
from arbitrage_fast.roles import Role
from arbitrage_fast.router.head import RouterConfig, RouterHead
from arbitrage_fast.runtime.chunked_decoder import ChunkPlan, decode_step_chunked
from arbitrage_fast.runtime.model_runner import ForwardOutput
from arbitrage_fast.runtime.step_decoder import StopRule, decode_step
from helpers.tiny_models import build_tiny_lm

DRAFT, TARGET = Role.DRAFT, Role.TARGET

CHUNKED = (0, 3, 8)  # adaptive; fixed chunks shorter and longer than most steps
PROMPT = "We compute 12 + 30 = 42"  # steps of 1-9 tokens on both pairs
SHORT_PROMPT = "Let x be the number"  # llama: steps hit the cap; qwen2: ends on EOS
SP = SamplingParams(max_new_tokens=40, max_step_tokens=16)


pytestmark = pytest.mark.usefixtures("one_thread")


def _engines(draft, target, router=None, **config) -> dict[int, Engine]:
    """One engine per decode_chunk, all over the same loaded weights (each with its own arena)."""
    first = Engine(EngineConfig(draft=str(draft), target=str(target), router=router, decode_chunk=1, **config))
    out = {1: first}
    for chunk in CHUNKED:
        cfg = EngineConfig(draft=str(draft), target=str(target), router=router, decode_chunk=chunk, **config)
        out[chunk] = Engine(cfg, draft=first.draft_model, target=first.target_model)
    return out


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def engines(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"chunk-{request.param}")
    draft = build_tiny_lm(root / "draft", request.param, hidden=32, layers=1, seed=1, tie=False, boundary_bias=4.0)
    target = build_tiny_lm(root / "target", request.param, hidden=48, layers=2, seed=3, tie=False,
                           boundary_bias=4.0)
    router = root / "router"
    RouterHead(RouterConfig(hidden_size=32, width=8)).save(router)
    return _engines(draft, target, str(router), kv_pages=64, min_block_size=4)


def assert_same_result(chunked, per_token, what):
    assert chunked.token_ids == per_token.token_ids, what
    assert chunked.finish_reason == per_token.finish_reason, what
    shape = lambda r: [(s.token_ids, s.source, s.ended_by) for s in r.steps]  # noqa: E731
    assert shape(chunked) == shape(per_token), what
    for a, b in zip(chunked.steps, per_token.steps):
        for name in ("draft_prm", "target_prm", "router_score"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None) == (y is None), (what, name)
            if x is not None:
                assert x == pytest.approx(y, rel=1e-4, abs=1e-6), (what, name)


def split_threshold(engine: Engine, policy: str) -> float:
    """A threshold at which `policy` escalates some steps and keeps others, with no step's
    score within float noise of it: the midpoint of a wide gap between the scores of an
    all-draft run that gives mixed decisions (escalating changes the later steps' scores)."""
    keep_all = engine.generate(PROMPT, policy=policy, threshold=0.0 if policy == "rsd" else 1.0, sampling=SP)
    scores = sorted(s.draft_prm if policy == "rsd" else s.router_score for s in keep_all.steps)
    gaps = sorted(((b - a, (a + b) / 2) for a, b in zip(scores, scores[1:]) if b - a > 1e-4), reverse=True)
    for _, threshold in gaps:
        res = engine.generate(PROMPT, policy=policy, threshold=threshold, sampling=SP)
        if {s.source for s in res.steps} == {"draft", "target"}:
            return threshold
    raise AssertionError(f"no threshold between scores {scores} mixes decisions")


POLICIES = [("draft_only", None), ("target_only", None), ("rsd", 0.0), ("rsd", 0.5), ("rsd", 1.01),
            ("rsd", "split"), ("oracle", 0.0), ("arbitrage", "split"), ("arbitrage", 0.0), ("arbitrage", 1.0)]


@pytest.mark.parametrize("policy, threshold", POLICIES)
def test_greedy_output_equals_per_token_decoding(engines, policy, threshold):
    if threshold == "split":  # decisions that go both ways
        threshold = split_threshold(engines[1], policy)
    for prompt in (PROMPT, SHORT_PROMPT):
        reference = engines[1].generate(prompt, policy=policy, threshold=threshold, sampling=SP)
        for chunk in CHUNKED:
            res = engines[chunk].generate(prompt, policy=policy, threshold=threshold, sampling=SP)
            assert_same_result(res, reference, (policy, threshold, chunk, prompt))
            assert engines[chunk].kv_stats()["used_pages"] == 0
    assert engines[1].kv_stats()["used_pages"] == 0


def test_router_features_and_scores_equal_per_token_decoding(engines):
    reference = engines[1].generate(PROMPT, policy="draft_only", sampling=SP, record_features=True)
    for chunk in CHUNKED:
        res = engines[chunk].generate(PROMPT, policy="draft_only", sampling=SP, record_features=True)
        assert [s.token_ids for s in res.steps] == [s.token_ids for s in reference.steps]
        for a, b in zip(res.steps, reference.steps):
            torch.testing.assert_close(a.features, b.features, rtol=1e-5, atol=1e-6)
    reference = engines[1].generate(PROMPT, policy="arbitrage", threshold=1.0, sampling=SP)
    scored = engines[0].generate(PROMPT, policy="arbitrage", threshold=1.0, sampling=SP)
    assert [s.router_score for s in scored.steps] == pytest.approx([s.router_score for s in reference.steps],
                                                                  rel=1e-5)


def test_mistral_sliding_window_chunks_equal_per_token(tmp_path):
    """Device-form decoding of a sliding-window layer takes its own masked path."""
    draft = build_tiny_lm(tmp_path / "d", "mistral", hidden=32, layers=1, seed=1, tie=False, boundary_bias=4.0,
                          sliding_window=8)
    target = build_tiny_lm(tmp_path / "t", "mistral", hidden=48, layers=2, seed=2, tie=False, boundary_bias=4.0,
                           sliding_window=8)
    by_chunk = _engines(draft, target, kv_pages=64, min_block_size=4)
    for policy in ("draft_only", "target_only", "rsd"):
        reference = by_chunk[1].generate(PROMPT, policy=policy, threshold=0.5, sampling=SP)
        for chunk in (0, 8):
            assert_same_result(by_chunk[chunk].generate(PROMPT, policy=policy, threshold=0.5, sampling=SP),
                               reference, (policy, chunk))


# ------------------------------------------------------------------ host reads


class HostReadCounter(TorchFunctionMode):
    """Counts reads of tensor values into Python (what blocks the host on a GPU).

    The CPU attention reference reads sequence lengths with .tolist(); on the GPU the Triton
    kernel reads them on the device, so reads made inside it are not counted."""

    READS = frozenset({"tolist", "item", "__int__", "__float__", "__bool__", "__index__"})

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS and not _inside("paged_attention.py"):
            self.reads += 1
        return func(*args, **(kwargs or {}))


def _inside(filename: str) -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.endswith(filename):
            return True
        frame = frame.f_back
    return False


@pytest.mark.parametrize("chunk", [1, 0, 3])
@pytest.mark.parametrize("policy, threshold", [("draft_only", None), ("rsd", 0.5), ("oracle", 0.0),
                                               ("arbitrage", 1.0)])
def test_host_sync_counter_counts_every_read(engines, chunk, policy, threshold):
    with HostReadCounter() as counter:
        res = engines[chunk].generate(PROMPT, policy=policy, threshold=threshold, sampling=SP)
    assert res.stats["host_syncs"] == counter.reads


def test_adaptive_chunks_read_the_host_at_most_twice_per_step(engines, monkeypatch):
    sp = SamplingParams(max_new_tokens=40, max_step_tokens=40)  # room for a second chunk
    chunks_per_step = []

    def recording(*args, **kwargs):
        step = decode_step_chunked(*args, **kwargs)
        chunks_per_step.append(step.chunks)
        return step

    monkeypatch.setattr(flow_module, "decode_step_chunked", recording)
    for prompt in (PROMPT, SHORT_PROMPT):
        chunks_per_step.clear()
        per_token = engines[1].generate(prompt, policy="draft_only", sampling=sp)
        adaptive = engines[0].generate(prompt, policy="draft_only", sampling=sp)
        steps = len(adaptive.steps)
        assert adaptive.token_ids == per_token.token_ids
        assert len(chunks_per_step) == steps and max(chunks_per_step) <= 2
        assert adaptive.stats["decode_host_syncs"] == adaptive.stats["host_syncs"] == sum(chunks_per_step)
        assert adaptive.stats["host_syncs"] <= 2 * steps
        # The per-token decoder reads every token (and the log-probs once): the bound tells them apart.
        assert per_token.stats["decode_host_syncs"] == len(per_token.token_ids) + steps > 2 * steps
    # The router's score comes back with the last chunk: arbitrage too stays within 2 reads a step.
    arbitrage = engines[0].generate(PROMPT, policy="arbitrage", threshold=1.0, sampling=sp)
    assert arbitrage.stats["host_syncs"] == arbitrage.stats["decode_host_syncs"] <= 2 * len(arbitrage.steps)


def test_a_step_longer_than_the_first_chunk_takes_exactly_two_reads(engines):
    """No boundary ids: the step runs to its cap of 20, past the adaptive first chunk of 8."""
    engine = engines[0]
    stop = StopRule(frozenset(), engine.eos_ids[DRAFT], max_step_tokens=20, budget=40)
    prompt = engine.tokenizer(PROMPT)["input_ids"]
    steps = []
    for decode in (decode_step, lambda *a: decode_step_chunked(*a, chunk=0, mean_step_len=1.0)):
        engine.cache.add_sequence(3_000)
        try:
            first = engine.draft.forward_one(3_000, prompt)
            steps.append(decode(engine.draft, 3_000, first, SamplingParams(), None, stop, True))
            assert engine.draft.kv_len(3_000) == len(prompt) + len(steps[-1].tokens) - 1
        finally:
            engine.cache.free_sequence(3_000)
    per_token, chunked = steps
    assert chunked.tokens == per_token.tokens and len(chunked.tokens) == 20
    assert chunked.host_syncs == chunked.chunks == 2 and chunked.rolled_back == 0
    assert per_token.host_syncs == 21
    torch.testing.assert_close(chunked.features.features(), per_token.features.features(), rtol=1e-5, atol=1e-6)


def test_adaptive_chunk_plan():
    first = ChunkPlan.for_step(0, cap=40, mean_step_len=None)
    assert (first.size(0), first.size(32), first.size(39)) == (32, 8, 1)
    seen = ChunkPlan.for_step(0, cap=40, mean_step_len=5.0)
    assert (seen.size(0), seen.size(8)) == (8, 32)  # max(8, ceil(1.5 * 5)), then the rest
    assert ChunkPlan.for_step(0, cap=6, mean_step_len=20.0).size(0) == 6
    fixed = ChunkPlan.for_step(3, cap=7, mean_step_len=None)
    assert [fixed.size(d) for d in (0, 3, 6)] == [3, 3, 1]
    with pytest.raises(ValueError):
        ChunkPlan.for_step(-1, cap=4, mean_step_len=None)


# ------------------------------------------------------------------ rollback and the arena


@pytest.mark.parametrize("policy, threshold", [("draft_only", None), ("target_only", None), ("rsd", 0.5),
                                               ("oracle", 0.0)])
def test_overshooting_chunks_leave_kv_at_the_committed_length(engines, policy, threshold):
    """After every step each model has seen at most the committed tokens but the last; the
    writer of a step has seen exactly that many, whatever its chunks decoded past the end.
    (A request's last step is checked through the pool instead: the request has ended and
    returned its pages by the time the step is read.)"""
    engine = engines[8]
    rolled_back = 0
    for prompt in (PROMPT, SHORT_PROMPT):
        run = engine.stream(prompt, policy=policy, threshold=threshold, sampling=SP)
        for step in run:
            if not engine.cache.has_sequence(run.seq.seq_id):
                continue
            writer = DRAFT if step.source == "draft" else TARGET
            for model, runner in ((DRAFT, engine.draft), (TARGET, engine.target)):
                seen, committed = runner.kv_len(run.seq.seq_id), len(run.seq.tokens(model))
                assert seen == committed - 1 if model == writer else seen <= committed - 1, (step, model)
        rolled_back += run.result.stats["rolled_back_tokens"]
        assert engine.kv_stats()["used_pages"] == 0
    assert rolled_back > 0  # chunks really did decode past boundaries


def _prefilled(engine: Engine, prompt_ids: list[int], seq_id: int):
    engine.cache.add_sequence(seq_id)
    return engine.draft.forward_one(seq_id, prompt_ids)


def _fill_arena(engine: Engine, seq_id: int, leave_pages: int) -> None:
    """A second sequence takes every free page but `leave_pages`."""
    free = engine.kv_stats()["free_pages"]
    engine.cache.add_sequence(seq_id)
    engine.cache.extend(seq_id, DRAFT, (free - leave_pages) * engine.cache.block_size(DRAFT))


def test_a_chunk_shrinks_to_fit_a_nearly_full_arena(engines):
    """Pages for the step, not for the chunk's overshoot: the chunk halves until it fits and
    decodes what the per-token decoder decodes, with the same KV afterwards."""
    engine, bs = engines[8], engines[8].cache.block_size(DRAFT)
    stop = StopRule(engine.boundary_ids[DRAFT], engine.eos_ids[DRAFT], max_step_tokens=16, budget=40)
    greedy = SamplingParams()
    vocab = engine.draft_model.spec.vocab_size
    for length in range(4, 4 + 2 * bs):  # find a prompt whose step ends well before a page does
        prompt = [(7 * i + 3) % vocab for i in range(length)]
        first = _prefilled(engine, prompt, seq_id=1_000)
        reference = decode_step(engine.draft, 1_000, first, greedy, None, stop, track_features=False)
        kv_after = engine.draft.kv_len(1_000)
        step_pages, chunk_pages = math.ceil(kv_after / bs), math.ceil((length + 8 - 1) / bs)
        if chunk_pages > step_pages:
            break
        engine.cache.free_sequence(1_000)
    else:
        pytest.fail("no prompt length puts a chunk's overshoot on a new page")
    engine.draft.truncate(1_000, length)
    held = len(engine.cache.block_table(1_000, DRAFT))
    _fill_arena(engine, 1_001, leave_pages=step_pages - held)
    try:
        step = decode_step_chunked(engine.draft, 1_000, first, greedy, None, stop, track_features=False, chunk=8)
        assert (step.tokens, step.ended_by) == (reference.tokens, reference.ended_by)
        assert engine.draft.kv_len(1_000) == kv_after
        assert step.forwards < 8 - 1  # it did shrink: a whole first chunk of 8 feeds 7 tokens
    finally:
        engine.cache.free_sequence(1_000)
        engine.cache.free_sequence(1_001)
    assert engine.kv_stats()["used_pages"] == 0


def _decode_in_full_arena(engine: Engine, decode, first_token: int | None = None):
    """Decode one draft step after a prompt that fills its pages exactly, with no free page
    left; returns (tokens or KVCacheExhausted, KV length reached). `first_token` forces the
    step's first token (the one sampled from the prefill's logits)."""
    bs = engine.cache.block_size(DRAFT)
    prompt = [(7 * i + 3) % engine.draft_model.spec.vocab_size for i in range(2 * bs)]
    stop = StopRule(engine.boundary_ids[DRAFT], engine.eos_ids[DRAFT], max_step_tokens=40, budget=40)
    first = _prefilled(engine, prompt, seq_id=2_000)
    if first_token is not None:
        first = ForwardOutput(hidden=first.hidden, logits=first.logits.clone())
        first.logits[:, first_token] = 1e4
    _fill_arena(engine, 2_001, leave_pages=0)
    try:
        outcome = decode(engine.draft, 2_000, first, SamplingParams(), None, stop, False).tokens
    except KVCacheExhausted:
        outcome = KVCacheExhausted
    reached = engine.draft.kv_len(2_000)
    engine.cache.free_sequence(2_000)
    engine.cache.free_sequence(2_001)
    assert engine.kv_stats()["used_pages"] == 0
    return outcome, reached


def _chunked(chunk: int):
    return lambda *args: decode_step_chunked(*args, chunk=chunk)


def test_a_full_arena_stops_both_decoders_at_the_same_token(engines):
    engine = engines[8]
    not_boundary = next(t for t in range(engine.draft_model.spec.vocab_size)
                        if t not in engine.boundary_ids[DRAFT] and t not in engine.eos_ids[DRAFT])
    reference = _decode_in_full_arena(engine, decode_step, first_token=not_boundary)
    assert reference[0] is KVCacheExhausted  # its first token goes on, and must be fed
    for chunk in CHUNKED:
        assert _decode_in_full_arena(engine, _chunked(chunk), first_token=not_boundary) == reference, chunk


def test_a_step_ending_on_its_first_token_needs_no_page(engines):
    """Regression: the first chunk used to stop shrinking at 2 tokens and raise, although its
    first token needs no KV (the per-token decoder succeeds)."""
    engine = engines[8]
    boundary = min(engine.boundary_ids[DRAFT])
    reference = _decode_in_full_arena(engine, decode_step, first_token=boundary)
    assert reference[0] == [boundary]
    for chunk in CHUNKED:
        assert _decode_in_full_arena(engine, _chunked(chunk), first_token=boundary) == reference, chunk


def test_engine_raises_kv_exhaustion_at_the_same_step_and_frees_every_page(engines):
    base = engines[1]
    steps_before_failure = {}
    for chunk in (1, *CHUNKED):
        small = Engine(EngineConfig(draft=base.config.draft, target=base.config.target, kv_pages=3,
                                    min_block_size=4, decode_chunk=chunk),
                       draft=base.draft_model, target=base.target_model)
        for policy in ("draft_only", "rsd"):
            seen = []
            with pytest.raises(KVCacheExhausted):  # rsd: refused up front, its prompt cannot fit in both models
                run = small.stream(PROMPT, policy=policy, threshold=0.5, sampling=SamplingParams(max_new_tokens=60))
                for step in run:
                    seen.append((step.token_ids, step.source))
            steps_before_failure.setdefault(policy, seen)
            assert seen == steps_before_failure[policy], (policy, chunk)
            assert small.kv_stats()["used_pages"] == 0


# ------------------------------------------------------------------ sampling


def test_sampled_chunks_are_valid_and_start_like_per_token_decoding(engines):
    sp = SamplingParams(max_new_tokens=30, max_step_tokens=12, temperature=1.0, top_k=40, seed=5, ignore_eos=True)
    reference = engines[1].generate(PROMPT, policy="draft_only", sampling=sp)
    vocab = engines[1].draft_model.spec.vocab_size
    boundary = engines[1].boundary_ids[DRAFT]
    for chunk in CHUNKED:
        res = engines[chunk].generate(PROMPT, policy="draft_only", sampling=sp)
        again = engines[chunk].generate(PROMPT, policy="draft_only", sampling=sp)
        assert res.token_ids == again.token_ids  # seeded
        # Rolled-back tokens drew random numbers too, so only the first step is the same draw.
        assert res.steps[0].token_ids == reference.steps[0].token_ids
        assert len(res.token_ids) == 30 and all(0 <= t < vocab for t in res.token_ids)
        assert sum(len(s.token_ids) for s in res.steps) == 30
        for s in res.steps[:-1]:
            assert (s.ended_by == "boundary") == (s.token_ids[-1] in boundary)
            assert s.ended_by == "boundary" or len(s.token_ids) == 12
        assert engines[chunk].kv_stats()["used_pages"] == 0
    rsd = engines[0].generate(PROMPT, policy="rsd", threshold=0.5, sampling=sp)
    assert len(rsd.token_ids) == 30 and engines[0].kv_stats()["used_pages"] == 0
