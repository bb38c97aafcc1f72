"""Each preset's recommended thresholds: what `demo` shows and what `serve` applies to a request
that names no threshold."""
from __future__ import annotations

# On the testbed, the threshold the recorded calibration on dev problems chose for each policy at
# "within a point of target_only's accuracy" (benchmarks/results/testbed_calibration_shipped.json,
# for the shipped router and PRM). A preset with none of its own here takes its router head's:
# for Arbitrage the score that escalated ROUTER_ESCALATION_RATE of the head's validation steps,
# for RSD the PRM score below which as many of those steps fall (problems of the train split), so
# the two spend the same share of target steps.
PRESET_THRESHOLDS = {
    "testbed": {"rsd": 0.964984, "arbitrage": 0.27956},
}
ROUTER_ESCALATION_RATE = 0.3


def recommended_thresholds(preset) -> dict[str, float]:
    """Policy -> threshold: the preset's own, else its router head's validation threshold at
    ROUTER_ESCALATION_RATE; policies with neither are absent (their policy's default applies)."""
    chosen = dict(PRESET_THRESHOLDS.get(preset.name, {}))
    if preset.router:
        from arbitrage_fast.router.head import RouterHead

        for policy, rule in (("arbitrage", "router"), ("rsd", "prm")):
            recorded = RouterHead.validation_threshold(preset.router, ROUTER_ESCALATION_RATE, rule)
            if policy not in chosen and recorded is not None:
                chosen[policy] = recorded
    return chosen
