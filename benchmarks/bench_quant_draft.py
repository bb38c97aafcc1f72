"""The quantized-draft pair: the 1.5B's own low-bit copy drafting for the 1.5B, beside the 0.5B.

The paper's pair shape is a quantized copy of the target as its draft (one tokenizer, one
architecture, the same training), which this engine builds on load (`--draft <target file>
--draft-quant int3`). On a few chat-templated GSM8K problems, in one run, with every model
loaded once:
  * per-token cost: `draft_only` seconds per generated token of each draft over `target_only`'s
    of the target (the ratio a step-level policy trades on);
  * step agreement: under `rsd` with a threshold no score reaches, the target rewrites every
    step from the context it shares with the draft; a draft step "agrees" when its text equals
    the target's rewrite (exactly, and on the first STEP_WORDS words);
  * the answers' grades under each.
The configurations alternate per problem, so drift in machine load hits each alike; wall and
process CPU seconds are both kept.

    python benchmarks/bench_quant_draft.py [--n 3] [--max-new-tokens 128] [--formats int4,int3]
        [--group 64] [--threads 1] [--target-load dequantized|packed]
    python benchmarks/bench_quant_draft.py --render benchmarks/results/quant_draft_t1.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from _harness import RESULTS, add_render_flag, cpu_run_record, rendered, timed_generate, write_json  # noqa: E402

STEP_WORDS = 8
ESCALATE_ALL = 2.0  # above any target-likelihood score (they lie in [0, 1])


def agreement(steps) -> tuple[int, int, int]:
    """(steps compared, exact matches, matches on the first STEP_WORDS words)."""
    pairs = [(s.rejected_draft, s.text) for s in steps if s.rejected_draft is not None]
    exact = sum(d.strip() == t.strip() for d, t in pairs)
    head = sum(d.split()[:STEP_WORDS] == t.split()[:STEP_WORDS] for d, t in pairs)
    return len(pairs), exact, head


def markdown_table(result: dict) -> str:
    """RESULTS.md's table of a run, from its JSON (`--render`)."""
    from arbitrage_fast.eval.intervals import wilson_interval

    rows = ["| draft | s/token (CPU) | cost vs target | steps compared | exact agreement | first "
            f"{result['step_words']} words agree | draft_only correct |", "|---|---|---|---|---|---|---|"]
    target = result["summary"]["target_only"]
    rows.append(f"| (target_only, the 1.5B {result['target_load']}) | {target['cpu_s_per_token']:.3f} | 1.00x | | | | "
                f"{target['correct']} of {result['n']} |")
    for name, s in result["summary"].items():
        if name == "target_only":
            continue
        def share(v):  # with a Wilson 95 % interval over the steps compared
            if v is None:
                return "n/a"
            low, high = wilson_interval(round(v * s["steps_compared"]), s["steps_compared"])
            return f"{v:.0%} [{low:.0%}, {high:.0%}]"
        rows.append(f"| {name} | {s['cpu_s_per_token']:.3f} | {s['cost_ratio_cpu']:.2f}x | {s['steps_compared']} | "
                    f"{share(s['step_agreement'])} | {share(s['step_head_agreement'])} | "
                    f"{s['draft_only_correct']} of {result['n']} |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3, help="GSM8K problems (test split)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--formats", default="int4,int3", help="the target's quantized copies drafting for it")
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--target-load", default="dequantized", choices=["dequantized", "packed"],
                    help="the 1.5B target in bf16 from its GGUF (dequantized) or run on its Q4_K blocks")
    ap.add_argument("--out", type=Path, default=None)
    add_render_flag(ap)
    args = ap.parse_args()
    if rendered(args, markdown_table):
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    from arbitrage_fast import Engine, EngineConfig, SamplingParams
    from arbitrage_fast.eval.datasets import load_dataset
    from arbitrage_fast.eval.grading import grade
    from arbitrage_fast.models.group_quant import QuantScheme
    from arbitrage_fast.models.loader import load_model
    from arbitrage_fast.presets import STEP_BY_STEP_BOXED, resolve

    preset = resolve("qwen2.5-coder")
    t = time.perf_counter()
    target = load_model(preset.target, "bfloat16", dequantize=args.target_load == "dequantized")
    drafts = {"0.5B": load_model(preset.draft, "bfloat16")}
    for fmt in filter(None, args.formats.split(",")):
        drafts[f"1.5B-{fmt}"] = load_model(preset.target, "bfloat16", quant=QuantScheme(fmt, args.group))
    load_s = time.perf_counter() - t
    engines = {name: Engine(EngineConfig(draft=d.path, target=preset.target, dtype="bfloat16", kv_pages=128),
                            draft=d, target=target) for name, d in drafts.items()}

    sampling = SamplingParams(max_new_tokens=args.max_new_tokens)
    items = load_dataset("gsm8k", n=args.n, split="test", seed=args.seed, instruction=STEP_BY_STEP_BOXED)
    per_problem = []
    for item in items:
        row = {"id": item.id}
        res, wall, cpu = timed_generate(next(iter(engines.values())), item.prompt, "target_only", None, sampling)
        row["target_only"] = {"wall_s": wall, "cpu_s": cpu, "tokens": len(res.token_ids),
                              "correct": bool(grade(res.text, item.answer))}
        for name, eng in engines.items():
            res, wall, cpu = timed_generate(eng, item.prompt, "draft_only", None, sampling)
            esc, _, _ = timed_generate(eng, item.prompt, "rsd", ESCALATE_ALL, sampling)
            compared, exact, head = agreement(esc.steps)
            row[name] = {"wall_s": wall, "cpu_s": cpu, "tokens": len(res.token_ids),
                         "correct": bool(grade(res.text, item.answer)), "steps_compared": compared,
                         "steps_exact": exact, "steps_head": head}
            print(f"{item.id} {name:10s} {len(res.token_ids):4d} tok {wall:7.1f} s wall  agree {exact}/{compared} "
                  f"(first {STEP_WORDS} words {head})", flush=True)
        per_problem.append(row)

    def per_token(rows, key):
        return sum(r[key] for r in rows) / max(1, sum(r["tokens"] for r in rows))

    target_rows = [r["target_only"] for r in per_problem]
    summary = {"target_only": {"cpu_s_per_token": per_token(target_rows, "cpu_s"),
                               "wall_s_per_token": per_token(target_rows, "wall_s"),
                               "correct": sum(r["correct"] for r in target_rows)}}
    for name in engines:
        rows = [r[name] for r in per_problem]
        compared = sum(r["steps_compared"] for r in rows)
        summary[name] = {
            "cpu_s_per_token": per_token(rows, "cpu_s"), "wall_s_per_token": per_token(rows, "wall_s"),
            "cost_ratio_cpu": per_token(rows, "cpu_s") / summary["target_only"]["cpu_s_per_token"],
            "cost_ratio_wall": per_token(rows, "wall_s") / summary["target_only"]["wall_s_per_token"],
            "steps_compared": compared,
            "step_agreement": sum(r["steps_exact"] for r in rows) / compared if compared else None,
            "step_head_agreement": sum(r["steps_head"] for r in rows) / compared if compared else None,
            "draft_only_correct": sum(r["correct"] for r in rows),
        }
    result = {**cpu_run_record(), "target": preset.target, "target_load": args.target_load,
              "group": args.group, "n": len(items), "max_new_tokens": args.max_new_tokens, "load_s": load_s,
              "step_words": STEP_WORDS, "summary": summary, "problems": per_problem}
    print(markdown_table(result))
    write_json(result, args.out.parent if args.out else RESULTS,
               args.out.name if args.out else f"quant_draft_t{result['threads']}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
