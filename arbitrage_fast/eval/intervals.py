"""95% intervals for sweep figures: Wilson for an accuracy, paired bootstrap against a baseline.

Two policies of one sweep solve the same problems, so their difference is measured per
problem: the bootstrap resamples *problems* (the same draw for both policies), which keeps
the pairing and is far tighter than comparing two independent intervals. The seed is fixed
so a report regenerated from the same records prints the same bounds.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

LEVEL = 0.95
Z_95 = 1.959963984540054  # the standard normal's 97.5th percentile
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def wilson_interval(correct: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for `correct` successes of `n`.

    Unlike p ± z·sqrt(p(1-p)/n) it stays inside [0, 1] and does not collapse to a point at
    0/n or n/n, which is exactly where matched-accuracy comparisons tend to sit.
    """
    if n <= 0:
        raise ValueError(f"an accuracy interval needs n >= 1 problems, got {n}")
    if not 0 <= correct <= n:
        raise ValueError(f"correct must lie in [0, n={n}], got {correct}")
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def cluster_bootstrap(statistic, groups: Sequence[int], resamples: int = BOOTSTRAP_RESAMPLES,
                      seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """95% percentile interval of `statistic(index)` when whole groups are resampled: the
    steps of one problem are not independent, so a step-level metric (a router's AUROC over
    steps) resamples problems. `statistic` takes an array of row indices; a resample on which
    it is undefined (ValueError, e.g. one class only) is drawn again."""
    groups = np.asarray(groups)
    ids = np.unique(groups)
    if len(ids) < 2:
        raise ValueError(f"a cluster bootstrap needs at least 2 groups, got {len(ids)}")
    rows = {g: np.flatnonzero(groups == g) for g in ids}
    rng = np.random.default_rng(seed)
    samples: list[float] = []
    attempts = 0
    while len(samples) < resamples:
        attempts += 1
        if attempts > 10 * resamples:
            raise ValueError("the statistic is undefined on almost every resample")
        index = np.concatenate([rows[g] for g in rng.choice(ids, size=len(ids))])
        try:
            samples.append(float(statistic(index)))
        except ValueError:
            continue
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def paired_bootstrap(ours: Sequence[float], baseline: Sequence[float], statistic: str,
                     resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """(estimate, low, high) of a paired statistic over problems, percentile bootstrap at 95%.

    `ours[i]` and `baseline[i]` are the same problem under two policies.
    statistic "speedup": sum(baseline) / sum(ours), e.g. of latencies (above 1: ours is faster).
    statistic "difference": mean(ours - baseline), e.g. of 0/1 correctness.
    """
    a, b = np.asarray(ours, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"paired samples need two equal, non-empty 1-D lists (got {a.shape} and {b.shape})")
    if statistic not in ("speedup", "difference"):
        raise ValueError(f"unknown statistic {statistic!r}; expected 'speedup' or 'difference'")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    draws = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
    if statistic == "speedup":
        if (a <= 0).any():
            raise ValueError("a speed-up needs positive latencies for every problem")
        estimate = b.sum() / a.sum()
        samples = b[draws].sum(axis=1) / a[draws].sum(axis=1)
    else:
        estimate = float((a - b).mean())
        samples = (a - b)[draws].mean(axis=1)
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(estimate), float(low), float(high)


def compare_to_baseline(ours: list[dict], baseline: list[dict]) -> dict:
    """Accuracy difference and speed-up of one point against the baseline's, paired by problem.

    `ours` and `baseline` are the per-problem records (dicts with correct, latency_s, cpu_s)
    in the same problem order. "matched" means the accuracy difference is not significant at
    95%: its interval contains 0.
    """
    if [r["item"] for r in ours] != [r["item"] for r in baseline]:
        raise ValueError("a paired comparison needs both policies' records over the same problems in one order")
    diff, diff_lo, diff_hi = paired_bootstrap([float(r["correct"]) for r in ours],
                                              [float(r["correct"]) for r in baseline], "difference")
    out = {"accuracy_diff": diff, "accuracy_diff_ci": [diff_lo, diff_hi], "matched": diff_lo <= 0 <= diff_hi}
    blocks = _blocks(ours, baseline)
    for key, name in (("latency_s", "speedup"), ("cpu_s", "cpu_speedup")):
        # a timer too coarse to see a run, or a time not measured per run (a batched sweep's CPU
        # time): no ratio to give
        if any(r[key] is None or r[key] <= 0 for r in (*ours, *baseline)):
            out[name], out[f"{name}_ci"] = None, None
            continue
        a, b = [r[key] for r in ours], [r[key] for r in baseline]
        if blocks is not None:  # problems timed together: the block is the unit resampled
            a, b = _block_sums(a, blocks), _block_sums(b, blocks)
        value, low, high = paired_bootstrap(a, b, "speedup")
        # one block is one measurement: a ratio, but no interval
        out[name], out[f"{name}_ci"] = value, ([low, high] if len(a) > 1 else None)
    return out


def _blocks(ours: list[dict], baseline: list[dict]) -> list[int] | None:
    """Each record's block number when the two runs were timed in blocks (`run_sweep(block=)`),
    which must then be the same blocks; None when every problem was timed alone."""
    keys = [tuple(r["block"]) if r.get("block") else None for r in (*ours, *baseline)]
    if not any(keys):
        return None
    if not all(keys) or keys[:len(ours)] != keys[len(ours):]:
        raise ValueError("a paired comparison of block timings needs both policies timed over the same blocks")
    number = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    return [number[key] for key in keys[:len(ours)]]


def _block_sums(values: Sequence[float], blocks: list[int]) -> list[float]:
    sums = [0.0] * (max(blocks) + 1)
    for value, block in zip(values, blocks):
        sums[block] += value
    return sums
