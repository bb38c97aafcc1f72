"""Choosing thresholds on dev: grids of one density, the choice rules, the plan handed to test."""

import pytest

from arbitrage_fast.eval.calibration import (
    GRID_POINTS, choose_thresholds, load_calibration, threshold_grid, thresholds_from)


def point(policy, threshold, accuracy, escalation, latency=1.0):
    return {"policy": policy, "threshold": threshold, "accuracy": accuracy, "accuracy_ci": [0.0, 1.0],
            "escalation_rate": escalation, "latency_s": latency, "cpu_s": 2 * latency, "n": 100}


def test_every_policy_gets_a_grid_of_the_same_density_over_its_range():
    grids = {p: threshold_grid(p) for p in ("rsd", "arbitrage", "oracle", "every_step", "lookahead")}
    assert {len(g) for g in grids.values()} == {GRID_POINTS}
    assert grids["rsd"][:3] == [0.0, 0.05, 0.1] and grids["rsd"][-1] == 1.0
    assert grids["oracle"][0] == -1.0 and grids["oracle"][-1] == 1.0
    assert grids["lookahead"] == grids["rsd"]  # both threshold the target likelihood of a draft step
    with pytest.raises(ValueError, match="no threshold to calibrate"):
        threshold_grid("target_only")
    with pytest.raises(ValueError, match="at least 2"):
        threshold_grid("rsd", 1)


DEV = [
    point("target_only", None, 0.80, 0.0, latency=4.0),
    # rsd: higher threshold, more escalations, more accuracy
    point("rsd", 0.2, 0.70, 0.05), point("rsd", 0.5, 0.785, 0.12), point("rsd", 0.8, 0.80, 0.31),
    point("arbitrage", 0.9, 0.75, 0.02), point("arbitrage", 0.5, 0.79, 0.08), point("arbitrage", 0.1, 0.81, 0.21),
]


def test_accuracy_targets_take_the_fewest_escalations_that_reach_the_floor():
    cal = choose_thresholds(DEV)
    assert cal["target_only"]["accuracy"] == 0.80
    chosen = {(c["policy"], c["target"]): c["threshold"] for c in cal["choices"]}
    assert chosen[("rsd", "accuracy -0 pt")] == 0.8
    assert chosen[("rsd", "accuracy -1 pt")] == 0.8  # 0.785 < 0.79
    assert chosen[("rsd", "accuracy -2 pt")] == 0.5
    assert chosen[("arbitrage", "accuracy -0 pt")] == 0.1
    assert chosen[("arbitrage", "accuracy -1 pt")] == 0.5
    assert chosen[("rsd", "escalation 10%")] == 0.5 and chosen[("rsd", "escalation 30%")] == 0.8
    assert chosen[("arbitrage", "escalation 20%")] == 0.1
    rsd_0 = next(c for c in cal["choices"] if c["target"] == "accuracy -0 pt" and c["policy"] == "rsd")
    assert rsd_0["dev"]["accuracy"] == 0.80 and rsd_0["dev"]["escalation_rate"] == 0.31  # what justified it


def test_an_unreachable_target_chooses_nothing_and_test_runs_each_threshold_once():
    dev = [point("target_only", None, 0.9, 0.0), point("rsd", 0.2, 0.5, 0.1), point("rsd", 0.6, 0.6, 0.3)]
    cal = choose_thresholds(dev)
    accuracy = [c for c in cal["choices"] if c["target"].startswith("accuracy")]
    assert all(c["threshold"] is None and c["dev"] is None for c in accuracy)
    assert thresholds_from(cal) == (["target_only", "rsd"], {"rsd": [0.2, 0.6]})
    with pytest.raises(ValueError, match="target_only"):
        choose_thresholds(dev[1:])
    with pytest.raises(ValueError, match="chose no threshold"):
        thresholds_from({"choices": accuracy})


def test_a_calibration_file_is_checked(tmp_path):
    with pytest.raises(ValueError, match="run `arbitrage-fast calibrate"):
        load_calibration(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{\"points\": []}")
    with pytest.raises(ValueError, match="not a calibration file"):
        load_calibration(bad)


def test_ties_go_to_fewer_target_tokens_then_the_lower_threshold_never_to_latency():
    tied = [point("target_only", None, 0.8, 0.0),
            point("rsd", 0.4, 0.8, 0.2, latency=9.0), point("rsd", 0.6, 0.8, 0.2, latency=1.0),
            point("rsd", 0.8, 0.8, 0.2, latency=0.5)]
    tied[3]["target_tokens"] = 50.0
    for p in tied[1:3]:
        p["target_tokens"] = 40.0
    chosen = {c["target"]: c["threshold"] for c in choose_thresholds(tied)["choices"]}
    assert chosen["accuracy -0 pt"] == 0.4  # 0.8 has more target tokens; 0.4 and 0.6 tie: the lower
