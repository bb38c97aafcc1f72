"""Token-level speculation on the real Qwen2.5-Coder pair (0.5B drafts for 1.5B), greedy, bf16.

On a few chat-templated GSM8K problems, in one run:
  * `spec_decode` (k draft tokens verified per target forward) vs `target_only`: acceptance
    rate, speed ratio, and the tokens must be identical (greedy speculation is exact);
  * `rsd` (target-likelihood PRM) with and without `spec_k`: the target's rewrites of
    escalated steps speculated by the resident draft; tokens must be identical too;
  * `arbitrage` the same way when a router head for the pair exists.
Both models are loaded once; each configuration is an Engine over the same weights. The
runs alternate per problem, so drift in machine load hits each alike. Wall and process CPU
seconds are both recorded (the CPU figure is steadier on a shared machine).

    python benchmarks/bench_real_pair.py [--n 2] [--max-new-tokens 128] [--k 4] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from _harness import RESULTS, cpu_run_record, timed_generate, write_json  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2, help="GSM8K problems")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=4, help="draft tokens per target verification")
    ap.add_argument("--rsd-threshold", type=float, default=0.9)
    ap.add_argument("--arbitrage-threshold", type=float, default=0.3)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from arbitrage_fast import Engine, EngineConfig, SamplingParams
    from arbitrage_fast.eval.datasets import load_dataset
    from arbitrage_fast.eval.grading import grade
    from arbitrage_fast.models.loader import load_model
    from arbitrage_fast.presets import resolve

    preset = resolve("qwen2.5-coder")
    t = time.perf_counter()
    draft, target = load_model(preset.draft, args.dtype), load_model(preset.target, args.dtype)
    load_s = time.perf_counter() - t

    def engine(spec_k: int) -> Engine:
        cfg = EngineConfig(draft=preset.draft, target=preset.target, dtype=args.dtype, kv_pages=96, spec_k=spec_k,
                           router=preset.router)
        return Engine(cfg, draft=draft, target=target)

    plain, spec = engine(0), engine(args.k)
    # (name, engine, policy, threshold, the configuration whose tokens it must equal)
    runs = [("target_only", plain, "target_only", None, None),
            (f"spec_decode_k{args.k}", spec, "spec_decode", None, "target_only"),
            (f"rsd@{args.rsd_threshold:g}", plain, "rsd", args.rsd_threshold, None),
            (f"rsd@{args.rsd_threshold:g}_spec_k{args.k}", spec, "rsd", args.rsd_threshold, f"rsd@{args.rsd_threshold:g}")]
    if plain.router is not None:
        a = f"arbitrage@{args.arbitrage_threshold:g}"
        runs += [(a, plain, "arbitrage", args.arbitrage_threshold, None),
                 (f"{a}_spec_k{args.k}", spec, "arbitrage", args.arbitrage_threshold, a)]
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens)
    items = load_dataset("gsm8k", n=args.n, seed=args.seed)
    per_problem = []
    for item in items:
        row, tokens = {"id": item.id}, {}
        for name, eng, policy, threshold, must_equal in runs:
            res, wall, cpu = timed_generate(eng, item.prompt, policy, threshold, sampling)
            tokens[name] = res.token_ids
            s = res.stats
            row[name] = {"wall_s": wall, "cpu_s": cpu, "tokens": len(res.token_ids), "steps": s["steps"],
                         "escalations": s["escalations"], "draft_tokens": s["draft_tokens"],
                         "target_tokens": s["target_tokens"], "correct": bool(grade(res.text, item.answer)),
                         "spec_proposed": s.get("spec_proposed", 0), "spec_accepted": s.get("spec_accepted", 0),
                         "identical_to": None if must_equal is None else (must_equal, res.token_ids == tokens[must_equal])}
            print(f"{item.id} {name:24s} {len(res.token_ids):4d} tok {wall:7.1f} s wall {cpu:7.1f} s cpu "
                  f"{row[name]['identical_to'] or ''}", flush=True)
        per_problem.append(row)
    summary = {}
    for name, *_ in runs:
        rows = [r[name] for r in per_problem]
        proposed = sum(r["spec_proposed"] for r in rows)
        summary[name] = {
            "wall_s": sum(r["wall_s"] for r in rows), "cpu_s": sum(r["cpu_s"] for r in rows),
            "tokens": sum(r["tokens"] for r in rows), "escalations": sum(r["escalations"] for r in rows),
            "steps": sum(r["steps"] for r in rows), "correct": sum(r["correct"] for r in rows),
            "acceptance_rate": sum(r["spec_accepted"] for r in rows) / proposed if proposed else None,
            "all_identical": all(r["identical_to"][1] for r in rows) if rows[0]["identical_to"] else None,
        }
    for name, _, _, _, ref in runs:
        if ref is not None:
            summary[name]["speedup_wall"] = summary[ref]["wall_s"] / summary[name]["wall_s"]
            summary[name]["speedup_cpu"] = summary[ref]["cpu_s"] / summary[name]["cpu_s"]
    result = {
        **cpu_run_record(), "draft": preset.draft, "target": preset.target, "dtype": args.dtype,
        "n": len(items), "max_new_tokens": args.max_new_tokens, "k": args.k, "load_s": load_s,
        "router": preset.router, "summary": summary, "problems": per_problem,
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        write_json(result, args.out.parent, args.out.name)
    else:
        write_json(result, RESULTS, f"real_pair_{args.dtype}_t{result['threads']}.json")
    identical = [v["all_identical"] for v in summary.values() if v["all_identical"] is not None]
    return 0 if all(identical) else 1


if __name__ == "__main__":
    sys.exit(main())
