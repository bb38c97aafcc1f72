"""Pareto frontiers and the plot/JSON outputs."""

from arbitrage_fast.eval import (
    frontier,
    load_points_json,
    pareto_frontiers,
    plot_pareto,
    save_points_json,
)


def pt(policy, threshold, accuracy, latency_s):
    return {"policy": policy, "threshold": threshold, "accuracy": accuracy, "latency_s": latency_s, "n": 10}


POINTS = [
    pt("target_only", None, 0.80, 10.0),
    pt("draft_only", None, 0.50, 2.0),
    pt("rsd", 0.9, 0.78, 8.0),
    pt("rsd", 0.7, 0.70, 6.0),
    pt("rsd", 0.5, 0.60, 5.0),
    pt("rsd", 0.3, 0.55, 5.5),  # dominated: slower and less accurate than rsd@0.5
    pt("router", 0.9, 0.80, 5.0),
    pt("router", 0.5, 0.72, 4.0),
    pt("router", 0.1, 0.72, 3.0),  # same accuracy, faster: dominates router@0.5
]


def test_frontier_drops_dominated_points_and_sorts_by_latency():
    fronts = pareto_frontiers(POINTS)
    assert list(fronts) == ["target_only", "draft_only", "rsd", "router"]
    assert [p["threshold"] for p in fronts["rsd"]] == [0.5, 0.7, 0.9]
    assert [p["threshold"] for p in fronts["router"]] == [0.1, 0.9]
    assert fronts["target_only"] == [POINTS[0]]


def test_frontier_tie_in_latency_keeps_the_more_accurate():
    a, b = pt("x", 1, 0.4, 1.0), pt("x", 2, 0.6, 1.0)
    assert frontier([a, b]) == [b]


def test_plot_and_json_roundtrip(tmp_path):
    png = plot_pareto(POINTS, tmp_path / "plots" / "pareto.png", title="tiny")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    path = save_points_json(POINTS, tmp_path / "points.json")
    assert load_points_json(path) == POINTS
