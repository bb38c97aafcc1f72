"""Where a step policy's batched time goes on the real pair: rows per forward, by model role.

The same prompts of the preset's dataset (chat-templated GSM8K for the pair; EOS ignored, so
every request writes the same number of tokens) run under one policy one request at a time,
then all at once, through one engine; a forward log (_forward_log.py) records every forward of
each model. A step policy moves each
request between phases (the draft writes a step, the target scores it in one prefill, the
target rewrites it), and each iteration runs one draft and one target forward for whichever
requests are in each phase, so the rows a forward carries, and its cost by row count, say
how far batching can go:

    time ~ draft_tokens / rows_D * c_D + target_tokens / rows_T * c_T(rows_T) + prefills

With batch B in flight, rows_D + rows_T <= B, so a model with a large fixed cost per forward
(the target) can only batch as far as requests spend their time in its phase. The table gives
the throughput ratio, the escalation rate, and per role the mean rows of a decode forward,
its cost at one row and at the mean, and the seconds in decode and in prefill forwards.

    python benchmarks/bench_policy_batching.py --policy rsd --threshold 0.95 --n 8
    python benchmarks/bench_policy_batching.py --render benchmarks/results/policy_batching_rsd.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from _forward_log import ForwardLog  # noqa: E402
from _harness import RESULTS, ResultFile, add_render_flag, cpu_run_record, rendered  # noqa: E402


NONE = {"forwards": 0, "tokens": 0, "seconds": 0.0}  # a role with no forwards of that kind


def table(payload: dict) -> str:
    lines = ["| run | requests | tok/s | speed-up | escalation | role | decode forwards | mean rows "
             "| ms at 1 row | ms by rows | decode s | prefill s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("batch1", "batched"):
        run = payload[name]
        speedup = f"{payload['speedup']:.2f}x" if name == "batched" else ""
        for role, f in run["forwards"].items():
            by_rows = f["decode_ms_by_rows"]
            decode, prefill = (f.get(kind, NONE) for kind in ("decode_only", "with_prefill"))
            rows = decode["tokens"] / max(1, decode["forwards"])
            at_rows = ", ".join(f"{r}: {ms:.0f}" for r, ms in by_rows.items())
            lines.append(f"| {name} | {run['requests']} | {run['tok_s']:.2f} | {speedup} | {run['escalation']:.2f} | {role} "
                         f"| {decode['forwards']} | {rows:.2f} | {by_rows.get('1', by_rows.get(1, 0)):.0f} "
                         f"| {at_rows} | {decode['seconds']:.1f} | {prefill['seconds']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen2.5-coder")
    ap.add_argument("--policy", default="rsd")
    ap.add_argument("--threshold", type=float, default=None)
    ap.add_argument("--n", type=int, default=8, help="prompts, all in flight in the batched run")
    ap.add_argument("--batch1-n", type=int, default=2, help="of them, run one at a time (the slow baseline)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--packed", action="store_true", help="GGUF weights packed (default: dequantised, compiled kernels)")
    ap.add_argument("--dense-rows", type=int, default=None, metavar="N",
                    help="packed, with the bf16 copy for forwards of at least N tokens (implies --packed)")
    ap.add_argument("--name", default=None, help="results/policy_batching_<name>.json (default: the policy)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    add_render_flag(ap)
    args = ap.parse_args(argv)
    if rendered(args, table):
        return 0

    from arbitrage_fast import SamplingParams
    from arbitrage_fast.commands.common import build_engine
    from arbitrage_fast.eval.datasets import load_dataset
    from arbitrage_fast.presets import resolve

    preset = resolve(args.preset)
    packed = args.packed or args.dense_rows is not None
    engine = build_engine(preset, "cpu", args.dtype, max_batch=args.n, dequantize=not packed,
                          exact_arithmetic=False, dense_rows=args.dense_rows)
    items = load_dataset(preset.dataset, n=args.n, split="test", seed=0, instruction=preset.instruction)
    prompts = [i.prompt for i in items]
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)

    def run(groups: list[list[str]]) -> dict:
        with ForwardLog(engine) as log:
            t = time.perf_counter()
            results = [r for g in groups for r in engine.generate_batch(
                g, policy=args.policy, threshold=args.threshold, sampling=sampling, chat=preset.chat)]
            wall = time.perf_counter() - t
        steps = sum(r.stats["steps"] for r in results)
        return {"requests": len(results), "wall_s": wall, "tok_s": sum(len(r.token_ids) for r in results) / wall,
                "escalation": sum(r.stats["escalations"] for r in results) / max(1, steps),
                "forwards": log.summary()}

    engine.generate_batch(prompts[:2], policy=args.policy, threshold=args.threshold,
                          sampling=SamplingParams(max_new_tokens=8), chat=preset.chat)  # warm-up
    out = ResultFile({"run": cpu_run_record(), "preset": args.preset, "policy": args.policy,
                      "threshold": args.threshold, "max_new_tokens": args.max_new_tokens,
                      "packed": packed, "dense_rows": args.dense_rows}, args.out_dir,
                     f"policy_batching_{args.name or args.policy}.json")
    out.payload["batch1"] = run([[p] for p in prompts[:args.batch1_n]])
    out.payload["batched"] = run([prompts])
    out.payload["speedup"] = out.payload["batched"]["tok_s"] / out.payload["batch1"]["tok_s"]
    out.save()
    print(table(out.payload))
    print(f"wrote {out.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
