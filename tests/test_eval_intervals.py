"""Wilson intervals and the paired bootstrap against hand-computed values and synthetic data."""

import math
import random

import pytest

from arbitrage_fast.eval.intervals import cluster_bootstrap, compare_to_baseline, paired_bootstrap, wilson_interval


def test_wilson_matches_the_hand_computed_interval():
    # 8 of 10, z = 1.96: centre (0.8 + 0.19207) / 1.38415 = 0.71674, half-width 0.22658.
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.49016, abs=1e-4) and high == pytest.approx(0.94330, abs=1e-4)
    # At 0/n the interval is [0, z^2 / (n + z^2)], not a point.
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(3.8415 / 13.8415, abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((1 - high, 1.0))
    for bad in ((1, 0), (-1, 5), (6, 5)):
        with pytest.raises(ValueError):
            wilson_interval(*bad)


def test_wilson_narrows_with_n():
    widths = [wilson_interval(n // 2, n) for n in (10, 100, 1000)]
    assert [h - l for l, h in widths] == sorted((h - l for l, h in widths), reverse=True)


def test_bootstrap_recovers_a_known_speedup():
    rng = random.Random(1)
    ours = [rng.uniform(1.0, 2.0) for _ in range(300)]
    baseline = [3.0 * t for t in ours]
    estimate, low, high = paired_bootstrap(ours, baseline, "speedup")
    assert estimate == pytest.approx(3.0) and low == pytest.approx(3.0) and high == pytest.approx(3.0)

    noisy = [2.0 * t * rng.uniform(0.8, 1.2) for t in ours]
    estimate, low, high = paired_bootstrap(ours, noisy, "speedup")
    assert low < estimate < high and low < 2.0 < high and high - low < 0.1
    assert paired_bootstrap(ours, noisy, "speedup") == (estimate, low, high)  # seeded


def test_pairing_makes_the_interval_tighter_than_ignoring_it():
    # Problems vary 10x in length; the policy is 2x faster on each. Paired, the ratio is exact.
    rng = random.Random(2)
    ours = [rng.uniform(0.1, 1.0) for _ in range(100)]
    _, low, high = paired_bootstrap(ours, [2 * t for t in ours], "speedup")
    assert high - low < 1e-9


def _records(correct, latencies):
    return [{"item": f"p{i}", "correct": c, "latency_s": t, "cpu_s": 2 * t}
            for i, (c, t) in enumerate(zip(correct, latencies))]


def test_a_clear_accuracy_loss_is_flagged_not_matched():
    n = 200
    baseline = _records([True] * n, [1.0] * n)
    worse = _records([i >= 30 for i in range(n)], [0.25] * n)  # 30 of 200 lost
    out = compare_to_baseline(worse, baseline)
    assert out["accuracy_diff"] == pytest.approx(-0.15)
    assert out["accuracy_diff_ci"][1] < 0 and out["matched"] is False
    assert out["speedup"] == pytest.approx(4.0) and out["cpu_speedup"] == pytest.approx(4.0)


def test_a_one_problem_difference_is_matched():
    n = 200
    baseline = _records([i % 5 != 0 for i in range(n)], [1.0] * n)
    one_off = _records([i % 5 != 0 or i == 0 for i in range(n)], [0.5] * n)
    out = compare_to_baseline(one_off, baseline)
    low, high = out["accuracy_diff_ci"]
    assert out["accuracy_diff"] == pytest.approx(1 / n) and low <= 0 <= high and out["matched"] is True
    same = compare_to_baseline(baseline, baseline)
    assert same["accuracy_diff_ci"] == [0.0, 0.0] and same["matched"] is True and same["speedup"] == 1.0


def test_pairs_must_be_the_same_problems_and_bad_input_is_named():
    a = _records([True, False], [1.0, 1.0])
    with pytest.raises(ValueError, match="same problems"):
        compare_to_baseline(a, list(reversed(a)))
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_bootstrap([1.0], [1.0, 2.0], "speedup")
    with pytest.raises(ValueError, match="unknown statistic"):
        paired_bootstrap([1.0], [1.0], "mean")
    with pytest.raises(ValueError, match="positive latencies"):
        paired_bootstrap([0.0, 1.0], [1.0, 1.0], "speedup")
    zero_cpu = [dict(r, cpu_s=0.0) for r in a]
    assert compare_to_baseline(zero_cpu, a)["cpu_speedup"] is None
    assert not math.isnan(compare_to_baseline(a, a)["speedup"])


def test_cluster_bootstrap_resamples_whole_groups():
    import numpy as np

    # 30 problems of 5 steps: the value is the problem's, so steps inside a problem are copies.
    # Resampling steps would pretend 150 independent values and give a far narrower interval.
    values = np.repeat(np.arange(30, dtype=float), 5)
    groups = np.repeat(np.arange(30), 5)
    low, high = cluster_bootstrap(lambda i: values[i].mean(), groups)
    assert low < 14.5 < high and high - low > 5  # the mean of 0..29 is 14.5, with 30 draws' spread
    assert (low, high) == cluster_bootstrap(lambda i: values[i].mean(), groups)  # seeded
    # A resample where the statistic is undefined is drawn again, not counted.
    small = np.array([0, 0, 1, 1])

    def needs_two_groups(i):
        if len(set(small[i].tolist())) < 2:
            raise ValueError("one group")
        return float(small[i].mean())
    assert cluster_bootstrap(needs_two_groups, small, resamples=50) == (0.5, 0.5)
    with pytest.raises(ValueError, match="at least 2 groups"):
        cluster_bootstrap(lambda i: 0.0, [3, 3, 3])


def test_block_timings_are_compared_block_by_block():
    """Problems timed together in blocks: the speed-up is the ratio of summed times (as per
    problem), its interval resamples blocks, one block gives no interval, and two runs over
    different blocks cannot be paired."""
    from arbitrage_fast.eval.intervals import compare_to_baseline, paired_bootstrap

    def run(latencies, blocks):
        return [{"item": f"p{i}", "correct": True, "latency_s": t, "cpu_s": t / 2, "block": b}
                for i, (t, b) in enumerate(zip(latencies, blocks))]

    blocks = [["p0", "p1"], ["p0", "p1"], ["p2", "p3"], ["p2", "p3"], ["p4"]]
    ours, base = run([1, 1, 2, 2, 5], blocks), run([3, 3, 4, 4, 6], blocks)
    out = compare_to_baseline(ours, base)
    assert out["speedup"] == pytest.approx(20 / 11)
    _, low, high = paired_bootstrap([2, 4, 5], [6, 8, 6], "speedup")
    assert out["speedup_ci"] == [low, high] and out["cpu_speedup_ci"] == [low, high]
    assert out["speedup_ci"] != list(paired_bootstrap([1, 1, 2, 2, 5], [3, 3, 4, 4, 6], "speedup")[1:])
    one = [["p0", "p1"]] * 2
    single = compare_to_baseline(run([1, 2], one), run([2, 2], one))
    assert single["speedup"] == pytest.approx(4 / 3) and single["speedup_ci"] is None
    with pytest.raises(ValueError, match="same blocks"):
        compare_to_baseline(ours, run([3, 3, 4, 4, 6], [["p0"], ["p1", "p2"], ["p1", "p2"], ["p3", "p4"], ["p3", "p4"]]))
    with pytest.raises(ValueError, match="same blocks"):
        compare_to_baseline(ours, [{k: v for k, v in r.items() if k != "block"} for r in base])
