"""Router labelling throughput: the same problems labelled one at a time and in batches, in one run.

Labelling a problem runs the oracle policy (both models write every step, the PRM scores
both), the most expensive thing the engine does per problem. With continuous batching the
weights are read once per iteration for all problems in flight. Reported: problems per hour at
`--batch` and at batch 1 over the same problems, their ratio, and how many problems got the
same labelled steps both ways (in bf16 a batched matmul may round differently, so a step can
differ; in fp32 they match).

    python benchmarks/bench_labelling.py --preset qwen2.5-coder --n 8 --batch 8 [--max-new-tokens 128]

Writes benchmarks/results/labelling_<preset>.json, with each run's forwards per model role: rows
per forward and the time of forwards holding a prefill chunk against decode-only ones
(_forward_log.py), which says whether prompts, kernels or the scheduler bound the ratio.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from _forward_log import ForwardLog  # noqa: E402
from _harness import RESULTS, cpu_run_record, write_json  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen2.5-coder")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--dequantize", action="store_true", help="GGUF weights dequantised (bf16 matmuls), not packed")
    ap.add_argument("--no-exact-arithmetic", action="store_true",
                    help="the compiled CPU norm, activation and attention kernels for float weights too")
    ap.add_argument("--name", default=None, help="results file suffix (default: the preset)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from arbitrage_fast.commands.common import build_engine
    from arbitrage_fast.config import SamplingParams
    from arbitrage_fast.eval.datasets import load_dataset
    from arbitrage_fast.presets import resolve
    from arbitrage_fast.router.data import label_problems

    preset = resolve(args.preset)
    engine = build_engine(preset, "cpu", args.dtype, prm="label", router=False, max_batch=args.batch,
                          dequantize=args.dequantize, exact_arithmetic=False if args.no_exact_arithmetic else None)
    items = load_dataset(preset.dataset, n=args.n, split="train", seed=args.seed, instruction=preset.instruction)
    prompts = [i.prompt for i in items]
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens)
    label_problems(engine, prompts[:1], sampling, progress=False, chat=preset.chat)  # warm-up, untimed
    runs = {}
    for batch in (1, args.batch):
        start, cpu = time.perf_counter(), time.process_time()
        with ForwardLog(engine) as log:
            labels = label_problems(engine, prompts, sampling, progress=False, chat=preset.chat, batch=batch)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        runs[batch] = {"wall_s": wall, "cpu_s": cpu, "problems_per_hour": 3600 * len(prompts) / wall,
                       "steps": len(labels.data), "forwards": log.summary(), "data": labels.data}
    one, many = runs[1], runs[args.batch]
    same = sum(torch.equal(one["data"].advantage[one["data"].problem == p], many["data"].advantage[many["data"].problem == p])
               for p in range(len(prompts)))
    out = {"run": cpu_run_record(), "preset": args.preset, "dtype": args.dtype or preset.dtype, "n": len(prompts),
           "dequantize": args.dequantize, "exact_arithmetic": False if args.no_exact_arithmetic else None,
           "max_new_tokens": args.max_new_tokens, "batch": args.batch,
           "batch1": {k: v for k, v in one.items() if k != "data"},
           "batched": {k: v for k, v in many.items() if k != "data"},
           "speedup": one["wall_s"] / many["wall_s"], "problems_with_identical_labels": same}
    path = write_json(out, RESULTS, f"labelling_{args.name or args.preset}.json")
    print(f"batch 1: {one['problems_per_hour']:.1f} problems/h; batch {args.batch}: "
          f"{many['problems_per_hour']:.1f} problems/h ({out['speedup']:.2f}x); identical labels on {same} of "
          f"{len(prompts)} problems -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
