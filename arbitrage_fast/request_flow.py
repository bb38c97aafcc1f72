"""How one request writes its answer, step by step, as a generator the scheduler drives.

The flow yields `ModelWork` (and is sent the forward's output) whenever it needs a model,
and yields each committed `Step`; it returns the finish reason. Everything between two
forwards (sampling, stop rules, the policy's decision, commits, KV rollback) happens here,
on the host, for this request alone; the scheduler batches the forwards of all requests.

    while budget left:  draft a step -> evidence -> keep or escalate (decision.py) -> commit
    (lookahead:         draft k steps -> one target pass judges them -> keep the accepted
                        prefix, the target writes the step at the first rejection -> commit)

KV bookkeeping follows one invariant: after a commit each model has seen at most the
committed context minus its last token, and catches up on the rest in ONE prefill when it
next writes or scores. Before that prefill the flow asks to share another request's KV of
the same leading tokens (`SharePrefix`), so a prompt many requests share is computed once.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from . import nvtx
from .decision import decide_ahead, decide_step
from .prm.target_likelihood import mean_probability, mean_token_probability, steps_mean_probabilities
from .request import Request
from .roles import Role
from .runtime.chunked_decoder import decode_step_chunked
from .runtime.model_runner import ForwardOutput
from .runtime.speculative import speculative_step
from .runtime.step_decoder import DecodedStep, StopRule, decode_step_flow
from .runtime.work import ModelWork, StepWork, share_prefix
from .sequence import Step
from .stop_strings import end_at_stop, tokens_through_stop

if TYPE_CHECKING:
    from .engine import Engine

DEFAULT_SPEC_K = 4
D, T = Role.DRAFT, Role.TARGET


def request_flow(eng: "Engine", req: Request):
    """The request from its committed state to its end (also after a preemption: a resumed
    flow starts with empty KV and its first catch-up prefill recomputes it)."""
    seq, pol = req.seq, req.policy
    while True:
        budget = budget_left(eng, req)
        if budget <= 0:
            return "length"
        req.mark_step_start()
        source = _LocalSource(eng, req, budget)
        if pol.drafts_ahead:
            # A lookahead round commits nothing until it is decided, so a preemption inside it
            # redraws the whole round from the same random numbers.
            decisions = yield from decide_ahead(pol, source)
        else:
            decisions = [(yield from decide_step(pol, source))]
        for decision in decisions:
            step = source.as_step(decision.kept, decision.escalated)
            if decision.drafted is not None and decision.escalated:
                step.rejected_draft = eng.text(decision.drafted.tokens, D)
            ev = decision.evidence
            step.draft_prm, step.target_prm, step.router_score = ev.draft_prm, ev.target_prm, ev.router_score
            step.judge_score = ev.judge_score
            if req.record_features and decision.drafted is not None:
                step.features = decision.drafted.features.features()
            writer = T if decision.escalated else D
            cut_at_stop(eng, req, step, writer)
            other_ids = None if eng.shared_vocab else eng.encode_step(step.text, writer.other)
            seq.commit(step, writer, other_ids)
            req.stats.steps += 1
            req.stats.escalations += decision.escalated and pol.drafts
            yield step
            if step.ended_by in ("eos", "stop"):
                return step.ended_by


def cut_at_stop(eng: "Engine", req: Request, step: Step, writer: Role) -> None:
    """End the answer in this step if it writes one of the request's stop strings: its text
    stops before the string, its ids run through the token that completes it."""
    stops = req.sampling.stop
    if not stops:
        return
    before = "".join(req.seq.step_texts())
    written = step.token_ids
    if end_at_stop(step, before, stops):
        step.token_ids = written[:tokens_through_stop(written, lambda ids: eng.text(ids, writer), before, stops)]


def budget_left(eng: "Engine", req: Request, ahead: int = 0, ahead_target: int = 0) -> int:
    """Tokens the request may still write: its max_new_tokens, and the room left in the longer
    of its two contexts. `ahead` / `ahead_target`: tokens of draft steps written past the
    committed context (in the draft's and the target's ids), counted as if committed."""
    seq = req.seq
    room = eng.max_len - max(len(seq.tokens(D)) + ahead, len(seq.tokens(T)) + ahead_target)
    return min(req.sampling.max_new_tokens - seq.num_generated - ahead, room)


class _LocalSource:
    """The evidence of one step from the native models (decision.StepSource)."""

    def __init__(self, eng: "Engine", req: Request, budget: int) -> None:
        self.eng, self.req, self.seq, self.stats = eng, req, req.seq, req.stats
        self.stops = {m: self._stop(m, budget) for m in Role}
        self.target_first: ForwardOutput | None = None  # the target's logits to start its own step
        # Lookahead: each drafted step in the target's ids, the judging forward's output and
        # the KV length it started from, and the kept steps' target ids (not committed yet)
        # that the target's own step follows.
        self.ahead_ids: list[list[int]] = []
        self.judged: tuple[ForwardOutput, int] | None = None
        self.kept_ahead: list[int] = []

    def _stop(self, role: Role, budget: int) -> StopRule:
        s = self.req.sampling
        return StopRule(self.eng.boundary_ids[role], frozenset() if s.ignore_eos else self.eng.eos_ids[role],
                        s.max_step_tokens, budget)

    # ---------------------------------------------------------------- StepSource
    def draft_step(self):
        pol = self.req.policy
        track = pol.needs_router or self.req.record_features
        return (yield from self._write(D, track_features=track,
                                       router=self.eng.router_for(pol) if pol.needs_router else None))

    def router_score(self, drafted: DecodedStep) -> float:
        if drafted.router_score is not None:  # the chunked decoder's read brought it back
            return drafted.router_score
        t = time.perf_counter()
        with torch.inference_mode(), nvtx.range("router"):
            score = float(self.eng.router_for(self.req.policy)(drafted.features.features()))
        self.stats.host_syncs += 1
        self.stats.router_s += time.perf_counter() - t
        return score

    def draft_prm(self, drafted: DecodedStep):
        eng, seq = self.eng, self.seq
        prm = eng.prms.for_policy(self.req.policy.prm)
        if prm is not None:
            t = time.perf_counter()
            with nvtx.range("prm"):
                score = prm.score(seq.prompt_text, seq.step_texts(), eng.text(drafted.tokens, D))
            self.stats.prm_s += time.perf_counter() - t
            return score
        # Target likelihood: one target prefill over the unseen context and the draft step.
        # Row j of the last n rows predicts the step's j-th token; the first of them is also
        # exactly what the target needs to start its own step if this one is rejected.
        step_ids = self._target_ids(drafted)
        if not step_ids:  # the draft step is empty text in the target's vocabulary
            return 0.0
        n = len(step_ids)
        yield from share_prefix(eng.cache, seq.seq_id, T, seq.tokens(T))
        seen = eng.cache.num_tokens(seq.seq_id, T)
        self.stats.add_prefill(T, len(seq.tokens(T)) - seen + n - 1)
        out = yield ModelWork(T, seq.seq_id, seq.tokens(T)[seen:] + step_ids[:-1], rows=n)
        with torch.inference_mode():
            score = mean_token_probability(out.logits, step_ids)
        self.stats.host_syncs += 1  # the score's read
        self.target_first = ForwardOutput(hidden=out.hidden[:1], logits=out.logits[:1])
        return score

    def judge_score(self, drafted: DecodedStep):
        """SpecReason's judgement (prm/target_judge.py): ONE target forward over the unseen
        committed context, the draft step and the judge prompt, whose last row holds the answer.

        The forward doubles as the target's catch-up. Afterwards its KV is cut back to the
        committed context plus the draft step minus its last token: exactly what the invariant
        allows once the step is kept; the prompt's tokens never stay. The row of the last
        committed token starts the target's own step if this one is rejected."""
        eng, seq = self.eng, self.seq
        judge = eng.target_judge
        step_ids = self._target_ids(drafted)
        committed = len(seq.tokens(T))
        yield from share_prefix(eng.cache, seq.seq_id, T, seq.tokens(T))
        # Feed at least the last committed token, so its row (the escalation's start) is computed.
        seen = min(eng.cache.num_tokens(seq.seq_id, T), committed - 1)
        if eng.cache.num_tokens(seq.seq_id, T) > seen:
            eng.cache.truncate(seq.seq_id, T, seen)
        fed = seq.tokens(T)[seen:] + step_ids + judge.prompt_ids
        self.stats.add_prefill(T, len(fed))
        start = committed - 1 - seen  # the last committed token's row in `fed`
        out = yield ModelWork(T, seq.seq_id, fed, rows=len(fed) - start)  # rows from it to the judgement
        with torch.inference_mode():
            score = judge.score(out.logits[-1])
        self.stats.host_syncs += 1  # the score's read
        if step_ids:
            self.target_first = ForwardOutput(hidden=out.hidden[:1], logits=out.logits[:1])
            eng.cache.truncate(seq.seq_id, T, committed + len(step_ids) - 1)
        else:  # an empty step commits nothing: the KV goes back to where it started
            eng.cache.truncate(seq.seq_id, T, seen)
        return score

    def draft_ahead(self, k: int):
        """Lookahead: the draft writes up to k steps past the committed context, each after the
        last (its unfed last token is the next step's one-token catch-up). Drafting stops early
        at EOS or when the budget is spent, so no draft step is ever written past it."""
        eng, seq = self.eng, self.seq
        drafted: list[DecodedStep] = []
        ahead = ahead_target = 0
        while len(drafted) < k:
            budget = budget_left(eng, self.req, ahead, ahead_target)
            if budget <= 0 or (drafted and drafted[-1].ended_by == "eos"):
                break
            self.stops[D] = self._stop(D, budget)
            first = None
            if drafted:
                self.stats.add_prefill(D, 1)  # the catch-up any next step starts with
                first = yield ModelWork(D, seq.seq_id, drafted[-1].tokens[-1:])
            step = yield from self._write(D, first=first, track_features=self.req.record_features)
            drafted.append(step)
            self.ahead_ids.append(self._target_ids(step))
            ahead += len(step.tokens)
            ahead_target += len(self.ahead_ids[-1])
        return drafted

    def judge_ahead(self, drafted: list[DecodedStep]):
        """Lookahead's judgement: ONE target prefill over the unseen committed context and every
        drafted step; the rows predicting a step's tokens give its target likelihood (RSD's
        score), and the row before a step's first token starts the target's own step there.
        The drafted steps' last token is fed too, so that row exists for every step
        (`keep_ahead` then rolls the KV back)."""
        eng, seq = self.eng, self.seq
        yield from share_prefix(eng.cache, seq.seq_id, T, seq.tokens(T))
        seen = eng.cache.num_tokens(seq.seq_id, T)
        steps = [t for ids in self.ahead_ids for t in ids]
        fed = seq.tokens(T)[seen:] + steps
        self.stats.add_prefill(T, len(fed))
        out = yield ModelWork(T, seq.seq_id, fed, rows="all")
        first = len(seq.tokens(T)) - 1 - seen  # the row predicting the first drafted token
        with torch.inference_mode():
            scores = steps_mean_probabilities(out.logits[first:first + len(steps)], self.ahead_ids)
        self.stats.host_syncs += 1  # the scores' read
        self.judged = (out, seen)
        return scores

    def keep_ahead(self, drafted: list[DecodedStep], kept: int) -> None:
        """Roll both models back to the end of the first `kept` drafted steps. All kept: each
        model keeps all but the last token, as after any step. Otherwise the target writes its
        own step there, from the judging forward's row (as an escalation after RSD's score)."""
        eng, seq, sid = self.eng, self.seq, self.seq.seq_id
        self.kept_ahead = [t for ids in self.ahead_ids[:kept] for t in ids]
        if kept == len(drafted):  # the draft already stands at its last token, unfed
            eng.cache.truncate(sid, T, len(seq.tokens(T)) + len(self.kept_ahead) - 1)
            return
        ahead = sum(len(d.tokens) for d in drafted[:kept])
        eng.cache.truncate(sid, D, len(seq.tokens(D)) + ahead)
        start = len(seq.tokens(T)) + len(self.kept_ahead)
        eng.cache.truncate(sid, T, start)
        out, seen = self.judged
        row = start - 1 - seen
        self.target_first = ForwardOutput(hidden=out.hidden[row:row + 1], logits=out.logits[row:row + 1])
        self.stops[T] = self._stop(T, budget_left(eng, self.req, ahead, len(self.kept_ahead)))
        self.stats.wasted_draft_steps += len(drafted) - kept

    def _target_ids(self, drafted: DecodedStep) -> list[int]:
        """A draft step in the target's token ids (the same ids when they share a vocabulary)."""
        eng = self.eng
        return drafted.tokens if eng.shared_vocab else eng.encode_step(eng.text(drafted.tokens, D), T)

    def previous_draft_step(self) -> str | None:
        steps = self.seq.steps
        return steps[-1].text if steps and steps[-1].source == D.label else None

    def target_step(self):
        """The target writes the step from the committed context and any draft steps kept ahead
        of it in this round (its KV rolled back to them), speculated by the draft when
        spec_k > 0 (always, under the spec_decode policy)."""
        eng, seq = self.eng, self.seq
        context = len(seq.tokens(T)) + len(self.kept_ahead)
        if eng.cache.num_tokens(seq.seq_id, T) > context:
            eng.cache.truncate(seq.seq_id, T, context)
        if eng.config.spec_k > 0 or self.req.policy.name == "spec_decode":
            k = eng.config.spec_k or DEFAULT_SPEC_K
            written = yield from speculative_step(eng.cache, seq, k, self.req.sampling, self.req.generator,
                                                  self.stops[T], seq.tokens(T) + self.kept_ahead)
            self.stats.add_tokens(T, len(written.tokens))
            self.stats.spec_proposed += written.spec_proposed
            self.stats.spec_accepted += written.spec_accepted
            self.stats.host_syncs += written.host_syncs
            self.stats.decode_host_syncs += written.host_syncs
            return written
        first, self.target_first = self.target_first, None
        return (yield from self._write(T, first=first))

    def target_prm(self, candidate: DecodedStep) -> float:
        eng, seq = self.eng, self.seq
        prm = eng.prms.for_policy(self.req.policy.prm)
        if prm is None:
            return mean_probability(candidate.logprobs)
        t = time.perf_counter()
        with nvtx.range("prm"):
            score = prm.score(seq.prompt_text, seq.step_texts(), eng.text(candidate.tokens, T))
        self.stats.prm_s += time.perf_counter() - t
        return score

    def reject_draft(self, drafted: DecodedStep) -> None:
        self.eng.cache.truncate(self.seq.seq_id, D, len(self.seq.tokens(D)))
        self.stats.wasted_draft_steps += 1

    def discard_candidate(self, candidate: DecodedStep) -> None:
        """The target's losing candidate goes; the context it read stays."""
        eng, sid = self.eng, self.seq.seq_id
        eng.cache.truncate(sid, T, min(eng.cache.num_tokens(sid, T), len(self.seq.tokens(T))))

    # ---------------------------------------------------------------- writing
    def _chunked(self) -> bool:
        """Whether this step is decoded by the batch-1 chunked decoder (decode_chunk != 1). It
        decodes a step by itself, holding up every other request until the step ends, so with
        others in flight a greedy step takes a row of the shared chunked loop instead (or, when
        it gets none, and for unseeded sampling, decodes per token in the shared forwards);
        greedy tokens are the same every way. A seeded sampled request keeps this decoder
        whatever runs beside it: its rolled-back tokens consume random numbers, so switching
        decoders would make its tokens depend on the other requests."""
        if self.eng.config.decode_chunk == 1:
            return False
        req = self.req
        return (req.generator is not None and not req.sampling.greedy) or self.eng.decodes_alone()

    def _shares_rows(self, role: Role, router) -> bool:
        """Whether this greedy step, with other requests in flight, got a row of the model's
        shared chunked loop (k tokens per host read for every row; runtime/chunked_rows.py)."""
        if not self.req.sampling.greedy or self.eng.decodes_alone():
            return False
        rows = self.eng.scheduler.chunked_rows(role)
        return rows is not None and rows.reserve(self.seq.seq_id, self.stops[role], router)

    def as_step(self, written: DecodedStep, escalated: bool) -> Step:
        writer = T if escalated else D
        return Step(text=self.eng.text(written.tokens, writer), token_ids=written.tokens, source=writer.label,
                    ended_by=written.ended_by)

    def _write(self, role: Role, first: ForwardOutput | None = None, track_features: bool = False, router=None):
        """Catch up on the committed context in one prefill (unless `first` already holds the
        logits that start the step), then decode the step."""
        eng, seq, req = self.eng, self.seq, self.req
        if first is None:
            yield from share_prefix(eng.cache, seq.seq_id, role, seq.tokens(role))
            seen = eng.cache.num_tokens(seq.seq_id, role)
            self.stats.add_prefill(role, len(seq.tokens(role)) - seen)
            first = yield ModelWork(role, seq.seq_id, seq.tokens(role)[seen:])
        if self._shares_rows(role, router):
            written = yield StepWork(role, seq.seq_id, first, self.stops[role], router, track_features)
            self.stats.rolled_back_tokens += written.rolled_back
        elif not self._chunked():
            written = yield from decode_step_flow(role, seq.seq_id, first, req.sampling, req.generator,
                                                  self.stops[role], track_features)
        else:
            # The chunked decoder runs its own device loop (CUDA graphs of batch 1): it decodes
            # this request's step by itself, outside the scheduler's batch.
            t = time.perf_counter()
            mean_step_len = seq.num_generated / len(seq.steps) if seq.steps else None
            written = decode_step_chunked(eng.runners[role], seq.seq_id, first, req.sampling, req.generator,
                                          self.stops[role], track_features, chunk=eng.config.decode_chunk,
                                          mean_step_len=mean_step_len, score=router)
            self.stats.rolled_back_tokens += written.rolled_back
            self.stats.add_seconds(role, time.perf_counter() - t)
        self.stats.add_tokens(role, len(written.tokens))
        self.stats.host_syncs += written.host_syncs
        self.stats.decode_host_syncs += written.host_syncs
        return written
