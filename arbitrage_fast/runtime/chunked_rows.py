"""Greedy steps of many requests decoded together in chunks: one host read per chunk for all.

With `decode_chunk != 1` and several requests in flight, a greedy request's step becomes a
row of one shared device loop per model (`DecodeIteration` over `DecodeBuffers` of `rows`
rows; replayed from a CUDA graph on the GPU, as the batch-1 chunked decoder is). Each
scheduler iteration runs ONE chunk of k decode iterations over every row, then ONE blocking
read brings back, for every row, where its step ended (if it did), its tokens and log-probs,
and the router's score at the end. So a decode token costs no host read and no host-to-device
copy; a chunk costs one small upload (each row's window and cap) and the block tables of rows
whose pages grew.

Rows join between chunks: the flow reserves a row (`reserve`) before it yields its
`StepWork`, so a yielded step always has one; the step's first token comes from its catch-up
prefill and is filed into the row eagerly (`DecodeIteration.record_first_rows`), while the
other rows stay mid-step. A row leaves when its step ends (its KV rolled back to the step's
length minus the unfed last token, as after any step) or when its request leaves the running
set (`drop`: preempted, aborted, failed). Rows past their step's end keep decoding to the end
of the chunk into positions that are dropped, as the batch-1 chunked decoder's do: with many
rows a host read stalls all of them, while a finished row's extra tokens ride in forwards
that run anyway, so chunks are long (16 tokens under the adaptive setting).

Greedy only: the rows share one iteration, so one sampler; sampled requests decode per token
in the scheduler's forwards (or, seeded, on the batch-1 chunked loop). The loop's router is
fixed while rows are in it (a captured graph bakes it in): a row whose policy reads another
router, a step cap past the buffers' room, or a full loop gets no row, and the flow decodes
that step per token instead. Tokens, log-probs and features equal the per-token decoder's
and the batch-1 chunked decoder's (rows of a forward are computed independently).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from arbitrage_fast.config import SamplingParams
from arbitrage_fast.router.head import RouterHead

from .chunked_decoder import candidate_scores, folded_router, step_features, stop_tensors
from .graphs import DecodeLoop, decode_graphs
from .model_runner import ModelRunner
from .step_decoder import DecodedStep, StopRule
from .work import StepWork

_GREEDY = SamplingParams()


@dataclass
class _Row:
    index: int  # the row in the loop's buffers
    stop: StopRule
    router: RouterHead | None
    start: int = -1  # KV length when the step started (-1: not known yet)
    joined: bool = False  # the step's first token is filed (it joins at its first chunk)
    sampled: int = 0  # tokens of the step sampled so far; the last one is pending (unfed)
    chunks: int = 0
    forwards: int = 0

    @property
    def cap(self) -> int:
        return min(self.stop.max_step_tokens, self.stop.budget)


class ChunkedRows:
    """One model's shared chunked loop: up to `rows` greedy steps of different requests."""

    ADAPTIVE_CHUNK = 16  # k under decode_chunk=0: long chunks, see above

    def __init__(self, runner: ModelRunner, rows: int, max_step_tokens: int, chunk: int) -> None:
        if rows < 2:
            raise ValueError(f"a shared loop needs at least 2 rows, got {rows}")
        self.runner, self.rows = runner, rows
        self.chunk = chunk if chunk > 0 else self.ADAPTIVE_CHUNK
        # A row that reaches its cap mid-chunk still samples to the chunk's end: room for that.
        self.capacity = max_step_tokens + self.chunk
        self._active: dict[int, _Row] = {}  # seq_id -> row
        self._router: RouterHead | None = None
        self._loop: DecodeLoop | None = None

    def __len__(self) -> int:
        return len(self._active)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._active

    def reserve(self, seq_id: int, stop: StopRule, router: RouterHead | None) -> bool:
        """A row for this sequence's next step, or False (the loop is full, the step's cap
        exceeds its room, or its router is not the loop's while other rows run)."""
        if seq_id in self._active:
            raise ValueError(f"sequence {seq_id} already holds a row")
        cap = min(stop.max_step_tokens, stop.budget)
        if len(self._active) >= self.rows or cap + self.chunk > self.capacity:
            return False
        if not self._active:
            self._router = router
        elif router is not None and router is not self._router:
            return False
        free = sorted(set(range(self.rows)) - {r.index for r in self._active.values()})
        self._active[seq_id] = _Row(free[0], stop, router)
        return True

    @torch.inference_mode()
    def drop(self, seq_id: int) -> None:
        """The sequence leaves (its step ended, or its request left the running set): its row
        goes idle."""
        row = self._active.pop(seq_id, None)
        if row is not None and self._loop is not None:
            # An idle row still runs (masked): at KV length 0 it attends to one position of its
            # table's first page and writes nothing, whatever pages its last step held.
            self._loop.buffers.active[row.index] = False
            self._loop.buffers.kv_len[row.index] = 0

    @torch.inference_mode()
    def run_chunk(self, works: dict[int, StepWork]) -> dict[int, DecodedStep]:
        """One chunk over every row (`works`: each row's StepWork, by sequence); returns the
        steps that ended in it, by sequence. KV room for the chunk is made first; when the pool
        runs out this raises `KVCacheExhausted` before anything ran, and may be called again
        once the scheduler made room (rows already extended keep their room)."""
        if set(works) != set(self._active):
            raise ValueError(f"the chunk's steps {sorted(works)} are not the reserved rows {sorted(self._active)}")
        if not works:
            return {}
        r, k = self.runner, self.chunk
        for seq_id, row in self._active.items():  # room first: nothing has run if this raises
            if row.start < 0:
                row.start = r.kv_len(seq_id)
            end = row.start + max(row.sampled, 1) - 1 + k  # KV length once the chunk's feeds are written
            if end > r.kv_len(seq_id):
                r.cache.extend(seq_id, r.index, end)
        loop = self._loop_for()
        b = loop.buffers
        checked = {s: row.sampled for s, row in self._active.items()}  # positions already known not to end
        joining = [s for s, row in self._active.items() if not row.joined]
        if joining:
            for seq_id in joining:
                b.start_row(self._active[seq_id].index, self._active[seq_id].start)
            index = torch.tensor([self._active[s].index for s in joining], device=b.tokens.device)
            firsts = [works[s].first for s in joining]
            loop.iteration.record_first_rows(index, torch.cat([f.hidden[-1:] for f in firsts]),
                                             torch.cat([f.logits[-1:] for f in firsts]))
            for seq_id in joining:
                self._active[seq_id].joined, self._active[seq_id].sampled = True, 1
        for seq_id, row in self._active.items():
            b.set_block_table(row.index, r.cache.block_table(seq_id, r.index))
        loop.run(k)
        vocab = works[next(iter(works))].first.logits.shape[-1]
        return self._read(loop, k, checked, vocab, works)

    def _loop_for(self) -> DecodeLoop:
        """The loop for the rows' router: the same one while rows run, a new one (or graph)
        when the router changed in an empty loop."""
        folded = folded_router(self._router, self.runner.device) if self._router is not None else None
        if self._loop is None or self._loop.iteration.router is not folded:
            self._loop = decode_graphs(self.runner).loop(self.rows, self.capacity, _GREEDY, None,
                                                         track_features=True, router=folded)
            self._loop.buffers.active.fill_(False)
        return self._loop

    def _read(self, loop: DecodeLoop, k: int, checked: dict[int, int], vocab: int,
              works: dict[int, StepWork]) -> dict[int, DecodedStep]:
        """Where each row's step ends among the positions this chunk sampled (from `checked`
        on), and the tokens, log-probs and end scores of the rows, in one read; then the rows
        whose step ended leave."""
        b, r = loop.buffers, self.runner
        rows = list(self._active.items())
        for _, row in rows:
            row.sampled += k
            row.chunks += 1
            row.forwards += k
        boundary = {row.stop.boundary_ids for _, row in rows}
        eos = {row.stop.eos_ids for _, row in rows} - {frozenset()}
        if len(boundary) > 1 or len(eos) > 1:
            raise ValueError("rows of one loop must share their model's boundary and EOS tokens")
        is_boundary, eos_ids = stop_tensors(boundary.pop(), eos.pop() if eos else frozenset(), vocab,
                                            b.tokens.device)
        width = max(row.sampled for _, row in rows)
        dev = b.tokens.device
        idx = torch.tensor([row.index for _, row in rows], device=dev)
        # One upload: each row's first unchecked position, positions sampled, cap, EOS on or off.
        lo, hi, cap, eos_on = torch.tensor([[checked[s] for s, _ in rows], [row.sampled for _, row in rows],
                                            [row.cap for _, row in rows],
                                            [int(bool(row.stop.eos_ids)) for _, row in rows]], device=dev)[:, :, None]
        tokens = b.tokens[idx, :width]
        pos = torch.arange(width, device=dev)[None]
        hit = is_boundary[tokens] | ((eos_on > 0) & torch.isin(tokens, eos_ids)) | (pos >= cap - 1)
        hit &= (pos >= lo) & (pos < hi)
        end = torch.where(hit.any(1), hit.int().argmax(1), -1)
        parts = [end.double(), tokens.double().flatten(), b.logprobs[idx, :width].double().flatten()]
        scored = [i for i, (_, row) in enumerate(rows) if row.router is not None]
        for i in scored:
            scores = candidate_scores(loop.iteration, loop.iteration.router, 0, width, row=rows[i][1].index)
            parts.append(scores.gather(0, end[i].clamp(min=0)[None]).double())
        flat = torch.cat(parts).tolist()  # the chunk's one blocking read
        n = len(rows)
        score_at = {i: flat[n + 2 * n * width + j] for j, i in enumerate(scored)}
        done: dict[int, DecodedStep] = {}
        for i, (seq_id, row) in enumerate(rows):
            e = int(flat[i])
            if e < 0:
                continue
            toks = [int(t) for t in flat[n + i * width:n + i * width + e + 1]]
            logprobs = flat[n + (n + i) * width:n + (n + i) * width + e + 1]
            reason = row.stop.ended_by(toks[-1], len(toks))
            if reason is None:  # the device and the host disagree on the stop rule: a bug, never data
                raise RuntimeError(f"row end at token {toks[-1]} (step length {len(toks)}) matches no stop rule")
            # The KV holds every fed token; the step keeps all but its last one (never fed).
            if r.kv_len(seq_id) > row.start + len(toks) - 1:
                r.truncate(seq_id, row.start + len(toks) - 1)
            done[seq_id] = DecodedStep(
                tokens=toks, ended_by=reason, logprobs=logprobs,
                features=step_features(b, len(toks), dev, row=row.index) if works[seq_id].track_features else None,
                router_score=score_at.get(i), host_syncs=row.chunks, forwards=row.forwards, chunks=row.chunks,
                rolled_back=row.sampled - len(toks))
            self.drop(seq_id)
        return done
