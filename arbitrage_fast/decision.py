"""The step decision, written once: draft a step, gather the policy's evidence, keep it or
escalate (`decide_step`); or, for Lookahead Reasoning, a round of k draft steps judged
together (`decide_ahead`, native engine only). The native engine and the remote backend both
run `decide_step` over a `StepSource`, so the two cannot drift.

A source's methods either answer at once (the remote backend: each is an HTTP request) or
are generators that yield model work and return the answer (the native engine: the
scheduler batches the work of every request). `decide_step` is itself such a generator;
`run_now` drives it where nothing is ever yielded.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from .policies import Policy, StepEvidence

W = TypeVar("W")  # a written step, in the source's own form


class StepSource(Protocol[W]):
    def draft_step(self) -> W: ...
    def router_score(self, drafted: W) -> float: ...
    def draft_prm(self, drafted: W) -> float: ...
    def judge_score(self, drafted: W) -> float: ...
    def previous_draft_step(self) -> str | None: ...
    def target_step(self) -> W: ...
    def target_prm(self, candidate: W) -> float: ...
    def reject_draft(self, drafted: W) -> None: ...
    def discard_candidate(self, candidate: W) -> None: ...
    def draft_ahead(self, k: int) -> list[W]: ...
    def judge_ahead(self, drafted: list[W]) -> list[float]: ...
    def keep_ahead(self, drafted: list[W], kept: int) -> None: ...


@dataclass
class StepDecision(Generic[W]):
    kept: W  # the step to commit
    escalated: bool  # True: kept is the target's step
    drafted: W | None  # the draft's step (None when the policy does not draft)
    evidence: StepEvidence


def decide_step(policy: Policy, source: StepSource[W]):
    """One step under `policy`: a generator of the source's model work returning a StepDecision."""
    evidence = StepEvidence()
    if policy.reads_previous_step:
        evidence.previous_draft_step = source.previous_draft_step()
    if not policy.drafts or policy.takes_over(evidence):
        return StepDecision(kept=(yield from _answer(source.target_step())), escalated=True, drafted=None,
                            evidence=evidence)
    drafted = yield from _answer(source.draft_step())
    if policy.needs_router:
        evidence.router_score = yield from _answer(source.router_score(drafted))
    if policy.needs_draft_prm:
        evidence.draft_prm = yield from _answer(source.draft_prm(drafted))
    if policy.needs_judge:
        evidence.judge_score = yield from _answer(source.judge_score(drafted))
    candidate = None
    if policy.generates_target_candidate:
        candidate = yield from _answer(source.target_step())
        if policy.needs_target_prm:
            evidence.target_prm = yield from _answer(source.target_prm(candidate))
    if policy.escalate(evidence):
        source.reject_draft(drafted)
        if candidate is None:
            candidate = yield from _answer(source.target_step())
        return StepDecision(kept=candidate, escalated=True, drafted=drafted, evidence=evidence)
    if candidate is not None:
        source.discard_candidate(candidate)
    return StepDecision(kept=drafted, escalated=False, drafted=drafted, evidence=evidence)


def decide_ahead(policy: Policy, source: StepSource[W]):
    """One round of Lookahead Reasoning: a generator of the source's model work returning the
    round's StepDecisions, in commit order.

    The draft writes up to k steps past the committed context (fewer when one ends the answer
    or the budget); the target judges them all in one pass; the longest prefix the policy
    accepts is kept. At the first rejected step both models are rolled back to the end of
    that prefix and the target writes its own step there, so a round commits the kept draft
    steps and at most one target step: escalation is still reported per step."""
    drafted = yield from _answer(source.draft_ahead(policy.drafts_ahead))
    scores = yield from _answer(source.judge_ahead(drafted))
    kept = policy.accepted_steps(scores)
    decisions = [StepDecision(kept=d, escalated=False, drafted=d, evidence=StepEvidence(judge_score=s))
                 for d, s in zip(drafted[:kept], scores)]
    source.keep_ahead(drafted, kept)
    if kept < len(drafted):
        written = yield from _answer(source.target_step())
        decisions.append(StepDecision(kept=written, escalated=True, drafted=drafted[kept],
                                      evidence=StepEvidence(judge_score=scores[kept])))
    return decisions


def run_now(flow):
    """The value of a decision whose source answered everything at once (nothing yielded)."""
    try:
        item = next(flow)
    except StopIteration as done:
        return done.value
    raise TypeError(f"this step source yielded {type(item).__name__}: run it under the engine's scheduler")


def _answer(value):
    """A source method's answer: generators are delegated to, plain values returned."""
    if inspect.isgenerator(value):
        return (yield from value)
    return value
