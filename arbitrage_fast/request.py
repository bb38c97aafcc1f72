"""One request in the engine: what was asked, its state, its accounting, its result.

A request is created validated (policy, sampling, prompt ids), waits until the scheduler
admits it, runs as a step flow the scheduler drives, and ends finished, failed or aborted.
Preemption sends a running request back to the front of the waiting queue: its pages are
freed, its committed steps kept, and the step it was writing is written again on resume
(the generator rewound to where that step began, so seeded sampling draws the same tokens).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from enum import Enum

import torch

from .config import SamplingParams
from .policies import Policy
from .roles import Role
from .sequence import GenerationResult, Sequence


class RequestState(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"  # ended by EOS or length
    FAILED = "failed"  # raised an error (the error is on the request)
    ABORTED = "aborted"  # cancelled by its caller


@dataclass
class RequestStats:
    """A request's accounting. host_syncs: every blocking device-to-host read the engine makes
    for it (step decoding, router and target-likelihood scores); decode_host_syncs: the
    decoders' share. Not counted: a PRM model's own reads inside `prm.score`, and the
    per-proposal reads of speculative verification (one read per proposal and per verify).
    draft_s / target_s add up the forwards the request took part in (a batched forward counts
    whole for each of its requests: it is the time each of them waited for it).
    draft_cached_tokens / target_cached_tokens: context tokens whose KV the request took over
    from another request instead of computing (they are not in the *_prefill_tokens);
    cached_prompt_tokens: the most prompt tokens one of its models took over that way in one go
    (all but the last for a copy of a running request's prompt), reported as vLLM reports
    `prompt_tokens_details.cached_tokens`. wasted_draft_steps: draft steps written and not
    committed (an escalated step's draft; under lookahead also the steps drafted past it)."""

    steps: int = 0
    escalations: int = 0
    draft_tokens: int = 0
    target_tokens: int = 0
    draft_prefill_tokens: int = 0
    target_prefill_tokens: int = 0
    draft_cached_tokens: int = 0
    target_cached_tokens: int = 0
    cached_prompt_tokens: int = 0
    host_syncs: int = 0
    decode_host_syncs: int = 0
    rolled_back_tokens: int = 0
    wasted_draft_steps: int = 0
    spec_proposed: int = 0
    spec_accepted: int = 0
    preemptions: int = 0
    draft_s: float = 0.0
    target_s: float = 0.0
    prm_s: float = 0.0
    router_s: float = 0.0
    queue_s: float = 0.0  # waiting for admission (and again after each preemption)
    wall_s: float = 0.0  # arrival to end

    def add_tokens(self, role: Role, n: int) -> None:
        name = f"{role.label}_tokens"
        setattr(self, name, getattr(self, name) + n)

    def add_prefill(self, role: Role, n: int) -> None:
        name = f"{role.label}_prefill_tokens"
        setattr(self, name, getattr(self, name) + n)

    def add_cached(self, role: Role, n: int, prompt: int) -> None:
        """n more tokens of `role`'s context taken over, `prompt` of them in the prompt. The
        largest such take-over counts, not the sum: a request preempted and resumed may take
        its prompt over again, and each model takes over the same prompt."""
        name = f"{role.label}_cached_tokens"
        setattr(self, name, getattr(self, name) + n)
        self.cached_prompt_tokens = max(self.cached_prompt_tokens, prompt)

    def add_seconds(self, role: Role, s: float) -> None:
        name = f"{role.label}_s"
        setattr(self, name, getattr(self, name) + s)

    def as_dict(self) -> dict:
        out = asdict(self)
        if not self.spec_proposed:  # only runs that speculated report acceptance
            del out["spec_proposed"], out["spec_accepted"]
        return out


@dataclass(eq=False)
class Request:
    request_id: int
    seq: Sequence
    policy: Policy
    sampling: SamplingParams
    record_features: bool = False
    generator: torch.Generator | None = None
    stats: RequestStats = field(default_factory=RequestStats)
    state: RequestState = RequestState.WAITING
    arrival: float = field(default_factory=time.perf_counter)
    waiting_since: float = field(default_factory=time.perf_counter)
    result: GenerationResult | None = None
    error: BaseException | None = None
    flow: object = None  # the running step flow (a generator), None while waiting
    pending: object = None  # the ModelWork the flow waits on
    reported_steps: int = 0  # committed steps already handed out by `Engine.step`
    _step_rng_state: torch.Tensor | None = None

    @property
    def done(self) -> bool:
        return self.state in (RequestState.FINISHED, RequestState.FAILED, RequestState.ABORTED)

    def mark_step_start(self) -> None:
        """Remember the sampler's state where a step begins, so a preempted step is redrawn
        with the same random numbers."""
        if self.generator is not None:
            self._step_rng_state = self.generator.get_state()

    def rewind_step(self) -> None:
        if self.generator is not None and self._step_rng_state is not None:
            self.generator.set_state(self._step_rng_state)


@dataclass
class StepOutput:
    """What one engine iteration produced for one request: its newly committed steps, and
    its result (or error) when it ended."""

    request_id: int
    steps: list  # Step objects committed in this iteration
    state: RequestState
    result: GenerationResult | None = None
    error: BaseException | None = None
    prompt_tokens: int = 0  # the prompt's length in the target's tokens (0 where unknown)
    drafts: bool = True  # the request's policy drafts steps (escalation counts mean something)

    @property
    def finished(self) -> bool:
        return self.state is not RequestState.RUNNING and self.state is not RequestState.WAITING
