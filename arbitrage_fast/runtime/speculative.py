"""Token-level speculative decoding of one step: the draft proposes k tokens, the target
verifies them in one forward, and the output follows the target's distribution exactly.

Rejection rule (Leviathan et al., Chen et al.): accept proposal x ~ q with probability
min(1, p(x)/q(x)); at the first rejection draw from norm(max(p - q, 0)); if all k are
accepted, draw a bonus token from the target's next distribution. Greedy is the special
case of one-hot p and q: accept iff x is the target's argmax, else take the argmax.

Used as the `spec_decode` policy (the target writes every step, faster) and inside
escalations (`EngineConfig.spec_k`): when the target rewrites a step, the resident draft
speculates its tokens.
"""
from __future__ import annotations

import torch

from arbitrage_fast.config import SamplingParams

from arbitrage_fast.kv.paged_cache import PagedKVCache
from arbitrage_fast.roles import Role

from .sampler import probabilities, sample, token_statistics
from .step_decoder import DecodedStep, StopRule
from .work import ModelWork, WorkFlow, share_prefix


def verify(p: torch.Tensor, q: torch.Tensor, proposals: list[int], greedy: bool,
           generator: torch.Generator | None) -> tuple[int, int]:
    """p [k+1, V] target, q [k, V] draft distributions -> (accepted count, next token).

    The next token is the correction at the first rejection, or the bonus token."""
    for j, x in enumerate(proposals):
        ratio = float(p[j, x] / q[j, x]) if q[j, x] > 0 else 0.0
        if greedy:
            accepted = ratio >= 1.0
        else:
            u = float(torch.rand((), generator=generator, device=p.device))
            accepted = u < ratio
        if not accepted:
            residual = (p[j] - q[j]).clamp_min(0)
            if greedy or residual.sum() <= 0:
                return j, int(p[j].argmax())
            return j, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    last = p[len(proposals)]
    nxt = int(last.argmax()) if greedy else int(torch.multinomial(last, 1, generator=generator))
    return len(proposals), nxt


def speculative_step(cache: PagedKVCache, seq, k: int, sampling: SamplingParams,
                     generator: torch.Generator | None, stop: StopRule,
                     context: list[int] | None = None) -> "WorkFlow[DecodedStep]":
    """The target's step for `seq`, with the draft proposing up to k tokens per target forward
    (a work flow: each forward is yielded to the scheduler, batched with other requests').
    `context` is what the step follows when that is more than the committed tokens (draft
    steps kept in the same round and not committed yet).

    KV invariant on return (as for any step): each model has seen at most the context plus
    all step tokens but the last.
    """
    D, T = Role.DRAFT, Role.TARGET
    sid = seq.seq_id
    seen = lambda role: cache.num_tokens(sid, role)  # noqa: E731
    context = list(seq.tokens(T) if context is None else context)  # one vocabulary: the same ids for both
    step: list[int] = []
    logprobs: list[float] = []
    proposed = accepted_total = syncs = 0
    while True:
        # 1. Draft proposes, stopping early at a token that would end the step anyway.
        proposals, q_rows = [], []
        base = len(context) + len(step)
        # Each model must re-read at least the last token to get its next-token logits.
        for role in (D, T):
            cache.truncate(sid, role, min(seen(role), base - 1))
        if not step:  # each model's catch-up on the context happens in the first round
            yield from share_prefix(cache, sid, D, context)
        out = yield ModelWork(D, sid, (context + step)[seen(D):])
        for _ in range(k):
            with torch.inference_mode():
                q = probabilities(out.logits[-1:], sampling)
                x = int(sample(out.logits[-1:], sampling, generator))
            syncs += 1
            proposals.append(x)
            q_rows.append(q[0])
            if stop.ended_by(x, len(step) + len(proposals)) is not None or len(proposals) == k:
                break
            out = yield ModelWork(D, sid, [x])
        # 2. Target scores the unseen context and all proposals in one forward.
        if not step:
            yield from share_prefix(cache, sid, T, context)
        fed = (context + step)[seen(T):] + proposals
        # Only the rows that verify are read: the last context token's and each proposal's.
        t_out = yield ModelWork(T, sid, fed, rows=len(proposals) + 1)
        with torch.inference_mode():
            t_logits = t_out.logits
            p = probabilities(t_logits, sampling)
            n_acc, nxt = verify(p, torch.stack(q_rows), proposals, sampling.greedy, generator)
            syncs += 1
            proposed += len(proposals)
            accepted_total += n_acc
            new = proposals[:n_acc] + [nxt]
            lp, _ = token_statistics(t_logits[: len(new)], torch.tensor(new, device=t_logits.device), entropy=False)
        # 3. Commit in order until the step ends; roll back both models' unverified KV.
        reason = None
        for i, tok in enumerate(new):
            step.append(tok)
            logprobs.append(float(lp[i]))
            reason = stop.ended_by(tok, len(step))
            if reason is not None:
                break
        # KV stays only for accepted proposals, and never for the step's last token.
        keep = min(base + n_acc, len(context) + len(step) - 1)
        for role in (T, D):
            cache.truncate(sid, role, min(seen(role), keep))
        if reason is not None:
            return DecodedStep(tokens=step, ended_by=reason, logprobs=logprobs, host_syncs=syncs,
                               spec_proposed=proposed, spec_accepted=accepted_total)
