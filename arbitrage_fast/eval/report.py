"""Markdown tables of sweep results and router evaluations, rendered from the result JSON alone.

Every figure README.md and benchmarks/RESULTS.md quote from a sweep sits in a block
between `<!-- table: PATH -->` and `<!-- /table -->`, rewritten by
`python -m arbitrage_fast.eval.report` from the JSON at PATH (relative to the repository
root); a test checks that each block equals what this module renders, so no number in the
docs can drift from its JSON. Every accuracy carries its Wilson 95% interval and every
speed-up its paired-bootstrap 95% interval (`eval.intervals`); "matched" means the
accuracy difference to target_only is not significant at 95%.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

BLOCK = re.compile(r"(<!-- table: (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.DOTALL)


def protocol_rows(choices: list[dict], points: list[dict], untuned: list[str] = ()) -> list[dict]:
    """One row per calibration choice: the dev figures that chose the threshold beside the
    test point it names (test None when dev reached no threshold for the target); then one row
    per policy without a threshold, as it ran on test."""
    by_key = {(p["policy"], p["threshold"]): p for p in points}
    rows = [{"policy": policy, "target": "no threshold", "threshold": None, "dev": None,
             "test": by_key[(policy, None)]} for policy in untuned]
    for choice in choices:
        row = {"policy": choice["policy"], "target": choice["target"], "threshold": choice["threshold"],
               "dev": choice["dev"], "test": None}
        if choice["threshold"] is not None:
            if (choice["policy"], choice["threshold"]) not in by_key:
                raise ValueError(f"the sweep has no point for {choice['policy']}@{choice['threshold']}, "
                                 "which the calibration chose")
            row["test"] = by_key[(choice["policy"], choice["threshold"])]
        rows.append(row)
    return rows


def head_to_head(choices: list[dict], runs: dict) -> list[dict]:
    """The lead policy against every other policy at the same dev target, each at the threshold
    dev chose for it: at an accuracy target, which is faster at (dev-)matched accuracy; at an
    escalation target, what the same share of target-written steps buys each. The lead is
    arbitrage when the calibration chose it thresholds, else the first policy it chose for (a
    calibration of the peer methods alone still compares them). Accuracy difference and speed-up
    (lead's latency over the rival's, so > 1 means lead is faster), paired by problem (by block
    for a block sweep), with bootstrap intervals. `runs` maps (policy, threshold) to the test
    records in problem order."""
    from .intervals import compare_to_baseline

    chosen: dict[str, dict[str, float]] = {}
    for c in choices:
        if c["threshold"] is not None:
            chosen.setdefault(c["target"], {})[c["policy"]] = c["threshold"]
    tuned = list(dict.fromkeys(c["policy"] for c in choices if c["threshold"] is not None))
    if not tuned:
        return []
    lead = "arbitrage" if "arbitrage" in tuned else tuned[0]
    rows = []
    for target, by_policy in chosen.items():
        if lead not in by_policy:
            continue
        ours = runs[(lead, by_policy[lead])]
        for rival, threshold in by_policy.items():
            if rival != lead:
                rows.append({"target": target, "policy": lead, "threshold": by_policy[lead], "versus": rival,
                             "versus_threshold": threshold, **compare_to_baseline(ours, runs[(rival, threshold)])})
    return rows


def render_head_to_head(result: dict) -> str:
    rows = [[r["target"], f"{policy_label(r['policy'])}@{r['threshold']:g}",
             f"{policy_label(r['versus'])}@{r['versus_threshold']:g}",
             f"{r['accuracy_diff'] * 100:+.1f} pt [{r['accuracy_diff_ci'][0] * 100:+.1f}, "
             f"{r['accuracy_diff_ci'][1] * 100:+.1f}]",
             _ratio(r["speedup"], r["speedup_ci"]), _ratio(r["cpu_speedup"], r["cpu_speedup_ci"])]
            for r in result["head_to_head"]]
    caption = (f"Head to head on the {result['split']} split (n = {result['n']}), each policy at the threshold dev "
               "chose for the same target (an accuracy floor, or the dev grid point nearest an escalation rate, "
               "which a coarse grid may leave far from it: the escalation column above says what each row "
               "escalated); speed-up = the rival's summed latency over the first's, paired by "
               f"{'block' if result.get('block') else 'problem'}, 95% bootstrap intervals.")
    return caption + "\n\n" + _table(["dev target", "policy", "versus", "accuracy difference [95% CI]",
                                        "speed-up, wall [95% CI]", "speed-up, CPU [95% CI]"], rows)


def _acc(point: dict) -> str:
    low, high = point["accuracy_ci"]
    return f"{point['accuracy']:.3f} [{low:.3f}, {high:.3f}]"


def _ratio(value, ci) -> str:
    return "—" if value is None else f"{value:.2f}x [{ci[0]:.2f}, {ci[1]:.2f}]"


def _versus(point: dict) -> list[str]:
    vs = point.get("vs_target_only")
    if vs is None:  # target_only itself, or a sweep without it
        return ["—", "—", "—", "—"]
    low, high = vs["accuracy_diff_ci"]
    return [f"{vs['accuracy_diff'] * 100:+.1f} pt [{low * 100:+.1f}, {high * 100:+.1f}]",
            "yes" if vs["matched"] else "**no**", _ratio(vs["speedup"], vs["speedup_ci"]),
            _ratio(vs["cpu_speedup"], vs["cpu_speedup_ci"])]


def _cells(point: dict) -> list[str]:
    cpu = "—" if point["cpu_s"] is None else f"{point['cpu_s']:.3f}"  # a batched sweep times no run's CPU
    return [_acc(point), *_versus(point)[:2], f"{point['latency_s']:.3f}", cpu,
            *_versus(point)[2:], f"{point['escalation_rate']:.2f}",
            _sittings(point)]


def _sittings(point: dict) -> str:
    if point.get("mixed_sittings"):
        return "**mixed**"
    return "not recorded" if point["sittings"] == ["unrecorded"] else "one"


_COLUMNS = ["accuracy [95% CI]", "vs target_only [95% CI]", "matched", "wall s", "CPU s",
            "speed-up, wall [95% CI]", "speed-up, CPU [95% CI]", "escalation", "sittings"]


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def policy_label(policy: str) -> str:
    """A row's policy, marked when the exact checker decided it: an upper bound, not a method."""
    return f"{policy} (oracle)" if policy.endswith(":exact") else policy


def _label(point: dict) -> str:
    name = policy_label(point["policy"])
    return name if point["threshold"] is None else f"{name}@{point['threshold']:g}"


def render_points_table(result: dict) -> str:
    """Every point of a sweep. Without a calibration its thresholds were not chosen on dev, so
    the caption says the table is a full grid read on the same problems it reports."""
    # Results written before the train/dev/test splits carry no split: their "test" was the old one.
    split = f"{result['split']} split" if "split" in result else "split not recorded, older than train/dev/test"
    kind = ("thresholds from the dev calibration" if "protocol" in result
            else "full threshold grid, not chosen on dev: any 'best point' read off it is optimistic")
    caption = f"{result['preset']} on {result['dataset']} ({split}, n = {result['n']}; {kind}). " + _timing(result)
    rows = [[_label(p), *_cells(p)] for p in result["points"]]
    return caption + "\n\n" + _table(["policy", *_COLUMNS], rows)


def _timing(result: dict) -> str:
    """What the time columns of `result` measure: one problem alone, a block, or a shared batch."""
    if result.get("block"):
        return (f"Problems ran in blocks of {result['block']}, all in flight together and timed as a whole: wall and "
                "CPU s are each block's time per problem (throughput under load, not one problem's latency); "
                "speed-ups are target_only's summed time over the row's, paired by block.")
    if result.get("batch"):
        return (f"{result['batch']} runs were in flight at once: wall s are times in a shared batch, which no "
                "comparison should rest on, and no run has a CPU time of its own.")
    return ("Wall and CPU s are means per problem; speed-ups are target_only's summed latency over the row's, "
            "paired by problem.")


def render_protocol_table(result: dict) -> str:
    """The matched-accuracy table: each policy at the thresholds dev chose, measured on test."""
    cal = result["calibration"]
    caption = (f"{result['preset']} on {result['dataset']}: thresholds chosen on the {cal['split']} split "
               f"(n = {cal['n']}, target_only {cal['target_only']['accuracy']:.3f}), reported on the "
               f"{result['split']} split (n = {result['n']}) once. Targets: dev accuracy within 0/1/2 points "
               "of target_only's, or a dev escalation rate. " + _timing(result))
    rows = []
    for row in result["protocol"]:
        head = [policy_label(row["policy"]), row["target"], "—" if row["threshold"] is None else f"{row['threshold']:g}"]
        if row["test"] is None:
            rows.append([*head, "no dev grid point reached the target", *["—"] * (len(_COLUMNS) - 1)])
        else:
            rows.append([*head, *_cells(row["test"])])
    return caption + "\n\n" + _table(["policy", "dev target", "threshold", *_COLUMNS], rows)


def _share(value, ci) -> str:
    return f"{value:.2f}" if ci is None else f"{value:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def render_router_eval(result: dict) -> str:
    """A router head on held-out problems (`eval-router --json`): its ranking of the steps, then
    per escalation rate the share of the positive advantage its top-scored steps hold beside the
    share RSD's rule (the steps the PRM scores lowest) holds at the same rate."""
    def metric(name):
        value, ci = result[name], result.get(f"{name}_ci")
        return "—" if value is None else _share(value, ci)

    margin = result.get("label_margin", 0.0)  # evaluations written before the margin existed: 0
    positive = "a positive advantage" if margin == 0 else f"advantage > {margin:g}, the AUROC's label"
    caption = (f"{', '.join(result['datasets'])}: {result['n_problems']} held-out problems, {result['n_steps']} steps "
               f"({result['positive_rate'] * 100:.0f} % with {positive}); AUROC {metric('auroc')}, "
               f"Spearman ρ {metric('spearman')}; 95% intervals resample problems.")
    rows = [[f"{p['rate'] * 100:.0f} %", _share(p["router_gain"], p.get("router_gain_ci")),
             _share(p["prm_gain"], p.get("prm_gain_ci")) if "prm_gain" in p else "—",
             _share(p["router_gain"] - p["prm_gain"], p.get("router_minus_prm_ci")) if "prm_gain" in p else "—",
             f"{p['oracle_gain']:.2f}", f"{p['random_gain']:.2f}"] for p in result["deferral_curve"]]
    return caption + "\n\n" + _table(["escalated", "router's top steps", "RSD's rule (lowest PRM)",
                                       "router − RSD's rule", "oracle", "random"], rows)


def render_calibration(result: dict) -> str:
    """A dev calibration (`calibrate --out`): the thresholds it chose, then its whole dev grid."""
    settings = result["settings"]
    grid_sizes = "/".join(map(str, sorted({len(g) for g in result["grid"].values()})))
    pilot = result.get("grid_pilot")
    placed = (f"{grid_sizes} thresholds per policy: its score range's ends and the evenly spaced quantiles of "
              f"its scores of draft steps on {pilot['n']} train problems" if result.get("grid_kind") == "quantile"
              else f"{grid_sizes} evenly spaced thresholds per policy over its score range")
    caption = (f"{settings['preset']} on {settings['dataset']}: the dev calibration (n = {result['n']}, "
               f"target_only {_acc(result['target_only'])}), {placed}. Chosen: the fewest escalations within "
               "0/1/2 points of target_only's dev accuracy, and the points nearest each escalation rate.")
    rows = [[c["policy"], c["target"], "none reaches it", "—", "—"] if c["threshold"] is None else
            [c["policy"], c["target"], f"{c['threshold']:g}", _acc(c["dev"]), f"{c['dev']['escalation_rate']:.2f}"]
            for c in result["choices"]]
    choices = _table(["policy", "dev target", "threshold", "dev accuracy [95% CI]", "dev escalation"], rows)
    grid = render_points_table({**result, "preset": settings["preset"], "dataset": settings["dataset"]})
    return caption + "\n\n" + choices + "\n\n" + grid


def render(result: dict) -> str:
    """The block a doc shows for `result`: a router evaluation, a dev calibration, the protocol
    table where there is one, else the grid."""
    if "deferral_curve" in result:
        return render_router_eval(result)
    if "choices" in result and result.get("split") == "dev":
        return render_calibration(result)
    if "protocol" not in result:
        return render_points_table(result)
    table = render_protocol_table(result)
    return table + "\n\n" + render_head_to_head(result) if result.get("head_to_head") else table


def rewrite_blocks(text: str, root: Path) -> str:
    """`text` with every table block re-rendered from its JSON."""
    def fill(match: re.Match) -> str:
        path = root / match["path"]
        if not path.is_file():
            raise ValueError(f"a table block names {match['path']}, which does not exist under {root}")
        return match.group(1) + render(json.loads(path.read_text())) + "\n" + match.group(4)
    return BLOCK.sub(fill, text)


def refresh_points(result_path: Path, records_path: Path, root: Path = Path(".")) -> None:
    """Rewrite the points of a sweep's result JSON from its records file (adding the intervals a
    result written before them lacks), after checking that every figure it held is unchanged;
    a calibrated sweep's head-to-head is rebuilt too, from the calibration file it names (under
    `root`), so rows a later report adds come from the same records."""
    from .calibration import load_calibration
    from .sweep import points_of_runs, runs_from_record_file

    result = json.loads(result_path.read_text())
    _, runs = runs_from_record_file(records_path)  # read once: the points and the head-to-head
    rebuilt = points_of_runs(runs)
    by_key = {(p["policy"], p["threshold"]): p for p in rebuilt}
    old = result["points"]
    points = [by_key.get((p["policy"], p["threshold"])) for p in old]  # in the order the JSON lists them
    differs = lambda a, b: (a is None) != (b is None) or (a is not None and abs(a - b) > 1e-12)  # noqa: E731
    if len(old) != len(rebuilt) or None in points or any(differs(o[k], n[k]) for o, n in zip(old, points)
                                                         for k in ("accuracy", "latency_s", "cpu_s", "escalation_rate")):
        raise ValueError(f"{records_path} does not reproduce the points of {result_path}")
    result["points"] = points
    if "head_to_head" in result:
        result["head_to_head"] = head_to_head(load_calibration(root / result["calibration"]["file"])["choices"], runs)
    result_path.write_text(json.dumps(result, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="re-render the sweep tables in Markdown files from their JSON")
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--refresh", nargs=2, type=Path, metavar=("RESULT_JSON", "RECORDS_JSONL"),
                        help="first rebuild RESULT_JSON's points, with intervals, from its records file")
    parser.add_argument("--root", type=Path, default=Path("."), help="where the blocks' JSON paths start")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is stale")
    args = parser.parse_args(argv)
    if args.refresh:
        refresh_points(*args.refresh, root=args.root)
    stale = []
    for path in args.files:
        text = path.read_text()
        new = rewrite_blocks(text, args.root)
        if new != text:
            stale.append(path)
            if not args.check:
                path.write_text(new)
    if stale:
        print(("stale: " if args.check else "rewrote: ") + ", ".join(map(str, stale)))
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
