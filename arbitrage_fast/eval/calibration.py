"""Thresholds chosen on dev, so that the test figures are not chosen on the problems they report.

`calibrate` sweeps every thresholded policy over a grid of the same density on the dev
split (even over its score range, or at the quantiles of its scores on train problems), and
this module picks, per policy, one threshold for each target:

- accuracy targets: the lowest-escalation grid point whose dev accuracy is at least
  target_only's dev accuracy minus 0, 1 or 2 points. Fewest escalations rather than lowest
  measured latency: escalations are what a point costs, and greedy decoding makes them
  the same on every run, where a latency on a shared machine is not. Ties go to fewer target
  tokens, then the lower threshold, never to a latency: points that tie on both often ran the
  very same steps, and their latencies differ only by noise (in a batched calibration, by
  which runs shared their batch);
- escalation targets: the grid point whose dev escalation rate is nearest 10, 20 or 30%.

`sweep --thresholds-from calibration.json` then runs exactly those thresholds on test once.
"""
from __future__ import annotations

import json
from pathlib import Path

from arbitrage_fast.policies import Policy

# Every policy gets GRID_POINTS thresholds spread evenly over the range its score lives in,
# so no policy's frontier looks better merely for being sampled more finely.
SCORE_RANGES = {"rsd": (0.0, 1.0), "arbitrage": (0.0, 1.0), "every_step": (0.0, 1.0), "oracle": (-1.0, 1.0),
                "specreason": (0.0, 10.0), "lookahead": (0.0, 1.0)}
GRID_POINTS = 21
ACCURACY_TARGETS = (0, 1, 2)  # points (hundredths) below target_only's dev accuracy
ESCALATION_TARGETS = (0.1, 0.2, 0.3)
_EPS = 1e-9  # accuracies are k/n floats; a floor met up to rounding is met


def threshold_grid(policy: str, points: int = GRID_POINTS) -> list[float]:
    """`points` evenly spaced thresholds over `policy`'s score range, ends included (a PRM
    variant, "rsd:exact", scores on its policy's range)."""
    base = policy.partition(":")[0]
    if base not in SCORE_RANGES:
        raise ValueError(f"policy {policy!r} has no threshold to calibrate; thresholded policies: "
                         f"{sorted(SCORE_RANGES)}")
    if points < 2:
        raise ValueError(f"a threshold grid needs at least 2 points, got {points}")
    lo, hi = SCORE_RANGES[base]
    return [round(lo + (hi - lo) * i / (points - 1), 6) for i in range(points)]


def keep_all_threshold(policy: Policy) -> float:
    """The end of `policy`'s score range at which it escalates no step: run there, it writes the
    draft's own answer and scores every step of it."""
    lo, hi = SCORE_RANGES[policy.base_name]
    return hi if policy.escalates_above else lo


def quantile_grid(policy: str, scores: list[float], points: int = GRID_POINTS) -> list[float]:
    """`points` thresholds for `policy`: its score range's two ends (no step escalated, every
    step escalated) and, between them, the evenly spaced quantiles of `scores`, the policy's
    own scores of draft steps on train problems. An even grid spends its points where a
    policy's scores are not (the target-likelihood PRM scores nearly every step above 0.8, so
    an even grid's points below it all escalate nothing); quantiles put each policy's points at
    the same escalation shares of the draft's steps, the same density for every policy in what
    a threshold controls. Tied scores can merge quantiles, so a grid may hold fewer points."""
    ends = threshold_grid(policy, 2)
    if points < 2:
        raise ValueError(f"a threshold grid needs at least 2 points, got {points}")
    if not scores:
        raise ValueError(f"no scored draft steps to place {policy!r}'s thresholds by; "
                         "the pilot problems produced none")
    ranked = sorted(scores)
    inner = []
    for i in range(1, points - 1):
        at = i / (points - 1) * (len(ranked) - 1)  # linear interpolation between order statistics
        below = int(at)
        value = ranked[below] + (at - below) * (ranked[min(below + 1, len(ranked) - 1)] - ranked[below])
        inner.append(min(max(round(value, 6), ends[0]), ends[1]))
    return sorted(set(ends) | set(inner))


def _dev_figures(point: dict) -> dict:
    return {k: point[k] for k in ("accuracy", "accuracy_ci", "escalation_rate", "latency_s", "cpu_s", "n")}


def choose_thresholds(points: list[dict]) -> dict:
    """The calibration of one dev sweep: target_only's dev figures and, per policy and target,
    the chosen threshold with the dev figures that justified it (threshold None when no grid
    point reaches an accuracy target)."""
    reference = next((p for p in points if p["policy"] == "target_only"), None)
    if reference is None:
        raise ValueError("calibration needs target_only in the dev sweep: accuracy targets are relative to it")
    choices = []
    for policy in dict.fromkeys(p["policy"] for p in points if p["threshold"] is not None):
        grid = [p for p in points if p["policy"] == policy]
        for below in ACCURACY_TARGETS:
            floor = reference["accuracy"] - below / 100
            reaching = [p for p in grid if p["accuracy"] >= floor - _EPS]
            best = min(reaching, key=lambda p: (p["escalation_rate"], p.get("target_tokens", 0), p["threshold"]),
                       default=None)
            choices.append({"policy": policy, "target": f"accuracy -{below} pt", "min_accuracy": floor,
                            "threshold": None if best is None else best["threshold"],
                            "dev": None if best is None else _dev_figures(best)})
        for rate in ESCALATION_TARGETS:
            best = min(grid, key=lambda p: (abs(p["escalation_rate"] - rate), p["threshold"]))
            choices.append({"policy": policy, "target": f"escalation {rate:.0%}", "escalation_target": rate,
                            "threshold": best["threshold"], "dev": _dev_figures(best)})
    return {"target_only": _dev_figures(reference), "choices": choices}


def thresholds_from(calibration: dict) -> tuple[list[str], dict[str, list[float]]]:
    """The policies and thresholds a test sweep runs for `calibration`: target_only, the policies
    without a threshold, and every chosen threshold, each once."""
    thresholds: dict[str, list[float]] = {}
    for choice in calibration["choices"]:
        if choice["threshold"] is not None:
            values = thresholds.setdefault(choice["policy"], [])
            if choice["threshold"] not in values:
                values.append(choice["threshold"])
    if not thresholds:
        raise ValueError("the calibration chose no threshold for any policy (no grid point reached a target)")
    untuned = calibration.get("untuned", [])
    return ["target_only", *untuned, *thresholds], {policy: sorted(values) for policy, values in thresholds.items()}


def load_calibration(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no calibration file at {path}: run `arbitrage-fast calibrate --out {path}` first")
    calibration = json.loads(path.read_text())
    missing = [k for k in ("settings", "choices", "split") if k not in calibration]
    if missing:
        raise ValueError(f"{path} is not a calibration file (lacks {missing})")
    return calibration
