"""`calibrate`: sweep each policy over a threshold grid on dev and choose its thresholds."""
from __future__ import annotations

import json
from pathlib import Path

from .common import write_json
from .sweep import sweep_engine, sweep_points


def _quantile_grids(engine, preset, args, policies: list[str]) -> tuple[dict[str, list[float]], dict]:
    """Each policy's grid at the quantiles of its draft-step scores on --grid-pilot train problems,
    and what the pilot saw (recorded in the calibration). With --records the grids are kept
    beside the records and a resumed calibration reads them back: a batched pilot's scores may
    move in their last bits with the batch's make-up, and the records refuse another plan."""
    kept = Path(f"{args.records}.grid.json") if args.records else None
    wanted = {"policies": policies, "points": args.grid_points, "pilot_n": args.grid_pilot}
    if kept is not None and kept.is_file():
        saved = json.loads(kept.read_text())
        if saved["wanted"] != wanted:
            raise ValueError(f"{kept} holds quantile grids made for {saved['wanted']}, not {wanted}: "
                             "pass a new --records path")
        return saved["grids"], saved["pilot"]
    grids, pilot = _pilot_grids(engine, preset, args, policies)
    if kept is not None:
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_text(json.dumps({"wanted": wanted, "grids": grids, "pilot": pilot}, indent=1) + "\n")
    return grids, pilot


def _pilot_grids(engine, preset, args, policies: list[str]) -> tuple[dict[str, list[float]], dict]:
    from arbitrage_fast.config import SamplingParams
    from arbitrage_fast.eval.calibration import quantile_grid
    from arbitrage_fast.eval.datasets import load_dataset
    from arbitrage_fast.eval.score_pilot import pilot_scores

    items = load_dataset(args.dataset or preset.dataset, n=args.grid_pilot, split="train", seed=args.seed,
                         instruction=preset.instruction)
    scores = pilot_scores(engine, items, policies, SamplingParams(max_new_tokens=args.max_new_tokens),
                          {"chat": preset.chat}, max(args.batch, 1))
    grids = {p: quantile_grid(p, scores[p], args.grid_points) for p in policies}
    return grids, {"split": "train", "n": len(items), "steps": {p: len(scores[p]) for p in policies}}


def run(preset, args) -> int:
    from arbitrage_fast.eval.calibration import choose_thresholds, threshold_grid
    from arbitrage_fast.eval.sweep import THRESHOLDLESS_POLICIES

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if "target_only" not in policies:
        policies.insert(0, "target_only")  # every accuracy target is relative to it
    # Policies without a threshold have nothing to choose: they run on dev beside the others
    # and go to test as they are, so every method gets its row in the reported table.
    untuned = [p for p in policies if p in THRESHOLDLESS_POLICIES and p != "target_only"]
    tuned = [p for p in policies if p not in THRESHOLDLESS_POLICIES]
    engine, pilot = None, None
    if args.grid == "quantile":
        engine = sweep_engine(preset, args, policies)
        thresholds, pilot = _quantile_grids(engine, preset, args, tuned)
    else:
        thresholds = {p: threshold_grid(p, args.grid_points) for p in tuned}
    result = sweep_points(preset, args, "dev", policies, thresholds, engine=engine)
    calibration = {"split": "dev", "n": result["n"], "batch": result.get("batch", 1), "grid": thresholds,
                   "grid_kind": args.grid, **({"grid_pilot": pilot} if pilot else {}), "untuned": untuned,
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
