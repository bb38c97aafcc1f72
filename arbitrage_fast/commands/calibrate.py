"""`calibrate`: sweep each policy over an even threshold grid on dev and choose its thresholds."""
from __future__ import annotations

from .common import write_json
from .sweep import sweep_points


def run(preset, args) -> int:
    from arbitrage_fast.eval.calibration import choose_thresholds, threshold_grid
    from arbitrage_fast.eval.sweep import THRESHOLDLESS_POLICIES

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if "target_only" not in policies:
        policies.insert(0, "target_only")  # every accuracy target is relative to it
    # Policies without a threshold have nothing to choose: they run on dev beside the others
    # and go to test as they are, so every method gets its row in the reported table.
    untuned = [p for p in policies if p in THRESHOLDLESS_POLICIES and p != "target_only"]
    thresholds = {p: threshold_grid(p, args.grid_points) for p in policies if p not in THRESHOLDLESS_POLICIES}
    result = sweep_points(preset, args, "dev", policies, thresholds)
    calibration = {"split": "dev", "n": result["n"], "batch": result.get("batch", 1), "grid": thresholds,
                   "untuned": untuned,
                   "settings": {k: v for k, v in result["settings"].items() if k != "split"},
                   **choose_thresholds(result["points"]), "points": result["points"]}
    write_json(calibration, args.out)
    print(f"dev split, n = {result['n']}: target_only accuracy {calibration['target_only']['accuracy']:.3f}")
    for c in calibration["choices"]:
        if c["threshold"] is None:
            print(f"{c['policy']:12s} {c['target']:16s} no grid point reaches it")
        else:
            print(f"{c['policy']:12s} {c['target']:16s} threshold {c['threshold']:g}  dev accuracy "
                  f"{c['dev']['accuracy']:.3f}  escalation {c['dev']['escalation_rate']:.2f}")
    print(f"wrote {args.out}; report on test with: sweep --thresholds-from {args.out}")
    return 0
