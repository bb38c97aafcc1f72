"""Everything that touches the device for one model: KV slots, metadata, forward, logits.

The engine speaks in tokens and sequence ids; the runner turns them into a flat batch over
the shared arena. One runner per model role. A forward of decode rows only is padded to a
batch bucket and replayed from a CUDA graph on the GPU (batch_graphs.py); every other forward,
and every forward on the CPU, runs eagerly as one varlen batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch

from arbitrage_fast.kv.paged_cache import PagedKVCache
from arbitrage_fast.models.llama import LlamaDecoder
from arbitrage_fast.roles import Role

from .attention_metadata import AttentionMetadata
from .batch_graphs import DecodeBuckets
from .work import ModelWork


@dataclass
class ForwardOutput:
    hidden: torch.Tensor  # [R, H] final normed hidden of the requested rows
    logits: torch.Tensor  # [R, V] fp32


class ModelRunner:
    def __init__(self, model: LlamaDecoder, cache: PagedKVCache, role: Role,
                 padded_decode: bool | None = None, *, batch_invariant: bool = False) -> None:
        """padded_decode: whether decode-only forwards take the padded bucket path (None: where
        CUDA graphs are captured; see DecodeBuckets). batch_invariant: every forward's attention
        is computed per query from host lengths (models/batch_invariant.py; the model's linear
        layers are made invariant at load), so the padded bucket path, which attends from
        device-side lengths, is off."""
        self.model = model
        self.batch_invariant = batch_invariant
        self.cache = cache
        self.role = role
        self.index = int(role)  # the model's index in the pool
        self.name = role.label
        self.device = next(model.parameters()).device
        self.block_size = cache.block_size(role)
        self.kv_view = cache.view(role)
        self.max_len = model.spec.max_position_embeddings
        self.buckets = DecodeBuckets(self, padded=False if batch_invariant else padded_decode)

    def kv_len(self, seq_id: int) -> int:
        return self.cache.num_tokens(seq_id, self.index)

    def truncate(self, seq_id: int, num_tokens: int) -> None:
        """Roll this model's KV back to its first num_tokens positions (rejected tokens vanish)."""
        self.cache.truncate(seq_id, self.index, num_tokens)

    def reserve(self, seq_id: int, num_tokens: int) -> int:
        """Make room for num_tokens more positions of this model's KV; returns where they start.
        Raises KVCacheExhausted and changes nothing when the arena is too full."""
        start = self.kv_len(seq_id)
        self.cache.extend(seq_id, self.index, start + num_tokens)
        return start

    def forward(self, seq_ids: list[int], chunks: list[list[int]], rows: str | int = "last") -> ForwardOutput:
        """Append each chunk of tokens to its sequence's KV and run the model once over all of them.

        rows="last" returns one row per sequence (its last token); rows="all" every token; an
        int n the last n tokens' rows.
        On KV exhaustion the failing sequence is unchanged (earlier ones keep their room).
        """
        works = [ModelWork(self.role, s, list(c), rows) for s, c in zip(seq_ids, chunks)]
        starts = [self.reserve(w.seq_id, len(w.tokens)) for w in works]
        outs = self.run(works, starts)
        return outs[0] if len(outs) == 1 else ForwardOutput(hidden=torch.cat([o.hidden for o in outs]),
                                                            logits=torch.cat([o.logits for o in outs]))

    def forward_one(self, seq_id: int, tokens: list[int], rows: str | int = "last") -> ForwardOutput:
        return self.forward([seq_id], [tokens], rows)

    @torch.inference_mode()
    def run(self, works: list[ModelWork], starts: list[int]) -> list[ForwardOutput]:
        """One forward over every work item, whose KV room `reserve` made (item i's tokens at
        positions starts[i]...): decode rows and prefill chunks of many sequences in one varlen
        batch, so the weights are read once for all of them. Returns each item's rows."""
        padded = self.buckets.run(works, starts)
        if padded is not None:
            hidden, logits = padded
            return [ForwardOutput(hidden=h, logits=lg) for h, lg in zip(hidden.split(1), logits.split(1))]
        positions, slots, query_lens, seq_lens, picked = [], [], [], [], []
        offset = 0
        for work, start in zip(works, starts):
            n = len(work.tokens)
            end = start + n
            positions.append(torch.arange(start, end))
            slots.append(self.cache.slot_mapping(work.seq_id, self.index, start, end))
            query_lens.append(n)
            seq_lens.append(end)
            picked.append(torch.arange(offset + n - work.wanted, offset + n))
            offset += n
        tables = self.cache.block_table_tensor([w.seq_id for w in works], self.index)
        counts = [len(p) for p in picked]
        gather = offset != sum(counts)
        # Every per-forward input goes to the device in ONE copy of one int64 host tensor, cut
        # into views there (a copy each would be up to seven transfers a forward on a GPU).
        parts = [torch.tensor([t for w in works for t in w.tokens], dtype=torch.long), torch.cat(positions),
                 torch.cat(slots), torch.tensor(seq_lens, dtype=torch.long),
                 torch.tensor(list(accumulate(query_lens, initial=0)), dtype=torch.long), tables.long().flatten(),
                 torch.cat(picked) if gather else torch.empty(0, dtype=torch.long)]
        input_ids, pos, slot, lens, cu, table, rows = torch.cat(parts).to(self.device).split([len(t) for t in parts])
        meta = AttentionMetadata(
            positions=pos,
            slot_mapping=slot,
            block_tables=table.view(tables.shape).to(torch.int32),
            query_lens=query_lens,
            seq_lens=seq_lens,
            block_size=self.block_size,
            seq_lens_tensor=lens.to(torch.int32),
            batch_invariant=self.batch_invariant,
        )
        meta.cu_query_lens = cu.to(torch.int32)  # the cached property, already on the device
        hidden = self.model(input_ids, meta, self.kv_view)
        if gather:
            hidden = hidden[rows]
        logits = self.model.compute_logits(hidden)
        return [ForwardOutput(hidden=h, logits=lg) for h, lg in zip(hidden.split(counts), logits.split(counts))]
