"""Pareto frontiers, speed-up at matched accuracy, and the plot/JSON outputs."""

import pytest

from arbitrage_fast.eval import (
    frontier,
    load_points_json,
    pareto_frontiers,
    plot_pareto,
    save_points_json,
    speedup_at_matched_accuracy,
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


def test_speedup_at_matched_accuracy():
    # Router reaches 0.80 at 5 s; target only at 10 s.
    assert speedup_at_matched_accuracy(POINTS, "router", "target_only", 0.80) == pytest.approx(2.0)
    # Tolerance admits rsd@0.9 (0.78 >= 0.79 - 0.01).
    assert speedup_at_matched_accuracy(POINTS, "rsd", "target_only", 0.79) == pytest.approx(10 / 8)
    # At 0.70 the fastest router point is 3 s, the fastest rsd point 6 s.
    assert speedup_at_matched_accuracy(POINTS, "router", "rsd", 0.70) == pytest.approx(2.0)


def test_a_point_exactly_one_tolerance_below_counts_despite_float_rounding():
    # 6/100 >= 7/100 - 0.01 is False in floating point; the rule means it to be True.
    assert not 6 / 100 >= 7 / 100 - 0.01
    points = [pt("target_only", None, 7 / 100, 10.0), pt("router", 0.5, 6 / 100, 4.0)]
    assert speedup_at_matched_accuracy(points, "router", "target_only", 7 / 100) == pytest.approx(2.5)
    # ... but nothing further below does.
    points.append(pt("rsd", 0.5, 5 / 100, 1.0))
    assert speedup_at_matched_accuracy(points, "rsd", "target_only", 7 / 100) is None


def test_speedup_is_none_when_unreachable():
    assert speedup_at_matched_accuracy(POINTS, "rsd", "target_only", 0.80, tolerance=0.0) is None
    assert speedup_at_matched_accuracy(POINTS, "router", "target_only", 0.95) is None
    assert speedup_at_matched_accuracy(POINTS, "missing", "target_only", 0.5) is None


def test_plot_and_json_roundtrip(tmp_path):
    png = plot_pareto(POINTS, tmp_path / "plots" / "pareto.png", title="tiny")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    path = save_points_json(POINTS, tmp_path / "points.json")
    assert load_points_json(path) == POINTS
