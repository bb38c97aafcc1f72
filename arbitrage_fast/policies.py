"""Step-level routing policies: given what is known about a draft step, keep it or escalate.

Policies only decide. They declare which evidence they need (a PRM score of the draft step,
a router score, a target candidate, the target's judgement of the draft step, the previous
step) and the engine produces exactly that, so a policy can never cost more than its evidence.

Beside the paper's policies live the peer step-level methods, so all run in one engine on the
same models and clock: SpecReason (`specreason`: the target scores the draft step 0-9 and
keeps it at >= threshold), Speculative Thinking (`spec_thinking`: a draft step that opens
with a reflection cue hands the next step to the target) and Lookahead Reasoning
(`lookahead`: the draft writes k steps ahead, the target judges them all in one pass and the
longest prefix it accepts is kept).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from .roles import Role


@dataclass
class StepEvidence:
    draft_prm: float | None = None
    target_prm: float | None = None
    router_score: float | None = None
    # The target's judgement of the draft step: specreason's expected digit 0-9, lookahead's
    # target likelihood (mean probability of the step's tokens).
    judge_score: float | None = None
    previous_draft_step: str | None = None  # the last committed step's text, when the draft wrote it


# Speculative Thinking's reflection words: a paragraph opening with one is where a small
# reasoning model most often goes astray, so the target writes the paragraph after it.
DEFAULT_REFLECTION_CUES = ("Wait", "But", "Alternatively", "Hmm")

# Lookahead Reasoning's k: draft steps written ahead of the target's one judging pass.
DEFAULT_LOOKAHEAD_K = 3


@dataclass(frozen=True)
class Policy:
    name: str
    threshold: float | None
    drafts: bool = True  # False: the target writes every step
    needs_draft_prm: bool = False
    needs_router: bool = False
    generates_target_candidate: bool = False  # the target writes every step too (then one is kept)
    needs_target_prm: bool = False
    needs_judge: bool = False  # the target scores the draft step (one forward, then rolled back)
    reads_previous_step: bool = False  # may hand a step to the target before the draft writes it
    # > 0: the draft writes up to this many steps before the target judges them all in one
    # forward, and the longest accepted prefix is kept (decision.decide_ahead)
    drafts_ahead: int = 0
    # What scores this policy's steps, when its name asks ("rsd:likelihood", "arbitrage:exact"):
    # for a policy that reads a PRM, one of prm/build.py's PRM_VARIANTS; for one that reads the
    # router, the name of one of the engine's extra router heads. None: the engine's own.
    variant: str | None = None

    @property
    def base_name(self) -> str:
        """The policy without its variant: "rsd" for "rsd:exact"."""
        return self.name.partition(":")[0]

    @property
    def prm(self) -> str | None:
        """The PRM variant this policy scores with (None: the engine's PRM)."""
        return None if self.needs_router else self.variant

    def escalate(self, e: StepEvidence) -> bool:
        """True when the target's step should be committed instead of the draft's."""
        raise NotImplementedError

    def score(self, e: StepEvidence) -> float:
        """The number a thresholded policy compares with its threshold."""
        raise ValueError(f"policy {self.name!r} has no threshold, so no score")

    def takes_over(self, e: StepEvidence) -> bool:
        """True when the target writes this step without a draft (decided before drafting)."""
        return False

    @property
    def roles(self) -> tuple[Role, ...]:
        """The models whose KV this policy fills (what admission has to find room for)."""
        if self.base_name == "draft_only":
            return (Role.DRAFT,)
        if self.base_name == "target_only":
            return (Role.TARGET,)
        return (Role.DRAFT, Role.TARGET)


class TargetOnly(Policy):
    def escalate(self, e: StepEvidence) -> bool:
        return True


class SpeculativeTarget(Policy):
    """Token-level speculative decoding: the target's output, drafted k tokens at a time."""

    def escalate(self, e: StepEvidence) -> bool:
        return True


class DraftOnly(Policy):
    def escalate(self, e: StepEvidence) -> bool:
        return False


class Thresholded(Policy):
    """A policy that escalates on one score of the step's evidence crossing its threshold:
    above it when `escalates_above`, below it otherwise."""

    escalates_above: ClassVar[bool] = False

    def escalate(self, e: StepEvidence) -> bool:
        s = self.score(e)
        return s > self.threshold if self.escalates_above else s < self.threshold


class RewardGuided(Thresholded):
    """RSD: escalate whenever the PRM scores the draft step below the threshold."""

    def score(self, e: StepEvidence) -> float:
        return e.draft_prm


class ArbitrageOracle(Thresholded):
    """Both steps are written and scored; escalate when the advantage PRM(t) - PRM(d) > threshold."""

    escalates_above = True

    def score(self, e: StepEvidence) -> float:
        return e.target_prm - e.draft_prm


class ArbitrageRouter(Thresholded):
    """Escalate when the router's predicted probability of a positive advantage > threshold."""

    escalates_above = True

    def score(self, e: StepEvidence) -> float:
        return e.router_score


class EveryStep(Thresholded):
    """The paper's released code: the target writes every step, the router picks which to keep.

    Without a router head it falls back to the RSD rule. Its outputs equal `arbitrage` (or
    `rsd`) at the same threshold; only the wasted target work differs, which is the point.
    """

    @property
    def escalates_above(self) -> bool:  # the router's rule, or RSD's without a router
        return self.needs_router

    def score(self, e: StepEvidence) -> float:
        return e.router_score if self.needs_router else e.draft_prm


class SpecReason(Thresholded):
    """SpecReason: the target judges the draft step with a one-token score 0-9, read as the
    expected digit under its next-token distribution; keep the step when the score >= the
    threshold. Threshold 0 keeps every draft step; 10 (above any score) escalates every one."""

    def score(self, e: StepEvidence) -> float:
        return e.judge_score


class Lookahead(Thresholded):
    """Lookahead Reasoning: the draft writes `drafts_ahead` steps ahead; the target reads them
    in one catch-up prefill that scores each by its likelihood (as RSD's target-likelihood PRM
    does), and the longest prefix of steps scoring >= the threshold is kept. At the first
    step below it the target writes its own step instead, and the steps after it are dropped.
    Threshold 0 keeps every draft step; above 1 (beyond any mean probability) none."""

    def score(self, e: StepEvidence) -> float:
        return e.judge_score

    def accepted_steps(self, scores: list[float]) -> int:
        """How many leading draft steps are kept: the longest prefix whose scores all pass."""
        for i, score in enumerate(scores):
            if self.escalate(StepEvidence(judge_score=score)):
                return i
        return len(scores)


@dataclass(frozen=True)
class SpeculativeThinking(Policy):
    """Speculative Thinking: the draft's steps are kept; when a kept draft step opens with a
    reflection cue, the target writes the next step. A cue matches the step's first word
    (after leading whitespace), case-insensitively, and not as the prefix of a longer word
    ("But" matches "But," and "but we", never "Butter")."""

    cues: tuple[str, ...] = DEFAULT_REFLECTION_CUES

    def escalate(self, e: StepEvidence) -> bool:
        return False

    def takes_over(self, e: StepEvidence) -> bool:
        return e.previous_draft_step is not None and opens_with_cue(e.previous_draft_step, self.cues)


def opens_with_cue(text: str, cues: tuple[str, ...]) -> bool:
    head = text.lstrip().casefold()
    for cue in cues:
        c = cue.casefold()
        if head.startswith(c) and (len(head) == len(c) or not head[len(c)].isalnum()):
            return True
    return False


def check_cues(cues) -> tuple[str, ...]:
    """Reflection cues as a tuple of non-empty words (an empty cue would match every step)."""
    if isinstance(cues, str):
        raise ValueError(f"reflection cues must be a list of words, not the string {cues!r}")
    cues = tuple(cues)
    if not cues:
        raise ValueError("spec_thinking needs at least one reflection cue")
    for c in cues:
        if not isinstance(c, str) or not c.strip() or c != c.strip():
            raise ValueError(f"reflection cue {c!r} must be a non-empty word without surrounding whitespace")
    return cues


def check_lookahead_k(k) -> int:
    """Lookahead's k as a positive integer (k = 1 is a step at a time, RSD's rhythm)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"lookahead_k (draft steps written ahead of the target's judgement) must be an "
                         f"integer >= 1, got {k!r}")
    return k


# name -> (class, default threshold, allowed threshold range, flags)
_POLICIES = {
    "target_only": (TargetOnly, None, None, dict(drafts=False)),
    "draft_only": (DraftOnly, None, None, {}),
    "spec_decode": (SpeculativeTarget, None, None, dict(drafts=False)),
    "rsd": (RewardGuided, 0.7, (0.0, math.inf), dict(needs_draft_prm=True)),
    "oracle": (ArbitrageOracle, 0.0, (-1.0, 1.0),
               dict(needs_draft_prm=True, generates_target_candidate=True, needs_target_prm=True)),
    "arbitrage": (ArbitrageRouter, 0.5, (0.0, 1.0), dict(needs_router=True)),
    "every_step": (EveryStep, 0.5, (0.0, math.inf), dict(generates_target_candidate=True)),
    "specreason": (SpecReason, 7.0, (0.0, 10.0), dict(needs_judge=True)),
    "spec_thinking": (SpeculativeThinking, None, None, dict(reads_previous_step=True)),
    "lookahead": (Lookahead, 0.7, (0.0, math.inf), {}),
}

POLICY_NAMES = tuple(_POLICIES)


def make_policy(name: str, threshold: float | None = None, *, have_router: bool = False,
                reflection_cues=DEFAULT_REFLECTION_CUES, lookahead_k: int = DEFAULT_LOOKAHEAD_K) -> Policy:
    """The policy `name`, optionally "POLICY:VARIANT": a policy that scores steps with a PRM (rsd,
    oracle, every_step without a router) names the PRM (prm/build.py's PRM_VARIANTS); one that
    reads the router (arbitrage, every_step with a router) names one of the engine's extra
    router heads, which the engine checks."""
    from .prm.build import PRM_VARIANTS

    base, at, variant = name.partition(":")
    cls, default, allowed, flags = _entry(name)
    flags = dict(flags)
    if at:
        reads_router = flags.get("needs_router") or (base == "every_step" and have_router)
        reads_prm = flags.get("needs_draft_prm") or flags.get("needs_target_prm") or base == "every_step"
        if not (reads_router or reads_prm):
            raise ValueError(f"policy {base!r} reads neither a PRM nor a router, so {name!r} names a scorer it "
                             "would not use")
        if not variant:
            raise ValueError(f"policy {name!r} names an empty variant after ':'")
        if not reads_router and variant not in PRM_VARIANTS:
            raise ValueError(f"unknown PRM {variant!r} in policy {name!r}; expected one of {', '.join(PRM_VARIANTS)}")
        flags["variant"] = variant
    if base == "every_step":
        flags["needs_router"] = have_router
        flags["needs_draft_prm"] = not have_router
    if base == "spec_thinking":
        flags["cues"] = check_cues(reflection_cues)
    if base == "lookahead":
        flags["drafts_ahead"] = check_lookahead_k(lookahead_k)
    if allowed is None:
        return cls(name=name, threshold=None, **flags)
    if threshold is None:
        threshold = default
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise ValueError(f"threshold must be a number, got {threshold!r}")
    if math.isnan(threshold):
        raise ValueError("threshold is NaN")
    lo, hi = allowed
    if not lo <= threshold <= hi:
        raise ValueError(f"threshold {threshold} is out of range for policy {name!r}: expected [{lo}, {hi}]")
    return cls(name=name, threshold=float(threshold), **flags)


def default_threshold(name: str) -> float | None:
    """The threshold policy `name` runs at when given none (make_policy's), None for a policy
    that takes no threshold."""
    cls, default, allowed, flags = _entry(name)
    return None if allowed is None else default


def _entry(name: str) -> tuple:
    """The table row of policy `name` ("POLICY" or "POLICY:VARIANT"), or a clear refusal."""
    base = name.partition(":")[0]
    if base not in _POLICIES:
        raise ValueError(f"unknown policy {name!r}; expected one of {', '.join(POLICY_NAMES)}")
    return _POLICIES[base]


def may_read_router(name: str) -> bool:
    """Whether policy `name` reads a router head when its engine holds one (arbitrage always,
    every_step instead of a PRM): make_policy's own rule, so the two cannot drift. An engine
    built for policies that all answer no can leave the head unloaded without changing any
    answer; an invalid name is refused here as make_policy refuses it."""
    return make_policy(name, have_router=True).needs_router
