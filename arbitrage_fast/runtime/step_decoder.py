"""Decode one reasoning step with one model, from the logits that start it to its boundary.

The step ends on a boundary token (its text contains a blank line), on EOS, at the per-step
cap, or when the request's token budget runs out. The last token is sampled but not fed:
the next forward (this model's or the other's catch-up) feeds it, so no work is wasted on a
token that may be rolled back.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from arbitrage_fast.config import SamplingParams
from arbitrage_fast.router.features import StepFeatureAccumulator

from arbitrage_fast.roles import Role

from .model_runner import ForwardOutput, ModelRunner
from .sampler import greedy_with_logprob, sample, token_statistics
from .work import ModelWork, WorkFlow, run_alone


@dataclass
class StopRule:
    boundary_ids: frozenset[int]
    eos_ids: frozenset[int]
    max_step_tokens: int
    budget: int  # tokens this request may still generate

    def ended_by(self, token: int, step_len: int) -> str | None:
        if token in self.eos_ids:
            return "eos"
        if token in self.boundary_ids:
            return "boundary"
        if step_len >= self.budget:
            return "length"
        if step_len >= self.max_step_tokens:
            return "step_cap"
        return None


@dataclass
class DecodedStep:
    tokens: list[int]
    ended_by: str
    logprobs: list[float]  # under the model that wrote the step, temperature 1
    features: StepFeatureAccumulator | None = None
    router_score: float | None = None  # set when the decoder scored the step itself (chunked)
    host_syncs: int = 0  # blocking device-to-host reads made while decoding
    forwards: int = 0
    chunks: int = 0  # chunked decoding: chunks decoded (one read each)
    rolled_back: int = 0  # chunked decoding: tokens decoded past the step's end and dropped
    spec_proposed: int = 0  # token-level speculation: draft proposals verified by the target
    spec_accepted: int = 0  # ... and accepted


def decode_step(runner: ModelRunner, seq_id: int, first: ForwardOutput, sampling: SamplingParams,
                generator: torch.Generator | None, stop: StopRule, track_features: bool) -> DecodedStep:
    """`decode_step_flow` run alone on `runner`'s model (one forward per token)."""
    return run_alone(decode_step_flow(runner.role, seq_id, first, sampling, generator, stop, track_features),
                     {runner.role: runner})


def decode_step_flow(role: Role, seq_id: int, first: ForwardOutput, sampling: SamplingParams,
                     generator: torch.Generator | None, stop: StopRule,
                     track_features: bool) -> "WorkFlow[DecodedStep]":
    """Decode the step token by token, yielding one one-token `ModelWork` per fed token (the
    scheduler batches it with other requests' rows) and sampling from the logits sent back."""
    features = StepFeatureAccumulator(first.hidden.shape[-1], first.hidden.device) if track_features else None
    out = first
    tokens: list[int] = []
    logprobs: list[torch.Tensor] = []
    syncs = forwards = 0
    while True:
        with torch.inference_mode():
            logits = out.logits[-1:]
            if sampling.greedy:
                token, logp, entropy = greedy_with_logprob(logits, entropy=features is not None)
            else:
                token = sample(logits, sampling, generator)
                logp, entropy = token_statistics(logits, token, entropy=features is not None)
            logprobs.append(logp)
            if features is not None:
                features.add(out.hidden[-1], logp, entropy)
            t = int(token)  # the one host sync per token on this path
        syncs += 1
        tokens.append(t)
        reason = stop.ended_by(t, len(tokens))
        if reason is not None:
            break
        out = yield ModelWork(role, seq_id, [t])
        forwards += 1
    # The log-probs come back in one more read, after the last token's (the device is idle by then).
    return DecodedStep(tokens=tokens, ended_by=reason, logprobs=torch.cat(logprobs).tolist(),
                       features=features, host_syncs=syncs + 1, forwards=forwards)
