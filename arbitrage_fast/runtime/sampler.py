"""Token sampling on the device, plus the per-token statistics the router reads."""
from __future__ import annotations

import torch

from arbitrage_fast.config import SamplingParams
from arbitrage_fast.kv.ops import native_available


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] fp32 -> token ids [B] (stays on device: no host sync)."""
    if params.greedy:
        return logits.argmax(dim=-1)
    return torch.multinomial(probabilities(logits, params), 1, generator=generator).squeeze(-1)


def token_statistics(logits: torch.Tensor, tokens: torch.Tensor,
                     entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of each chosen token (temperature 1) and, when `entropy`, the entropy of its
    distribution (None otherwise: only router features read it).

    One log-sum-exp over the vocabulary, not a whole log-softmax: this runs for every row of
    every decode iteration, and over a 152k vocabulary each full-size pass and temporary counts
    (log-softmax, exp, product and sum took about 8x the log-sum-exp alone per row on CPU)."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    chosen = logits.gather(-1, tokens[:, None]).squeeze(-1) - lse
    if not entropy:
        return chosen, None
    # -sum p log p with log p = x - lse: lse - sum p x
    return chosen, lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)


def greedy_with_logprob(logits: torch.Tensor, entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor,
                                                                               torch.Tensor | None]:
    """(greedy tokens [B], their log-probs [B], entropies [B] or None): `sample` under greedy
    settings and `token_statistics` at once. On the CPU one compiled op reads each row twice
    instead of six to ten times (csrc/greedy_logprob.h; the same token, the statistics within
    rounding of torch's); elsewhere the two functions themselves."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and native_available("cpu"):
        tokens, logprobs, entropies = torch.ops.arbitrage_fast.greedy_logprob(logits, entropy)
        return tokens, logprobs, entropies if entropy else None
    tokens = logits.argmax(dim=-1)
    return tokens, *token_statistics(logits, tokens, entropy=entropy)


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution `sample` draws from ([B, V]); one-hot at the argmax when greedy.

    Speculative verification needs the distributions themselves, not only a draw, and must
    use exactly the ones `sample` uses or its output would not follow the target's.
    """
    if params.greedy:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    # Shifted so the largest logit is 0 before scaling: a tiny temperature or huge logits can
    # then only push others to -inf (probability 0), never the top one to inf (NaN softmax).
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > params.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs
