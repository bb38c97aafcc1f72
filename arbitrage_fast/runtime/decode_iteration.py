"""One decode iteration of a batch, closed on the device: the unit a CUDA graph captures.

    feed each row's pending token at its KV length -> final hidden -> logits -> sample
    -> log-prob and entropy -> router running sums -> the sample becomes the pending token

Everything the iteration reads or writes between calls lives in `DecodeBuffers`, allocated
once, and nothing is read on the host, so the host can enqueue K iterations back to back.
The slot and position of each row come from its device-side KV length and block table (the
host pre-extends the pages and uploads the table once per chunk); the row's position in its
step indexes the per-position buffers.

Per-position buffers are what make rollback free: the host learns where a step ended only
after the chunk, so every sampled token's log-prob, hidden state and *prefix sums* are kept
by position. The router features of a step of n tokens are then read at position n-1, and
the prefix sums are built by the same sequential fp32 adds as `StepFeatureAccumulator`, so
they agree bit for bit with the per-token decoder's given the same hidden states.

With a router (its first layer folded, `FoldedRouter`), the final RMSNorm is the fused
norm + router op: the same pass over the last layer's output also adds the normed row to the
running hidden sum and forms the router's pre-activation `W_last h_j + W_mean mean(h_0..h_j)`,
which is kept per position like everything else. The score of a step that ends at position j
is then the epilogue alone (`router_epilogue_reference`: the scalar features, SiLU, the second
layer), run once per chunk at the boundary, never a pass over hidden states.
"""
from __future__ import annotations

import torch

from arbitrage_fast.config import SamplingParams
from arbitrage_fast.router.head import FoldedRouter
from arbitrage_fast.triton_kernels.router_head import fused_norm_router

from .attention_metadata import AttentionMetadata
from .sampler import greedy_with_logprob, sample, token_statistics


class DecodeBuffers:
    """Static device state of `batch` rows decoding steps of up to `capacity` tokens."""

    def __init__(self, batch: int, capacity: int, hidden_size: int, table_width: int,
                 device: torch.device) -> None:
        self.batch, self.capacity, self.hidden_size = batch, capacity, hidden_size
        z = lambda *shape, dtype=torch.float32: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        self.input_ids = z(batch, dtype=torch.long)  # each row's pending token (sampled, not yet fed)
        self.kv_len = z(batch, dtype=torch.long)  # KV length = the pending token's position
        self.step_pos = z(batch, dtype=torch.long)  # index in the step of the next sampled token
        self.active = z(batch, dtype=torch.bool)  # inactive rows write no KV (padding, warm-up)
        self.block_tables = z(batch, table_width, dtype=torch.int32)
        # Host staging rows for table uploads, pinned on the GPU: a copy from pageable memory may
        # make the driver wait for the stream, a stall in the middle of the step.
        self._staging = torch.zeros(batch, table_width, dtype=torch.int32, pin_memory=device.type == "cuda")
        self._row_widths = [1] * batch
        self.tokens = z(batch, capacity, dtype=torch.long)
        self.logprobs = z(batch, capacity)
        # Prefix sums: index j + 1 holds the sum over step positions 0..j (index 0 stays 0).
        self.cum_logprob = z(batch, capacity + 1)
        self.cum_entropy = z(batch, capacity + 1)
        # Running extremes, same indexing (0 is the identity: log p <= 0 <= entropy).
        self.min_logprob = z(batch, capacity + 1)
        self.max_entropy = z(batch, capacity + 1)
        self.hidden = z(batch, capacity, hidden_size)
        self.cum_hidden = z(batch, capacity + 1, hidden_size)

    @property
    def table_width(self) -> int:
        return self.block_tables.shape[1]

    @property
    def live_tables(self) -> torch.Tensor:
        """The columns some row uses now: eager iterations read this narrower view (the
        sliding-window path reads whole tables); a captured graph keeps the full width."""
        return self.block_tables[:, : max(self._row_widths)]

    def start_row(self, row: int, kv_len: int) -> None:
        """A step starts: device fills only (no copy, no sync)."""
        self.kv_len[row].fill_(kv_len)
        self.step_pos[row].fill_(0)
        self.active[row].fill_(True)

    def set_block_table(self, row: int, table: list[int]) -> None:
        """Upload one row's block table; stream-ordered after earlier iterations.

        The staging row is rewritten only after the chunk that used it ended in a blocking
        read, which the earlier upload preceded on the stream: the async copy has finished."""
        w = len(table)
        if w > self.table_width:
            raise ValueError(f"block table of {w} pages exceeds the decode buffers' {self.table_width}")
        staged = self._staging[row, :w]
        staged.copy_(torch.tensor(table, dtype=torch.int32))
        self.block_tables[row, :w].copy_(staged, non_blocking=True)
        self._row_widths[row] = max(w, 1)


class DecodeIteration:
    """The iteration as a callable over `DecodeBuffers` (eager here, replayed by graphs.py)."""

    def __init__(self, runner, buffers: DecodeBuffers, sampling: SamplingParams,
                 generator: torch.Generator | None, track_features: bool, static_tables: bool = False,
                 router: FoldedRouter | None = None) -> None:
        if router is not None and not track_features:
            raise ValueError("a router reads the step's features: it needs track_features=True")
        self.model, self.kv_view, self.block_size = runner.model, runner.kv_view, runner.block_size
        self.buffers, self.sampling, self.generator = buffers, sampling, generator
        self.track_features = track_features
        self.static_tables = static_tables  # True when captured: the graph bakes the full table in
        self.router = router
        B, H, dev = buffers.batch, buffers.hidden_size, buffers.input_ids.device
        if router is not None:
            # The fused op (Triton on CUDA, its torch twin elsewhere) replaces the final norm,
            # so it reads the residual stream; `pre` holds the pre-activation per position.
            F = router.w_last.shape[0]
            self._count = torch.zeros(B, dtype=torch.int32, device=dev)
            self._out_hidden = torch.empty(B, H, dtype=self.model.norm.weight.dtype, device=dev)
            self._out_pre = torch.empty(B, F, device=dev)
            self.pre = torch.zeros(B, buffers.capacity, F, device=dev)

    def __call__(self) -> None:
        b = self.buffers
        tables = b.block_tables if self.static_tables else b.live_tables
        pos = b.kv_len
        bs = self.block_size
        col = (pos // bs).clamp(max=tables.shape[1] - 1)[:, None]
        page = tables.gather(1, col).squeeze(1).long()
        slots = torch.where(b.active, page * bs + pos % bs, torch.full_like(pos, -1))
        meta = AttentionMetadata.for_device_decode(positions=pos, slot_mapping=slots, block_tables=tables,
                                                   seq_lens_tensor=(pos + 1).to(torch.int32), block_size=bs)
        if self.router is not None:
            residual = self.model.forward_residual(b.input_ids, meta, self.kv_view)
            hidden, running = self._fused_norm(residual)
        else:
            hidden, running = self.model(b.input_ids, meta, self.kv_view), None
        self.record(hidden, self.model.compute_logits(hidden), running)
        b.kv_len.add_(b.active.long())

    def record(self, hidden: torch.Tensor, logits: torch.Tensor, running_hidden: torch.Tensor | None = None) -> None:
        """Sample each row's next token from logits [B, V] and file it at the row's step position.

        Also used eagerly for a step's first token, whose logits come from the catch-up prefill.
        """
        b = self.buffers
        if self.sampling.greedy:
            token, logprob, entropy = greedy_with_logprob(logits, entropy=self.track_features)
        else:
            token = sample(logits, self.sampling, self.generator)
            logprob, entropy = token_statistics(logits, token, entropy=self.track_features)
        j = b.step_pos.clamp(max=b.capacity - 1)[:, None]  # clamp: only idle rows run past capacity
        b.tokens.scatter_(1, j, token[:, None])
        b.logprobs.scatter_(1, j, logprob[:, None])
        if self.track_features:
            _prefix_update(b.cum_logprob, j, logprob, torch.add)
            _prefix_update(b.cum_entropy, j, entropy, torch.add)
            _prefix_update(b.min_logprob, j, logprob, torch.minimum)
            _prefix_update(b.max_entropy, j, entropy, torch.maximum)
            h = hidden.float()
            jh = j[:, :, None].expand(-1, 1, b.hidden_size)
            b.hidden.scatter_(1, jh, h[:, None])
            if running_hidden is None:
                _prefix_update(b.cum_hidden, jh, h, torch.add)
                if self.router is not None:  # a step's first token: its hidden came from a prefill
                    self._record_pre(h, b.cum_hidden.gather(1, jh + 1).squeeze(1) / (j + 1).float(), j)
            else:  # the fused kernel already added h to the prefix it was given
                b.cum_hidden.scatter_(1, jh + 1, running_hidden[:, None])
        b.input_ids.copy_(token)
        b.step_pos.add_(1)

    def record_first_rows(self, rows: torch.Tensor, hidden: torch.Tensor, logits: torch.Tensor) -> None:
        """Greedy first tokens of steps that start in `rows` (just set by `start_row`, so at step
        position 0) while the other rows are mid-step: what `record` files for a step's first
        token, the same ops on those rows only. hidden [n, H], logits [n, V] from the prefills."""
        if not self.sampling.greedy:
            raise ValueError("rows join a shared loop under greedy decoding only")
        b = self.buffers
        token, logprob, entropy = greedy_with_logprob(logits, entropy=self.track_features)
        b.tokens[rows, 0] = token
        b.logprobs[rows, 0] = logprob
        if self.track_features:
            # index 0 of every prefix holds the identity (never written), as for record's j = 0
            for prefix, value, combine in ((b.cum_logprob, logprob, torch.add), (b.cum_entropy, entropy, torch.add),
                                           (b.min_logprob, logprob, torch.minimum),
                                           (b.max_entropy, entropy, torch.maximum)):
                prefix[rows, 1] = combine(prefix[rows, 0], value.to(prefix.dtype))
            h = hidden.float()
            b.hidden[rows, 0] = h
            b.cum_hidden[rows, 1] = b.cum_hidden[rows, 0] + h
            if self.router is not None:
                one = torch.ones(len(rows), 1, device=h.device)
                self.pre[rows, 0] = h @ self.router.w_last.t() + (b.cum_hidden[rows, 1] / one) @ self.router.w_mean.t()
        b.input_ids[rows] = token
        b.step_pos[rows] = 1

    def _fused_norm(self, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final RMSNorm, running hidden sum and router pre-activation in one pass; returns
        (normed, new prefix sum) and files the pre-activation at the row's step position."""
        b = self.buffers
        j = b.step_pos.clamp(max=b.capacity - 1)
        jh = j[:, None, None].expand(-1, 1, b.hidden_size)
        running = b.cum_hidden.gather(1, jh).squeeze(1)  # prefix before this token; updated in place
        self._count.copy_(j)  # tokens of the step before this one; the kernel counts this one
        fused_norm_router(residual, self.model.norm.weight, self.model.norm.eps, self.router.w_last,
                          self.router.w_mean, running, self._count, self._out_hidden, self._out_pre)
        self.pre.scatter_(1, j[:, None, None].expand(-1, 1, self.pre.shape[2]), self._out_pre[:, None])
        return self._out_hidden, running

    def _record_pre(self, h: torch.Tensor, h_mean: torch.Tensor, j: torch.Tensor) -> None:
        """The pre-activation of a token whose normed hidden came from elsewhere (the fused
        op's arithmetic, in torch): h, h_mean [B, H] fp32; j [B, 1] step positions."""
        pre = h @ self.router.w_last.t() + h_mean @ self.router.w_mean.t()
        self.pre.scatter_(1, j[:, :, None].expand(-1, 1, self.pre.shape[2]), pre[:, None])


def _prefix_update(prefix: torch.Tensor, index: torch.Tensor, value: torch.Tensor, combine) -> None:
    """prefix[:, index + 1] = combine(prefix[:, index], value), per row: the accumulator's running
    `sum += x` (torch.add) or its running min / max (torch.minimum / torch.maximum)."""
    prev = prefix.gather(1, index)
    prefix.scatter_(1, index + 1, combine(prev, value.reshape(prev.shape).to(prefix.dtype)))
