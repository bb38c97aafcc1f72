"""The default PRM when no reward model is configured: how likely the target finds the step.

score = mean over the step's tokens of p_target(token | context). It needs no extra weights
and is computed from the same target forward that would start the target's own step, so
RSD's scoring pass is reused on escalation rather than thrown away.
"""
from __future__ import annotations

import math

import torch


def mean_token_probability(logits: torch.Tensor, tokens: list[int]) -> float:
    """logits [n, V] (row j predicts tokens[j]) -> mean probability of the tokens."""
    if logits.shape[0] != len(tokens):
        raise ValueError(f"{logits.shape[0]} logit rows for {len(tokens)} step tokens")
    idx = torch.tensor(tokens, device=logits.device)[:, None]
    probs = torch.softmax(logits.float(), dim=-1).gather(-1, idx)
    return float(probs.mean())


def mean_probability(logprobs: list[float]) -> float:
    """The same score from the step's token log-probabilities (a written step's, or a server's
    report); 0 for a step without tokens."""
    return sum(math.exp(lp) for lp in logprobs) / len(logprobs) if logprobs else 0.0
