"""Where does the reasoning step end? Boundary detection over freshly sampled tokens, on GPU.

The draft decodes K tokens per launch inside a CUDA graph; the host must learn where the
step ended without looking at every token. A step ends at the first token that (a) decodes
to text containing a blank line ("\\n\\n" -- the boundary set is precomputed per tokenizer as
a boolean mask over the vocabulary), (b) is an end-of-sequence id, or (c) reaches the
per-step token cap. One tiny kernel turns the sampled chunk into one index per row, so the
host reads B integers per step instead of B*K tokens per launch.

Token ids outside [0, V) (padding such as -1) are never boundaries; they can still end a
step through the cap.
"""
from __future__ import annotations

import torch

from ._utils import HAS_TRITON, next_pow2, require_triton, tl, triton, triton_usable, use_triton

__all__ = ["HAS_TRITON", "first_step_end", "first_step_end_reference", "first_step_end_triton"]


def _check(tokens: torch.Tensor, is_boundary: torch.Tensor, eos_ids: torch.Tensor,
           step_len: torch.Tensor) -> None:
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [B, K], got shape {tuple(tokens.shape)}")
    if is_boundary.dim() != 1 or is_boundary.dtype != torch.bool:
        raise ValueError("is_boundary must be a 1-D bool mask over the vocabulary")
    if eos_ids.dim() != 1:
        raise ValueError("eos_ids must be 1-D")
    if step_len.shape != tokens.shape[:1]:
        raise ValueError(f"step_len must be [B]={tokens.shape[0]}, got shape {tuple(step_len.shape)}")


def first_step_end_reference(tokens: torch.Tensor, is_boundary: torch.Tensor, eos_ids: torch.Tensor,
                             step_len: torch.Tensor, max_step_tokens: int) -> torch.Tensor:
    """Index in [0, K] of the first step-ending token of each row (K: the step goes on)."""
    _check(tokens, is_boundary, eos_ids, step_len)
    B, K = tokens.shape
    if K == 0:
        return torch.zeros(B, dtype=torch.long, device=tokens.device)
    vocab = is_boundary.numel()
    in_vocab = (tokens >= 0) & (tokens < vocab)
    boundary = is_boundary[tokens.clamp(0, max(vocab - 1, 0))] & in_vocab
    is_eos = (tokens.unsqueeze(-1) == eos_ids.to(tokens.device)).any(-1)
    j = torch.arange(K, device=tokens.device)
    at_cap = step_len.long().unsqueeze(1) + j + 1 >= max_step_tokens
    ends = boundary | is_eos | at_cap
    return torch.where(ends, j, K).min(dim=1).values


if HAS_TRITON:

    @triton.jit
    def _first_step_end_kernel(
        tokens_ptr, stride_tb, stride_tk, boundary_ptr, vocab_size, eos_ptr, num_eos,
        step_len_ptr, out_ptr, K, max_step_tokens,
        BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
    ):
        row = tl.program_id(0)
        j = tl.arange(0, BLOCK_K)
        in_chunk = j < K
        tok = tl.load(tokens_ptr + row * stride_tb + j * stride_tk, mask=in_chunk, other=-1)
        in_vocab = in_chunk & (tok >= 0) & (tok < vocab_size)
        ends = tl.load(boundary_ptr + tok, mask=in_vocab, other=0) != 0

        e = tl.arange(0, BLOCK_E)
        e_valid = e < num_eos
        eos = tl.load(eos_ptr + e, mask=e_valid, other=-1)
        eos_hits = (tok[:, None] == eos[None, :]) & e_valid[None, :]
        ends = ends | (tl.sum(eos_hits.to(tl.int32), axis=1) > 0)

        step_len = tl.load(step_len_ptr + row).to(tl.int64)
        ends = ends | (step_len + j + 1 >= max_step_tokens)
        ends = ends & in_chunk
        first = tl.min(tl.where(ends, j, K), axis=0)
        tl.store(out_ptr + row, first.to(tl.int64))


def first_step_end_triton(tokens: torch.Tensor, is_boundary: torch.Tensor, eos_ids: torch.Tensor,
                          step_len: torch.Tensor, max_step_tokens: int) -> torch.Tensor:
    """Triton twin of `first_step_end_reference`: one program per row, a min-reduce over K."""
    require_triton()
    _check(tokens, is_boundary, eos_ids, step_len)
    B, K = tokens.shape
    out = torch.empty(B, dtype=torch.long, device=tokens.device)
    if B == 0:
        return out
    if K == 0:
        return out.zero_()
    # A zero-size tensor has no storage to point at; a one-element dummy masked off is cheaper
    # than a second kernel variant.
    eos = eos_ids.to(tokens.device)
    if eos.numel() == 0:
        eos = torch.full((1,), -1, dtype=torch.long, device=tokens.device)
    _first_step_end_kernel[(B,)](
        tokens, tokens.stride(0), tokens.stride(1), is_boundary.view(torch.uint8), is_boundary.numel(),
        eos, eos_ids.numel(), step_len, out, K, int(max_step_tokens),
        BLOCK_K=next_pow2(K, 16), BLOCK_E=next_pow2(eos_ids.numel()), num_warps=1,
    )
    return out


def first_step_end(tokens: torch.Tensor, is_boundary: torch.Tensor, eos_ids: torch.Tensor,
                   step_len: torch.Tensor, max_step_tokens: int) -> torch.Tensor:
    """First step-ending index per row: Triton on CUDA, the torch twin elsewhere."""
    if use_triton(tokens):
        return first_step_end_triton(tokens, is_boundary, eos_ids, step_len, max_step_tokens)
    return first_step_end_reference(tokens, is_boundary, eos_ids, step_len, max_step_tokens)
