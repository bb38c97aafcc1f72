"""A decode batch over a live engine's pool: prefilled sequences, each with room for one token."""
from __future__ import annotations

import torch

from arbitrage_fast.roles import Role
from arbitrage_fast.runtime.work import ModelWork


def prefilled_decode_batch(engine, role: Role, rows: int, seed: int, first_seq: int = 1000):
    """`rows` sequences with prompts of different lengths (2 to 29 tokens), prefilled through the
    role's runner, each with KV room reserved for one decode token: (seq ids, works, starts)."""
    runner, gen = engine.runners[role], torch.Generator().manual_seed(seed)
    seqs = [first_seq + i for i in range(rows)]
    for i, seq in enumerate(seqs):
        engine.cache.add_sequence(seq)
        runner.forward_one(seq, torch.randint(1, 250, (2 + 3 * i % 28,), generator=gen).tolist())
    tokens = torch.randint(1, 250, (rows,), generator=gen).tolist()
    works = [ModelWork(role, seq, [t]) for seq, t in zip(seqs, tokens)]
    return seqs, works, [runner.reserve(seq, 1) for seq in seqs]
