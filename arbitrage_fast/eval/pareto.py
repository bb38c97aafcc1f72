"""Accuracy-vs-latency curves: Pareto frontiers and plots.

The frontier keeps the points no other point of the same policy beats on both axes
(lower latency, higher accuracy). A frontier read on the problems it reports is
optimistic, so speed-ups at matched accuracy come only from thresholds chosen on dev
(`eval.calibration`, `sweep --thresholds-from`), never from reading these curves.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

Point = dict  # {"policy", "threshold", "accuracy", "latency_s", ...} as written by eval.sweep


def group_by_policy(points: list[Point]) -> dict[str, list[Point]]:
    """Points of each policy, in first-seen policy order."""
    groups: dict[str, list[Point]] = defaultdict(list)
    for p in points:
        groups[p["policy"]].append(p)
    return dict(groups)


def frontier(points: list[Point]) -> list[Point]:
    """Non-dominated points of one policy, sorted by increasing latency (and accuracy).

    Walking from fastest to slowest, a point is kept only if it is strictly more
    accurate than everything faster; ties in latency keep the more accurate one.
    """
    ordered = sorted(points, key=lambda p: (p["latency_s"], -p["accuracy"]))
    kept: list[Point] = []
    for p in ordered:
        if not kept or p["accuracy"] > kept[-1]["accuracy"]:
            kept.append(p)
    return kept


def pareto_frontiers(points: list[Point]) -> dict[str, list[Point]]:
    """Each policy's frontier, keyed by policy name."""
    return {policy: frontier(pts) for policy, pts in group_by_policy(points).items()}


def plot_pareto(points: list[Point], path_png: str | Path, title: str | None = None) -> Path:
    """Write an accuracy-vs-latency plot: every point faint, each policy's frontier as a line."""
    # A bare Figure on the Agg canvas: no display, and no change to pyplot's global backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for policy, pts in group_by_policy(points).items():
        front = frontier(pts)
        line, = ax.plot([p["latency_s"] for p in front], [p["accuracy"] for p in front],
                        marker="o", label=policy)
        ax.scatter([p["latency_s"] for p in pts], [p["accuracy"] for p in pts],
                   color=line.get_color(), alpha=0.3, s=14)
    ax.set_xlabel("latency per problem (s)")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    path = Path(path_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def save_points_json(points: list[Point], path: str | Path) -> Path:
    """Write sweep points as a JSON list (the input of `plot_pareto` and the speed-up readout)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(points, indent=2) + "\n")
    return path


def load_points_json(path: str | Path) -> list[Point]:
    return json.loads(Path(path).read_text())
