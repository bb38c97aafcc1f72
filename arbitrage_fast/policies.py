"""Step-level routing policies: given what is known about a draft step, keep it or escalate.

Policies only decide. They declare which evidence they need (a PRM score of the draft step,
a router score, a target candidate) and the engine produces exactly that, so a policy can
never cost more than its evidence.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .roles import Role


@dataclass
class StepEvidence:
    draft_prm: float | None = None
    target_prm: float | None = None
    router_score: float | None = None


@dataclass(frozen=True)
class Policy:
    name: str
    threshold: float | None
    drafts: bool = True  # False: the target writes every step
    needs_draft_prm: bool = False
    needs_router: bool = False
    generates_target_candidate: bool = False  # the target writes every step too (then one is kept)
    needs_target_prm: bool = False

    def escalate(self, e: StepEvidence) -> bool:
        """True when the target's step should be committed instead of the draft's."""
        raise NotImplementedError

    @property
    def roles(self) -> tuple[Role, ...]:
        """The models whose KV this policy fills (what admission has to find room for)."""
        if self.name == "draft_only":
            return (Role.DRAFT,)
        if self.name == "target_only":
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


class RewardGuided(Policy):
    """RSD: escalate whenever the PRM scores the draft step below the threshold."""

    def escalate(self, e: StepEvidence) -> bool:
        return e.draft_prm < self.threshold


class ArbitrageOracle(Policy):
    """Both steps are written and scored; escalate when the advantage PRM(t) - PRM(d) > threshold."""

    def escalate(self, e: StepEvidence) -> bool:
        return e.target_prm - e.draft_prm > self.threshold


class ArbitrageRouter(Policy):
    """Escalate when the router's predicted probability of a positive advantage > threshold."""

    def escalate(self, e: StepEvidence) -> bool:
        return e.router_score > self.threshold


class EveryStep(Policy):
    """The paper's released code: the target writes every step, the router picks which to keep.

    Without a router head it falls back to the RSD rule. Its outputs equal `arbitrage` (or
    `rsd`) at the same threshold; only the wasted target work differs, which is the point.
    """

    def escalate(self, e: StepEvidence) -> bool:
        if e.router_score is not None:
            return e.router_score > self.threshold
        return e.draft_prm < self.threshold


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
}

POLICY_NAMES = tuple(_POLICIES)


def make_policy(name: str, threshold: float | None = None, *, have_router: bool = False) -> Policy:
    if name not in _POLICIES:
        raise ValueError(f"unknown policy {name!r}; expected one of {', '.join(POLICY_NAMES)}")
    cls, default, allowed, flags = _POLICIES[name]
    flags = dict(flags)
    if name == "every_step":
        flags["needs_router"] = have_router
        flags["needs_draft_prm"] = not have_router
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
