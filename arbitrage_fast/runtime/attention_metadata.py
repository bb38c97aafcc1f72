"""Per-forward attention metadata, built once by the runner and read by every layer.

A batch is a flat list of tokens from several sequences of different lengths (prefill
chunks and single decode tokens mixed), so the model interface never changes when the
scheduler starts batching: only this object grows.

Two forms. The host form carries `query_lens`/`seq_lens` as Python lists (prefill, mixed
batches, the per-token decoder). The device form (`for_device_decode`) is a decode batch, one
query token per sequence, described by device tensors only: a decode iteration replayed many
times from a CUDA graph cannot be given host lists that change every token, and reading them
back would be a host sync per token.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate

import torch


@dataclass
class AttentionMetadata:
    positions: torch.Tensor  # [T] int64, absolute position of each query token
    slot_mapping: torch.Tensor  # [T] int64, page * block_size + offset where its K/V is written (-1: skip)
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    query_lens: list[int] | None  # tokens of each sequence in this forward; None: device form
    seq_lens: list[int] | None  # KV length of each sequence after this forward (includes its queries)
    block_size: int
    # [B] int32 on the device; built from seq_lens when omitted (the host form).
    seq_lens_tensor: torch.Tensor | None = None
    # Each query attends over exactly its own keys in a call of its own, so its bits do not
    # depend on the other rows of the forward (models/batch_invariant.py). Host form only:
    # the per-query key ranges come from the host lengths.
    batch_invariant: bool = False

    def __post_init__(self) -> None:
        if self.query_lens is None or self.seq_lens is None:
            self._check_device_form()
            return
        if sum(self.query_lens) != self.positions.numel():
            raise ValueError("query_lens do not add up to the number of tokens")
        if self.seq_lens_tensor is None:
            self.seq_lens_tensor = torch.tensor(self.seq_lens, dtype=torch.int32, device=self.positions.device)

    def _check_device_form(self) -> None:
        """Shapes only: checking values would read the device."""
        if self.query_lens is not None or self.seq_lens is not None:
            raise ValueError("give both query_lens and seq_lens (host form) or neither (device decode form)")
        if self.seq_lens_tensor is None:
            raise ValueError("a device-form decode batch needs seq_lens_tensor")
        if self.batch_invariant:
            raise ValueError("batch-invariant attention needs the host form (query_lens and seq_lens)")
        B = self.block_tables.shape[0]
        for name in ("positions", "slot_mapping", "seq_lens_tensor"):
            if tuple(getattr(self, name).shape) != (B,):
                raise ValueError(f"device-form decode metadata: {name} must be [{B}] (one token per "
                                 f"sequence of the block table), got {tuple(getattr(self, name).shape)}")

    @classmethod
    def for_device_decode(cls, positions: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                          seq_lens_tensor: torch.Tensor, block_size: int) -> "AttentionMetadata":
        """One query token per sequence; sequence b attends to its first seq_lens_tensor[b] tokens."""
        return cls(positions=positions, slot_mapping=slot_mapping, block_tables=block_tables,
                   query_lens=None, seq_lens=None, block_size=block_size, seq_lens_tensor=seq_lens_tensor)

    @cached_property
    def cu_query_lens(self) -> torch.Tensor:
        """[B + 1] int32 on the device: where each sequence's query tokens start (host form);
        built once per forward, on first use, for the layers' prefill kernel."""
        starts = list(accumulate(self.query_lens, initial=0))
        return torch.tensor(starts, dtype=torch.int32, device=self.positions.device)

    @property
    def on_device_only(self) -> bool:
        """True for the device form: lengths live only in seq_lens_tensor."""
        return self.query_lens is None

    @property
    def is_decode(self) -> bool:
        return self.query_lens is None or all(q == 1 for q in self.query_lens)

    @property
    def num_sequences(self) -> int:
        return self.block_tables.shape[0] if self.query_lens is None else len(self.query_lens)
