"""Threshold sweeps: every policy at every threshold over the same problems, one point each.

The latency of a point is wall-clock time measured here, around
`engine.generate`, so it includes everything a user waits for (tokenisation,
scheduling, host syncs), not only what the engine chooses to time itself; the
engine's own `wall_s` is kept beside it as `engine_wall_s`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from tqdm.auto import tqdm

from .datasets import EvalItem
from .grading import grade

# Policies whose behaviour has no threshold to sweep: they run once, at threshold None.
THRESHOLDLESS_POLICIES = frozenset({"target_only", "draft_only"})
REQUIRED_STATS = ("draft_tokens", "target_tokens", "escalations", "steps", "wall_s")


def sweep_plan(policies: Sequence[str], thresholds: dict[str, list[float]]) -> list[tuple[str, float | None]]:
    """The (policy, threshold) runs of a sweep, in order.

    A policy listed in `thresholds` runs at each of its thresholds; any other
    policy runs once at None. Giving thresholds to a thresholdless policy is a
    mistake worth stopping for, not something to repeat silently.
    """
    plan: list[tuple[str, float | None]] = []
    for policy in policies:
        values = list(thresholds.get(policy) or [])
        if values and policy in THRESHOLDLESS_POLICIES:
            raise ValueError(f"policy {policy!r} has no threshold, but thresholds {values} were given for it")
        plan.extend((policy, t) for t in (values or [None]))
    return plan


def run_sweep(engine, items: Sequence[EvalItem], policies: Sequence[str], thresholds: dict[str, list[float]],
              sampling=None, grader: Callable[[str, str], bool] | None = None,
              progress: bool = True, audit_prm=None, generate_kwargs: dict | None = None) -> list[dict]:
    """Run the sweep and return one point per (policy, threshold).

    Each point holds: policy, threshold, n, accuracy, latency_s (mean wall-clock
    seconds per problem), escalation_rate (total escalations / total steps),
    draft_tokens and target_tokens and steps (means per problem), engine_wall_s.
    With `audit_prm`, each escalated step's rejected draft and committed target step are
    both scored offline, adding `wasted_escalation_share` (escalations whose target step
    scored no better than the draft step it replaced; None when nothing escalated).
    """
    if not items:
        raise ValueError("run_sweep needs at least one item")
    grader = grade if grader is None else grader
    plan = sweep_plan(policies, thresholds)
    points = []
    with tqdm(total=len(plan) * len(items), disable=not progress, unit="problem") as bar:
        for policy, threshold in plan:
            bar.set_description(policy if threshold is None else f"{policy}@{threshold:g}")
            points.append(_run_point(engine, items, policy, threshold, sampling, grader, bar, audit_prm,
                                     generate_kwargs or {}))
    return points


def _run_point(engine, items, policy, threshold, sampling, grader, bar, audit_prm, generate_kwargs) -> dict:
    totals = dict.fromkeys(REQUIRED_STATS, 0.0)
    correct, latency = 0, 0.0
    audited = wasted = 0
    for item in items:
        start = time.perf_counter()
        result = engine.generate(item.prompt, policy=policy, threshold=threshold, sampling=sampling,
                                 **generate_kwargs)
        latency += time.perf_counter() - start
        if audit_prm is not None:
            a, w = audit_escalations(engine, item.prompt, result, audit_prm)
            audited, wasted = audited + a, wasted + w
        correct += bool(grader(result.text, item.answer))
        for key in REQUIRED_STATS:
            if key not in result.stats:
                raise KeyError(f"engine result stats lack {key!r} (have {sorted(result.stats)}); "
                               f"a sweep needs {list(REQUIRED_STATS)}")
            totals[key] += result.stats[key]
        bar.update(1)
    n = len(items)
    return {
        "policy": policy,
        "threshold": threshold,
        "n": n,
        "accuracy": correct / n,
        "latency_s": latency / n,
        "escalation_rate": totals["escalations"] / totals["steps"] if totals["steps"] else 0.0,
        "draft_tokens": totals["draft_tokens"] / n,
        "target_tokens": totals["target_tokens"] / n,
        "steps": totals["steps"] / n,
        "engine_wall_s": totals["wall_s"] / n,
        **({"wasted_escalation_share": wasted / audited if audited else None} if audit_prm is not None else {}),
    }


def audit_escalations(engine, prompt: str, result, prm) -> tuple[int, int]:
    """(escalations audited, escalations that did not improve the PRM score) for one result."""
    audited = wasted = 0
    previous: list[str] = []
    for step in result.steps:
        if step.rejected_draft is not None:
            d = prm.score(prompt, previous, step.rejected_draft)
            t = prm.score(prompt, previous, step.text)
            audited += 1
            wasted += t <= d
        previous.append(step.text)
    return audited, wasted
