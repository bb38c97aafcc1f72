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


def steps_mean_probabilities(logits: torch.Tensor, steps: list[list[int]]) -> list[float]:
    """Consecutive steps scored from one forward: logits [n, V] where row j predicts the j-th
    token of the steps laid end to end -> each step's mean token probability, read back in
    one transfer (a step without tokens scores 0)."""
    flat = [t for step in steps for t in step]
    if logits.shape[0] != len(flat):
        raise ValueError(f"{logits.shape[0]} logit rows for {len(flat)} step tokens")
    if not flat:
        return [0.0] * len(steps)
    idx = torch.tensor(flat, device=logits.device)[:, None]
    probs = torch.softmax(logits.float(), dim=-1).gather(-1, idx)[:, 0]
    chunks = torch.split(probs, [len(s) for s in steps])
    means = torch.stack([c.mean() for c in chunks if c.numel()]).tolist()
    return [means.pop(0) if s else 0.0 for s in steps]
