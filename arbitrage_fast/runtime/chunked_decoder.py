"""Decode one reasoning step in chunks on the device: one host read per chunk, not per token.

Same contract as `step_decoder.decode_step` (same tokens, stop reasons, log-probs, router
features and KV length for greedy decoding), plus a chunk policy. A chunk of k tokens:

  1. extend this model's KV by the positions the chunk will feed (one `cache.extend`) and
     upload the block table: the only host work, once per chunk;
  2. k decode iterations on the device (`DecodeLoop`: CUDA-graph replays on the GPU), each
     sampling a token, its statistics and the running router sums into per-position buffers;
  3. `first_step_end` finds the boundary / EOS / cap index on the device, and ONE read brings
     back (end index, the chunk's tokens, their log-probs) packed in a single tensor;
  4. tokens past the end are rolled back: the KV is truncated to the step's real length, and
     features are read at the last kept position (prefix sums), so nothing dropped leaks in.

As in the per-token decoder the step's last token is sampled but never fed: a chunk feeds the
pending token before sampling the next, and the first token of a step comes straight from the
catch-up prefill's logits. So a chunk that ends at its own last token wastes nothing.

Chunk policy (`chunk`): N > 0 decodes fixed chunks of N; 0 is adaptive: the first chunk is
1.5x the mean length of the request's previous steps (clamped to [8, cap]; 32 before any
step), the second runs to the step cap, so a step costs at most 2 host reads. The trade-off,
at batch 1: a host read drains the GPU pipeline (host turnaround, then the next launch, on the
order of 0.1 ms with graphs), while a rolled-back token costs a whole draft forward (about
1 ms for a 1.5B draft at bf16 on an H200). When step lengths vary a lot, the adaptive plan's
second chunk can roll back many tokens; a small fixed N (4-8) then costs less per step even
at several reads. Which wins depends on the model and the length distribution: measure with
`DecodedStep.rolled_back` and `host_syncs`. With batching the balance shifts toward
long chunks, since a sync stalls every row while a finished row's extra tokens ride along in
forwards that run anyway.

Router scoring rides on the same read: given the router (`score`), its first layer is folded
into the draft's final norm (decode_iteration.py), which leaves a pre-activation per position;
the chunk finishes the MLP for every position of the chunk as if the step ended there (one
epilogue row each) and the score at the real end comes back with the tokens. Scoring after
the step instead would cost the arbitrage policy a third host read.

Sampling (temperature > 0) uses the same torch sampler and generator as the per-token decoder
(graphs capture greedy decoding only, see graphs.py). The first step of a request samples the
same tokens; rolled-back tokens have consumed random numbers, so later steps are drawn from
the same distribution but not the same stream.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from functools import lru_cache

import torch

from arbitrage_fast.config import SamplingParams
from arbitrage_fast.kv import KVCacheExhausted
from arbitrage_fast.router.features import StepFeatureAccumulator
from arbitrage_fast.router.head import FoldedRouter, RouterHead
from arbitrage_fast.triton_kernels.router_head import router_epilogue_reference
from arbitrage_fast.triton_kernels.step_boundary import first_step_end

from .graphs import DecodeLoop, decode_graphs
from .model_runner import ForwardOutput, ModelRunner
from .step_decoder import DecodedStep, StopRule

ADAPTIVE = 0
FIRST_CHUNK_WITHOUT_HISTORY = 32
FIRST_CHUNK_FACTOR = 1.5
MIN_FIRST_CHUNK = 8


@dataclass(frozen=True)
class ChunkPlan:
    """How many tokens each chunk of a step samples."""

    chunk: int  # N > 0: fixed chunks of N; 0: adaptive (a first chunk, then the rest)
    cap: int  # the step's token limit: min(per-step cap, remaining budget)
    first: int  # adaptive first chunk

    @classmethod
    def for_step(cls, chunk: int, cap: int, mean_step_len: float | None) -> "ChunkPlan":
        if chunk < 0:
            raise ValueError(f"chunk must be >= 0 (0 = adaptive), got {chunk}")
        if mean_step_len is None or mean_step_len <= 0:
            first = FIRST_CHUNK_WITHOUT_HISTORY
        else:
            first = max(MIN_FIRST_CHUNK, math.ceil(FIRST_CHUNK_FACTOR * mean_step_len))
        return cls(chunk=chunk, cap=cap, first=min(first, cap))

    def size(self, done: int) -> int:
        """Tokens to sample in the next chunk when `done` tokens of the step are known."""
        left = self.cap - done
        if self.chunk > 0:
            return min(self.chunk, left)
        return min(self.first, left) if done == 0 else left


@torch.inference_mode()
def decode_step_chunked(runner: ModelRunner, seq_id: int, first: ForwardOutput, sampling: SamplingParams,
                        generator: torch.Generator | None, stop: StopRule, track_features: bool,
                        chunk: int = ADAPTIVE, mean_step_len: float | None = None,
                        score: RouterHead | None = None) -> DecodedStep:
    """`decode_step` in chunks; `mean_step_len` (this request's mean step length so far) sizes
    the adaptive first chunk; `score` (the router head, needs track_features) fills
    `router_score`. host_syncs counts the blocking device-to-host reads (one per chunk, router
    score included)."""
    if score is not None and not track_features:
        raise ValueError("router scoring during decoding needs track_features=True")
    cap = min(stop.max_step_tokens, stop.budget)
    if cap <= 0:
        raise ValueError(f"no token left to decode in this step (cap {stop.max_step_tokens}, budget {stop.budget})")
    plan = ChunkPlan.for_step(chunk, cap, mean_step_len)
    folded = folded_router(score, first.hidden.device) if score is not None else None
    loop = decode_graphs(runner).loop(1, cap, sampling, generator, track_features, router=folded)
    buffers = loop.buffers
    logits = first.logits[-1:]
    is_boundary, eos = stop_tensors(stop.boundary_ids, stop.eos_ids, logits.shape[-1], logits.device)

    start = runner.kv_len(seq_id)
    buffers.start_row(0, start)
    loop.record_first(first.hidden[-1:], logits)
    tokens: list[int] = []
    logprobs: list[float] = []
    syncs = forwards = rolled_back = 0
    while True:
        done = len(tokens)
        k = _extend_for_chunk(runner, seq_id, loop, start, done, plan.size(done))
        feeds = k - 1 if done == 0 else k  # the step's first token needed no forward
        loop.run(feeds)
        forwards += feeds
        chunk_tokens = buffers.tokens[:, done:done + k]
        step_len = buffers.step_pos.new_full((1,), done)
        end = first_step_end(chunk_tokens, is_boundary, eos, step_len, cap)
        parts = [end.double()[:, None], chunk_tokens.double(), buffers.logprobs[:, done:done + k].double()]
        if folded is not None:
            parts.append(candidate_scores(loop.iteration, folded, done, k).double()[None])
        row = torch.cat(parts, dim=1)[0].tolist()  # the chunk's one blocking read
        syncs += 1
        e = int(row[0])
        kept = k if e >= k else e + 1
        tokens += [int(t) for t in row[1:1 + kept]]
        logprobs += row[1 + k:1 + k + kept]
        if e < k:
            break
    rolled_back = k - kept
    # The KV holds every fed token; the step keeps all but its last one (never fed).
    if runner.kv_len(seq_id) > start + len(tokens) - 1:
        runner.truncate(seq_id, start + len(tokens) - 1)
    reason = stop.ended_by(tokens[-1], len(tokens))
    if reason is None:  # the device and the host disagree on the stop rule: a bug, never data
        raise RuntimeError(f"chunk end at token {tokens[-1]} (step length {len(tokens)}) matches no stop rule")
    features = step_features(buffers, len(tokens), first.hidden.device) if track_features else None
    router_score = row[1 + 2 * k + e] if score is not None else None
    return DecodedStep(tokens=tokens, ended_by=reason, logprobs=logprobs, features=features, host_syncs=syncs,
                       forwards=forwards, router_score=router_score,
                       chunks=syncs, rolled_back=rolled_back)


def _extend_for_chunk(runner: ModelRunner, seq_id: int, loop: DecodeLoop, start: int, done: int, k: int) -> int:
    """Make room for the chunk's fed positions and upload the block table; returns the chunk
    size actually used (halved while the arena is too full, down to what one token needs, so
    chunking never fails where the per-token decoder would not).

    A step's first chunk may shrink to k = 1, which feeds nothing: its token comes from the
    catch-up logits, so like the per-token decoder it needs no KV, and a step that ends on
    that token succeeds in a full arena. Only a chunk of one token that must be fed fails."""
    while True:
        end = start + done + k - 1  # KV length once the chunk's feeds are written
        try:
            if end > runner.kv_len(seq_id):
                runner.cache.extend(seq_id, runner.index, end)
            break
        except KVCacheExhausted:
            if k == 1:
                raise
            k //= 2
    loop.buffers.set_block_table(0, runner.cache.block_table(seq_id, runner.index))
    return k


def step_features(buffers, n: int, device, row: int = 0) -> StepFeatureAccumulator:
    """The accumulator the per-token decoder would hold after n tokens of the step in `row`,
    read from the prefix sums at the step's last kept position (cloned: the buffers serve the
    next step)."""
    acc = StepFeatureAccumulator(buffers.hidden_size, device)
    acc.h_sum = buffers.cum_hidden[row, n].clone()
    acc.h_last = buffers.hidden[row, n - 1].clone()
    acc.logp_sum = buffers.cum_logprob[row, n].clone()
    acc.entropy_sum = buffers.cum_entropy[row, n].clone()
    acc.logp_min = buffers.min_logprob[row, n].clone()
    acc.entropy_max = buffers.max_entropy[row, n].clone()
    acc.n = n
    return acc


def candidate_scores(iteration, router: FoldedRouter, done: int, k: int, row: int = 0) -> torch.Tensor:
    """Router scores [k] of the step in `row` as if it ended at each of positions
    done..done+k-1: the epilogue over the pre-activations the fused norm kept per position,
    with the scalar features read from the prefix sums and running extremes (so positions past
    the real end never leak in)."""
    b = iteration.buffers
    ends = slice(done + 1, done + k + 1)  # prefix index j + 1 holds positions 0..j
    n = torch.arange(done + 1, done + k + 1, device=b.hidden.device)
    return router_epilogue_reference(iteration.pre[row, done:done + k], router.w_scalar, router.b1, router.w2,
                                     router.b2, b.cum_logprob[row, ends] / n, b.cum_entropy[row, ends] / n, n,
                                     b.min_logprob[row, ends], b.max_entropy[row, ends])


_FOLDED: "weakref.WeakKeyDictionary[RouterHead, dict]" = weakref.WeakKeyDictionary()


def folded_router(router: RouterHead, device: torch.device) -> FoldedRouter:
    """The router's folded first layer on `device`, computed once per router and device (the
    same tensors every step, which a captured graph needs)."""
    per_device = _FOLDED.setdefault(router, {})
    if device not in per_device:
        with torch.no_grad():
            f = router.folded()
        per_device[device] = FoldedRouter(*(t.detach().float().to(device).contiguous()
                                            for t in (f.w_last, f.w_mean, f.w_scalar, f.b1, f.w2, f.b2)))
    return per_device[device]


@lru_cache(maxsize=8)
def stop_tensors(boundary_ids: frozenset[int], eos_ids: frozenset[int], vocab: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Boundary mask over the vocabulary and the EOS ids, on the device, once per stop set."""
    mask = torch.zeros(vocab, dtype=torch.bool)
    ids = [i for i in boundary_ids if 0 <= i < vocab]
    if ids:
        mask[ids] = True
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long)
    return mask.to(device), eos.to(device)
