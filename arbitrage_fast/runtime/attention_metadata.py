"""Per-forward attention metadata, built once by the runner and read by every layer.

A batch is a flat list of tokens from several sequences of different lengths (prefill
chunks and single decode tokens mixed), so the model interface never changes when the
scheduler starts batching: only this object grows.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    positions: torch.Tensor  # [T] int64, absolute position of each query token
    slot_mapping: torch.Tensor  # [T] int64, page * block_size + offset where its K/V is written
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    query_lens: list[int]  # tokens of each sequence in this forward
    seq_lens: list[int]  # KV length of each sequence after this forward (includes its queries)
    block_size: int
    seq_lens_tensor: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        if sum(self.query_lens) != self.positions.numel():
            raise ValueError("query_lens do not add up to the number of tokens")
        self.seq_lens_tensor = torch.tensor(self.seq_lens, dtype=torch.int32, device=self.positions.device)

    @property
    def is_decode(self) -> bool:
        return all(q == 1 for q in self.query_lens)

    @property
    def num_sequences(self) -> int:
        return len(self.query_lens)
