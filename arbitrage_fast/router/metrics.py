"""Router quality: ranking agreement with the oracle advantage, and how well it defers.

Implemented on ranks directly (ties averaged) so they need no ML library; tests check them
against scipy.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def spearman(x, y) -> float:
    """Spearman rank correlation; 0.0 when either side is constant (no ranking to agree with)."""
    rx, ry = rankdata(np.asarray(x, dtype=float)), rankdata(np.asarray(y, dtype=float))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx ** 2).sum() * (ry ** 2).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else 0.0


def auroc(labels, scores) -> float:
    """P(score of a random positive > score of a random negative), ties counting one half."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=float)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs both positive and negative labels")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _gain_of_top(adv: np.ndarray, order: np.ndarray, k: int, total: float) -> float:
    """Share of `total` (the positive advantage) that escalating the first k steps of `order` captures."""
    return float(adv[order[:k]].sum() / total) if total > 0 else 0.0


def deferral_curve(advantage, scores, rates=(0.1, 0.2, 0.3, 0.4, 0.5), draft_prm=None) -> list[dict]:
    """For each escalation rate, the share of the total positive advantage the router captures
    by escalating its top-scored steps, next to what the oracle and a random choice capture,
    and the threshold that escalates that share (escalate when score > threshold).

    Given the PRM's scores of the draft steps, each point also holds RSD's rule at the same rate:
    escalating the lowest-scored steps (escalate when draft_prm < prm_threshold) and the share it
    captures (prm_gain). Both rules then spend the same number of target steps, so their gains
    compare the evidence each escalates on, with the PRM the labels came from."""
    adv = np.asarray(advantage, dtype=float)
    scores = np.asarray(scores, dtype=float)
    gain = np.clip(adv, 0, None)
    total = gain.sum()
    order_router, order_oracle = np.argsort(-scores, kind="stable"), np.argsort(-adv, kind="stable")
    prm = None if draft_prm is None else np.asarray(draft_prm, dtype=float)
    if prm is not None and prm.shape != adv.shape:
        raise ValueError(f"draft_prm has {prm.shape[0]} steps, the advantages {adv.shape[0]}")
    order_prm = None if prm is None else np.argsort(prm, kind="stable")
    out = []
    for r in rates:
        k = int(round(r * len(adv)))
        point = {
            "rate": r,
            "threshold": float(scores[order_router[k]]) if k < len(adv) else None,
            "router_gain": _gain_of_top(adv, order_router, k, total),
            "oracle_gain": _gain_of_top(gain, order_oracle, k, total),
            "random_gain": float(r * adv.sum() / total) if total > 0 else 0.0,
        }
        if order_prm is not None:
            point["prm_threshold"] = float(prm[order_prm[k]]) if k < len(adv) else None
            point["prm_gain"] = _gain_of_top(adv, order_prm, k, total)
        out.append(point)
    return out
