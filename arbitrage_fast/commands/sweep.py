"""`sweep`: every policy over a threshold grid (or the thresholds a calibration chose) on the same
problems -> points with intervals, the matched-accuracy table of a calibration, plot."""
from __future__ import annotations

from arbitrage_fast.config import SamplingParams
from arbitrage_fast.policies import DEFAULT_LOOKAHEAD_K, may_read_router

from arbitrage_fast.prm.build import build_prm

from .common import build_engine, decoding_options, quant_info, write_json

DEFAULT_THRESHOLDS = {
    "rsd": [0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 1.01],
    "arbitrage": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
    "oracle": [0.0],
    "every_step": [0.5],
    "specreason": [3.0, 5.0, 6.0, 7.0, 8.0, 9.0],  # the judge's expected digit; SpecReason's default is 7
    "lookahead": [0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 1.01],  # the target likelihood, RSD's score
}


def parse_thresholds(spec: str | None, policies: list[str]) -> dict[str, list[float]]:
    """"rsd=0.5,0.7;arbitrage=0.3" -> {"rsd": [0.5, 0.7], "arbitrage": [0.3]}; defaults elsewhere."""
    base = {p: p.partition(":")[0] for p in policies}  # "rsd:exact" sweeps rsd's grid
    out = {p: DEFAULT_THRESHOLDS[base[p]] for p in policies if base[p] in DEFAULT_THRESHOLDS}
    for part in filter(None, (spec or "").split(";")):
        name, _, values = part.partition("=")
        try:
            out[name.strip()] = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"bad --thresholds entry {part!r}; expected POLICY=V1,V2,...") from None
    return out


def sweep_settings(preset, args) -> dict:
    """Everything that changes an answer or a latency, bar the split and the plan: a records file,
    and a calibration carried from dev to test, must agree on all of it."""
    settings = {"preset": preset.name, "draft": preset.draft, "target": preset.target, "router": preset.router,
                "inference_prm": str(preset.prm), "audit_prm": str(preset.audit_prm),
                "dataset": args.dataset or preset.dataset, "seed": args.seed,
                "max_new_tokens": args.max_new_tokens, "dtype": args.dtype or preset.dtype,
                "instruction": preset.instruction, **quant_info(args)}
    heads = {"arbitrage": preset.router, **{f"arbitrage:{k}": v for k, v in preset.routers.items()}}
    if any(heads.values()):  # the heads' weights, so a head retrained in place between dev and test is caught
        from arbitrage_fast.router.head import RouterHead

        settings["router_heads"] = {name: RouterHead.digest(path) for name, path in heads.items() if path}
    if args.spec_k:  # changes latency, not greedy answers; absent means 0, so older files still resume
        settings["spec_k"] = args.spec_k
    lookahead_k = getattr(args, "lookahead_k", None)
    if lookahead_k not in (None, DEFAULT_LOOKAHEAD_K):  # changes lookahead's answers; absent means the default
        settings["lookahead_k"] = lookahead_k
    return settings


def sweep_engine(preset, args, policies: list[str]):
    """The engine a sweep (or calibration) of `policies` with these arguments runs on: room for its
    runs in flight, and the preset's router heads only if a policy reads one (so a draft swapped
    for one the heads do not fit still runs the policies that never consult them)."""
    in_flight = max(args.batch, getattr(args, "block", 1))
    return build_engine(preset, args.device, args.dtype, max_batch=in_flight if in_flight > 1 else None,
                        router=any(may_read_router(p) for p in policies), **decoding_options(args))


def sweep_points(preset, args, split: str, policies: list[str], thresholds: dict[str, list[float]],
                 report_only: bool = False, runs_out: dict | None = None, engine=None) -> dict:
    """Run (or, `report_only`, read back from --records) one sweep of `split`; returns its result
    dict. `engine`: one already built for these arguments (`sweep_engine`), else one is built."""
    from arbitrage_fast.eval.datasets import load_dataset
    from arbitrage_fast.eval.sweep import points_from_records, run_sweep

    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1 run in flight, got {args.batch}")
    block = getattr(args, "block", 1)  # `calibrate` chooses on accuracy: it has no timed blocks
    if block > 1 and args.batch > 1:
        raise ValueError("--batch (runs in flight, untimed) and --block (problems timed together) are two ways "
                         "to batch a sweep: pass one")
    if report_only and not args.records:
        raise ValueError("--report-only summarises a --records file: pass --records too")
    items = load_dataset(args.dataset or preset.dataset, n=args.n, split=split, seed=args.seed,
                         instruction=preset.instruction)
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens)
    audit = build_prm(preset.audit_prm)
    run_info = {**sweep_settings(preset, args), "split": split}
    planned = len(items)
    if report_only:
        points, items = points_from_records(items, policies, thresholds, args.records, run_info,
                                            audited=audit is not None, runs_out=runs_out, batch=args.batch,
                                            block=block)
    else:
        engine = engine or sweep_engine(preset, args, policies)
        points = run_sweep(engine, items, policies, thresholds, sampling=sampling, audit_prm=audit,
                           generate_kwargs={"chat": preset.chat}, records=args.records, run_info=run_info,
                           runs_out=runs_out, batch=args.batch, block=block)
    result = {
        "preset": preset.name, "dataset": args.dataset or preset.dataset, "split": split, "n": len(items),
        "inference_prm": preset.prm or "target-likelihood", "audit_prm": preset.audit_prm, "spec_k": args.spec_k,
        "settings": run_info, "points": points,
    }
    if args.batch > 1:  # latencies are times in a shared batch, not one problem's alone
        result["batch"] = args.batch
    if block > 1:  # latencies are shares of blocks timed together: throughput, not one problem's latency
        result["block"] = block
    if len(items) < planned:  # a report of a sweep not yet finished
        result["n_planned"] = planned
    return result


def _calibrated_plan(preset, args) -> tuple[list[str], dict[str, list[float]], dict]:
    """--thresholds-from: the calibration's policies and thresholds, after checking it was made
    on dev with the settings of this sweep."""
    from arbitrage_fast.eval.calibration import load_calibration, thresholds_from

    if args.thresholds:
        raise ValueError("--thresholds-from and --thresholds both choose thresholds: pass one")
    calibration = load_calibration(args.thresholds_from)
    if calibration["split"] == args.split:
        raise ValueError(f"the calibration in {args.thresholds_from} was made on the {args.split!r} split; "
                         "thresholds must be reported on another split than the one that chose them")
    ours, theirs = sweep_settings(preset, args), calibration["settings"]
    # A head is named by its weights' digest; its folder's path only says where the package was
    # checked out, so a copy of the same weights elsewhere may report what dev chose.
    ignored = {"seed"} | ({"router"} if "router_heads" in ours and "router_heads" in theirs else set())
    differ = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k) and k not in ignored)
    if differ:
        detail = "; ".join(f"{k}: calibration has {theirs.get(k)!r}, this sweep has {ours.get(k)!r}" for k in differ)
        raise ValueError(f"the calibration in {args.thresholds_from} was made with other settings ({detail})")
    policies, thresholds = thresholds_from(calibration)
    return policies, thresholds, calibration


def run(preset, args) -> int:
    from arbitrage_fast.eval.pareto import plot_pareto
    from arbitrage_fast.eval.report import (head_to_head, protocol_rows, render_head_to_head, render_points_table,
                                            render_protocol_table)

    calibration = None
    if args.thresholds_from:
        policies, thresholds, calibration = _calibrated_plan(preset, args)
    else:
        policies = [p.strip() for p in args.policies.split(",") if p.strip()]
        thresholds = parse_thresholds(args.thresholds, policies)
    runs: dict = {}
    result = sweep_points(preset, args, args.split, policies, thresholds, report_only=args.report_only, runs_out=runs)
    points, n, planned = result["points"], result["n"], result.get("n_planned", result["n"])
    if calibration is not None:
        result["calibration"] = {"file": str(args.thresholds_from), "split": calibration["split"],
                                 "n": calibration["n"], "target_only": calibration["target_only"]}
        result["protocol"] = protocol_rows(calibration["choices"], points, calibration.get("untuned", []))
        result["head_to_head"] = head_to_head(calibration["choices"], runs)
    write_json(result, args.json)
    if args.plot:
        of = f" of {planned} so far" if n < planned else ""
        grid = "calibrated thresholds" if calibration else "full grid"
        plot_pareto(points, args.plot, title=f"{preset.name}: accuracy vs latency, {args.split} split, {grid} "
                                             f"(n={n}{of})")
    if n < planned:
        print(f"report of the {n} of {planned} problems solved under every policy so far")
    print(render_points_table(result))
    if calibration is not None:
        print()
        print(render_protocol_table(result))
        if result["head_to_head"]:
            print()
            print(render_head_to_head(result))
    return 0
