"""Choosing thresholds on dev: grids of one density, the choice rules, the plan handed to test."""

import random

import pytest

from arbitrage_fast.eval.calibration import (
    GRID_POINTS, SCORE_RANGES, choose_thresholds, keep_all_threshold, load_calibration, quantile_grid,
    threshold_grid, thresholds_from)
from arbitrage_fast.policies import StepEvidence, make_policy


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


def test_a_quantile_grid_puts_each_policy_at_the_same_escalation_shares_of_its_draft_steps():
    rng = random.Random(0)
    # a PRM that scores nearly every step above 0.8, and a router spread over (0, 1)
    prm = [1 - rng.random() ** 4 * 0.2 for _ in range(400)] + [rng.random() * 0.5 for _ in range(20)]
    router = [rng.random() for _ in range(420)]
    for policy, scores in (("rsd", prm), ("arbitrage", router)):
        grid = quantile_grid(policy, scores, 6)
        assert grid[0] == 0.0 and grid[-1] == 1.0 and len(grid) == 6
        shares = [sum(s < t for s in scores) / len(scores) for t in grid[1:-1]]
        assert shares == pytest.approx([0.2, 0.4, 0.6, 0.8], abs=1 / len(scores) + 1e-9)
    # the even grid's four inner points all fall where this PRM escalates only its 20 clear slips
    assert all(sum(s < t for s in prm) <= 20 for t in threshold_grid("rsd", 6)[1:-1])
    assert quantile_grid("oracle", [-0.5, 0.0, 0.0, 0.0, 0.0, 0.25], 6) == [-1.0, 0.0, 1.0]  # tied scores merge
    with pytest.raises(ValueError, match="no scored draft steps"):
        quantile_grid("rsd", [], 6)
    with pytest.raises(ValueError, match="at least 2"):
        quantile_grid("rsd", prm, 1)
    with pytest.raises(ValueError, match="no threshold to calibrate"):
        quantile_grid("draft_only", prm, 6)


@pytest.mark.parametrize("name", ["rsd", "arbitrage", "oracle", "every_step", "specreason", "lookahead"])
@pytest.mark.parametrize("have_router", [False, True])
def test_the_keep_all_threshold_escalates_no_step_whatever_the_evidence(name, have_router):
    """The pilot runs each policy where it writes the draft's own answer: any score in its range
    keeps the step there, and the other end of the range escalates every step but the extreme."""
    rng = random.Random(name)
    policy = make_policy(name, have_router=have_router)
    lo, hi = SCORE_RANGES[policy.base_name]
    keep = make_policy(name, keep_all_threshold(policy), have_router=have_router)
    for _ in range(200):
        prm, router, judge = rng.random(), rng.random(), rng.random() * 10 if name == "specreason" else rng.random()
        evidence = StepEvidence(draft_prm=prm, target_prm=rng.random(), router_score=router, judge_score=judge)
        assert not keep.escalate(evidence)
        assert lo <= keep.score(evidence) <= hi
    other = make_policy(name, lo if keep.threshold == hi else hi, have_router=have_router)
    assert other.escalate(StepEvidence(draft_prm=0.5, target_prm=0.9, router_score=0.5, judge_score=0.5))


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
