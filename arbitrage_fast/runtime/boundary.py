"""Which token ids end a reasoning step, computed once per tokenizer.

Tokenizers merge newlines with neighbours (".\n\n" is one token in Qwen's vocabulary), so
the boundary set is every id whose decoded text contains a blank line, not just "\n\n".
"""
from __future__ import annotations

from functools import lru_cache

import torch

STEP_SEPARATOR = "\n\n"


def boundary_token_ids(tokenizer) -> list[int]:
    return list(_boundary_ids(tokenizer))


@lru_cache(maxsize=8)
def _boundary_ids(tokenizer) -> tuple[int, ...]:
    vocab_size = len(tokenizer)
    special = set(tokenizer.all_special_ids)
    texts = tokenizer.batch_decode([[i] for i in range(vocab_size)])
    return tuple(i for i, t in enumerate(texts) if STEP_SEPARATOR in t and i not in special)


def eos_token_ids(tokenizer, hf_config=None) -> list[int]:
    """EOS ids from the tokenizer and the generation config (chat models often add one)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    cfg_eos = getattr(hf_config, "eos_token_id", None) if hf_config is not None else None
    if isinstance(cfg_eos, int):
        ids.add(cfg_eos)
    elif isinstance(cfg_eos, (list, tuple)):
        ids.update(int(x) for x in cfg_eos)
    return sorted(ids)


def boundary_mask(tokenizer, vocab_size: int, device) -> torch.Tensor:
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    ids = [i for i in boundary_token_ids(tokenizer) if i < vocab_size]
    mask[ids] = True
    return mask.to(device)
