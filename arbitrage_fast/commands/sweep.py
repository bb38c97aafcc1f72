"""`sweep`: every policy over a threshold grid on the same problems -> points, speed-ups, plot."""
from __future__ import annotations

from arbitrage_fast.config import SamplingParams

from arbitrage_fast.prm.build import build_prm

from .common import build_engine, decoding_options, quant_info, write_json

DEFAULT_THRESHOLDS = {
    "rsd": [0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 1.01],
    "arbitrage": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
    "oracle": [0.0],
    "every_step": [0.5],
    "specreason": [3.0, 5.0, 6.0, 7.0, 8.0, 9.0],  # the judge's expected digit; SpecReason's default is 7
}


def parse_thresholds(spec: str | None, policies: list[str]) -> dict[str, list[float]]:
    """"rsd=0.5,0.7;arbitrage=0.3" -> {"rsd": [0.5, 0.7], "arbitrage": [0.3]}; defaults elsewhere."""
    out = {p: DEFAULT_THRESHOLDS[p] for p in policies if p in DEFAULT_THRESHOLDS}
    for part in filter(None, (spec or "").split(";")):
        name, _, values = part.partition("=")
        try:
            out[name.strip()] = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"bad --thresholds entry {part!r}; expected POLICY=V1,V2,...") from None
    return out


def matched_speedups(points: list[dict], policies: list[str], tolerance: float = 0.01) -> dict:
    """Latency ratios read off the curves at the target-only accuracy (minus tolerance)."""
    from arbitrage_fast.eval.pareto import speedup_at_matched_accuracy

    ref = next((p for p in points if p["policy"] == "target_only"), None)
    if ref is None:
        return {}
    out = {"reference_accuracy": ref["accuracy"], "tolerance": tolerance}
    for policy in policies:
        if policy == "target_only":
            continue
        out[policy] = {
            base: speedup_at_matched_accuracy(points, policy, base, ref["accuracy"], tolerance)
            for base in ("target_only", "rsd") if base != policy and any(p["policy"] == base for p in points)
        }
    return out


def run(preset, args) -> int:
    from arbitrage_fast.eval.datasets import load_dataset
    from arbitrage_fast.eval.pareto import plot_pareto
    from arbitrage_fast.eval.sweep import points_from_records, run_sweep

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    thresholds = parse_thresholds(args.thresholds, policies)
    if args.report_only and not args.records:
        raise ValueError("--report-only summarises a --records file: pass --records too")
    items = load_dataset(args.dataset or preset.dataset, n=args.n, split="test", seed=args.seed,
                         instruction=preset.instruction)
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens)
    audit = build_prm(preset.label_prm)
    # What a records file must agree on to be resumed: everything that changes an answer.
    run_info = {"preset": preset.name, "draft": preset.draft, "target": preset.target, "router": preset.router,
                "inference_prm": str(preset.prm), "audit_prm": str(preset.label_prm),
                "dataset": args.dataset or preset.dataset, "seed": args.seed,
                "max_new_tokens": args.max_new_tokens, "dtype": args.dtype or preset.dtype,
                "instruction": preset.instruction, **quant_info(args)}
    if args.spec_k:  # changes latency, not greedy answers; absent means 0, so older files still resume
        run_info["spec_k"] = args.spec_k
    planned = len(items)
    if args.report_only:
        points, items = points_from_records(items, policies, thresholds, args.records, run_info,
                                            audited=audit is not None)
    else:
        engine = build_engine(preset, args.device, args.dtype, **decoding_options(args))
        points = run_sweep(engine, items, policies, thresholds, sampling=sampling, audit_prm=audit,
                           generate_kwargs={"chat": preset.chat}, records=args.records, run_info=run_info)
    result = {
        "preset": preset.name, "dataset": args.dataset or preset.dataset, "n": len(items),
        "inference_prm": preset.prm or "target-likelihood", "audit_prm": preset.label_prm, "spec_k": args.spec_k,
        "points": points, "speedups": matched_speedups(points, policies),
    }
    if len(items) < planned:  # a report of a sweep not yet finished
        result["n_planned"] = planned
    write_json(result, args.json)
    if args.plot:
        of = f" of {planned} so far" if len(items) < planned else ""
        plot_pareto(points, args.plot, title=f"{preset.name}: accuracy vs latency (n={len(items)}{of})")
    if len(items) < planned:
        print(f"report of the {len(items)} of {planned} problems solved under every policy so far")
    for p in points:
        t = "" if p["threshold"] is None else f"@{p['threshold']:g}"
        print(f"{p['policy'] + t:18s} acc {p['accuracy']:.3f}  latency {p['latency_s'] * 1000:8.1f} ms  "
              f"escalation {p['escalation_rate']:.2f}  target tokens {p['target_tokens']:.1f}")
    print("speed-ups at matched accuracy:", result["speedups"])
    return 0
