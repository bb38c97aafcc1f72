"""Everything that touches the device for one model: KV slots, metadata, forward, logits.

The engine speaks in tokens and sequence ids; the runner turns them into a flat batch over
the shared arena. One runner per model role (draft = 0, target = 1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from arbitrage_fast.kv.paged_cache import PagedKVCache
from arbitrage_fast.models.llama import LlamaDecoder

from .attention_metadata import AttentionMetadata


@dataclass
class ForwardOutput:
    hidden: torch.Tensor  # [R, H] final normed hidden of the requested rows
    logits: torch.Tensor  # [R, V] fp32


class ModelRunner:
    def __init__(self, model: LlamaDecoder, cache: PagedKVCache, model_index: int, name: str) -> None:
        self.model = model
        self.cache = cache
        self.index = model_index
        self.name = name
        self.device = next(model.parameters()).device
        self.block_size = cache.block_size(model_index)
        self.kv_view = cache.view(model_index)
        self.max_len = model.spec.max_position_embeddings

    def kv_len(self, seq_id: int) -> int:
        return self.cache.num_tokens(seq_id, self.index)

    def truncate(self, seq_id: int, num_tokens: int) -> None:
        """Roll this model's KV back to its first num_tokens positions (rejected tokens vanish)."""
        self.cache.truncate(seq_id, self.index, num_tokens)

    @torch.inference_mode()
    def forward(self, seq_ids: list[int], chunks: list[list[int]], rows: str = "last") -> ForwardOutput:
        """Append each chunk of tokens to its sequence's KV and run the model once over all of them.

        rows="last" returns one row per sequence (its last token); rows="all" every token.
        On KV exhaustion nothing is written and the pool is unchanged for the failing sequence.
        """
        positions, slots, query_lens, seq_lens = [], [], [], []
        for seq_id, chunk in zip(seq_ids, chunks):
            if not chunk:
                raise ValueError("empty chunk passed to the model runner")
            start = self.kv_len(seq_id)
            end = start + len(chunk)
            self.cache.extend(seq_id, self.index, end)
            positions.append(torch.arange(start, end))
            slots.append(self.cache.slot_mapping(seq_id, self.index, start, end))
            query_lens.append(len(chunk))
            seq_lens.append(end)
        dev = self.device
        meta = AttentionMetadata(
            positions=torch.cat(positions).to(dev),
            slot_mapping=torch.cat(slots).to(dev),
            block_tables=self.cache.block_table_tensor(seq_ids, self.index).to(dev),
            query_lens=query_lens,
            seq_lens=seq_lens,
            block_size=self.block_size,
        )
        input_ids = torch.tensor([t for c in chunks for t in c], dtype=torch.long, device=dev)
        hidden = self.model(input_ids, meta, self.kv_view)
        if rows == "last":
            last = torch.tensor(query_lens, device=dev).cumsum(0) - 1
            hidden = hidden[last]
        return ForwardOutput(hidden=hidden, logits=self.model.compute_logits(hidden))

    def forward_one(self, seq_id: int, tokens: list[int], rows: str = "last") -> ForwardOutput:
        return self.forward([seq_id], [tokens], rows)
