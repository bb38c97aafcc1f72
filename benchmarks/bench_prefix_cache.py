"""The prefix cache on a chat's second turn: the real 0.5B, cache on vs off, in one run.

Each GSM8K problem is a two-turn chat: the model answers (turn 1, on the engine with the cache,
which keeps its KV), then the user asks a follow-up, and both engines answer the same second
turn, whose prompt is the whole conversation so far.
With `prefix_cache=True` the second turn takes the first turn's KV (prompt and answer) from the
cache and prefills only the new turn; without it the whole conversation is prefilled again.
Both engines share the loaded weights; the order of the two second turns alternates per
problem, so drift in machine load hits each alike. Recorded per problem: second-turn wall and
process CPU seconds, prompt tokens computed and taken from the cache, and whether both engines
wrote the same tokens (packed weights round a prefill cut in two places differently from one
in one place, so a near-tie token may differ; counted, not assumed).

    python benchmarks/bench_prefix_cache.py [--n 6] [--answer-tokens 160] [--follow-up-tokens 32]
    python benchmarks/bench_prefix_cache.py --render benchmarks/results/prefix_cache_cpu.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from _harness import RESULTS, add_render_flag, cpu_run_record, rendered, timed_generate, write_json  # noqa: E402

FOLLOW_UP = "Check each step of your solution again and state the final answer once more."


def summarize(problems: list[dict]) -> dict:
    from arbitrage_fast.eval.intervals import paired_bootstrap

    on, off = [p["cache_on"] for p in problems], [p["cache_off"] for p in problems]
    out = {}
    for key, name in (("wall_s", "speedup_wall"), ("cpu_s", "speedup_cpu")):
        value, low, high = paired_bootstrap([r[key] for r in on], [r[key] for r in off], "speedup")
        out[name], out[f"{name}_ci"] = value, [low, high]
    out["prefill_tokens_on"] = sum(r["prefill_tokens"] for r in on)
    out["prefill_tokens_off"] = sum(r["prefill_tokens"] for r in off)
    out["cached_tokens_on"] = sum(r["cached_tokens"] for r in on)
    out["prompt_tokens"] = sum(r["prompt_tokens"] for r in on)
    out["same_tokens"] = sum(p["same_tokens"] for p in problems)
    return out


def markdown_table(result: dict) -> str:
    s = result["summary"]
    rows = ["| second turn | prompt tokens | computed | from the cache | wall s (sum) | CPU s (sum) |",
            "|---|---|---|---|---|---|"]
    for key, name in (("cache_off", "cache off"), ("cache_on", "cache on")):
        rs = [p[key] for p in result["problems"]]
        rows.append(f"| {name} | {sum(r['prompt_tokens'] for r in rs)} | {sum(r['prefill_tokens'] for r in rs)} | "
                    f"{sum(r['cached_tokens'] for r in rs)} | {sum(r['wall_s'] for r in rs):.1f} | "
                    f"{sum(r['cpu_s'] for r in rs):.1f} |")
    rows.append("")
    rows.append(f"Second turn with the cache: **{s['speedup_wall']:.2f}x** [{s['speedup_wall_ci'][0]:.2f}, "
                f"{s['speedup_wall_ci'][1]:.2f}] wall, {s['speedup_cpu']:.2f}x [{s['speedup_cpu_ci'][0]:.2f}, "
                f"{s['speedup_cpu_ci'][1]:.2f}] CPU (paired bootstrap over {result['n']} problems); the same tokens "
                f"on both engines in {s['same_tokens']} of {result['n']}.")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=6, help="GSM8K problems (test split)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--answer-tokens", type=int, default=160, help="the first turn's token cap")
    ap.add_argument("--follow-up-tokens", type=int, default=32, help="the second turn's token cap")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    add_render_flag(ap)
    args = ap.parse_args()
    if rendered(args, markdown_table):
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    from arbitrage_fast import Engine, EngineConfig, SamplingParams
    from arbitrage_fast.eval.datasets import load_dataset
    from arbitrage_fast.models.loader import load_model
    from arbitrage_fast.presets import STEP_BY_STEP_BOXED, resolve

    preset = resolve("qwen2.5-coder")
    model = load_model(preset.draft, "bfloat16")  # the 0.5B, packed as stored
    engines = {key: Engine(EngineConfig(draft=model.path, target=model.path, dtype="bfloat16", kv_pages=256,
                                        prefix_cache=key == "cache_on"), draft=model, target=model)
               for key in ("cache_off", "cache_on")}
    answer = SamplingParams(max_new_tokens=args.answer_tokens)
    follow = SamplingParams(max_new_tokens=args.follow_up_tokens)
    items = load_dataset("gsm8k", n=args.n, split="test", seed=args.seed, instruction=STEP_BY_STEP_BOXED)
    problems = []
    for i, item in enumerate(items):
        question = [{"role": "user", "content": item.prompt}]
        first, _, _ = timed_generate(engines["cache_on"], question, "draft_only", None, answer)  # fills the cache
        turn = question + [{"role": "assistant", "content": first.text}, {"role": "user", "content": FOLLOW_UP}]
        row = {"id": item.id, "answer_tokens": len(first.token_ids)}
        second = {}
        for key in (("cache_off", "cache_on") if i % 2 == 0 else ("cache_on", "cache_off")):
            res, wall, cpu = timed_generate(engines[key], turn, "draft_only", None, follow)
            second[key] = res
            row[key] = {"wall_s": wall, "cpu_s": cpu, "prompt_tokens": res.stats["draft_prefill_tokens"]
                        + res.stats["draft_cached_tokens"], "prefill_tokens": res.stats["draft_prefill_tokens"],
                        "cached_tokens": res.stats["draft_cached_tokens"], "tokens": len(res.token_ids)}
        row["same_tokens"] = second["cache_on"].token_ids == second["cache_off"].token_ids
        engines["cache_on"].reset_prefix_cache()
        problems.append(row)
        print(f"{item.id}: turn 2 {row['cache_off']['wall_s']:.2f} s -> {row['cache_on']['wall_s']:.2f} s, "
              f"computed {row['cache_off']['prefill_tokens']} -> {row['cache_on']['prefill_tokens']} tokens, "
              f"same tokens {row['same_tokens']}", flush=True)
    result = {**cpu_run_record(), "model": preset.draft, "n": len(items), "answer_tokens": args.answer_tokens,
              "follow_up_tokens": args.follow_up_tokens, "follow_up": FOLLOW_UP, "problems": problems,
              "summary": summarize(problems)}
    print(markdown_table(result))
    write_json(result, args.out.parent if args.out else RESULTS, args.out.name if args.out else "prefix_cache_cpu.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
