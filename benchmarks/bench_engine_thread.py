"""The engine loop on the thread that loaded the model against a thread of its own, same run.

`arbitrage-fast serve` used to step the engine on a worker thread while the main thread, which
had loaded the models, idled in uvicorn. OpenMP (libgomp, torch's CPU runtime) keeps a worker
pool per thread that opens parallel regions; with two pools on a 2-core host its workers
outnumber the cores, libgomp stops spinning between regions, and every region pays a sleeping
worker's wake-up. The server now runs the loop on the main thread (serve/process.py). This
times whole greedy requests (`draft_only`, EOS ignored) on one loaded model both ways: on the
main thread, and on one long-lived second thread (as the old worker), alternating repeat by
repeat; outputs must be identical. The speed-up is a paired bootstrap over repeats (the second
thread's time over the main thread's).

    python benchmarks/bench_engine_thread.py --preset qwen2.5-coder --dequantize --rows 1,8
    python benchmarks/bench_engine_thread.py --render benchmarks/results/engine_thread_qwen2.5-coder.json
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from _harness import RESULTS, ResultFile, add_render_flag, cpu_run_record, rendered  # noqa: E402

VARIANTS = ("main_thread", "own_thread")


def table(payload: dict) -> str:
    lines = ["| model | dtype | rows | tokens a request | repeats | tok/s own thread | tok/s main thread "
             "| speed-up [95% CI] | outputs identical |", "|---|---|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        est, lo, hi = r["speedup"]
        lines.append(f"| {payload['model']} | {payload['dtype']} | {r['rows']} | {r['tokens']} "
                     f"| {len(r['main_thread_s'])} | {r['tok_s']['own_thread']:.1f} | {r['tok_s']['main_thread']:.1f} "
                     f"| {est:.2f}x [{lo:.2f}, {hi:.2f}] | {'yes' if r['identical'] else '**no**'} |")
    return "\n".join(lines)


def on_a_second_thread(warm_up, timed):
    """`timed()`'s result, run on a new thread after `warm_up()` there (which forks its pool)."""
    result = []

    def body() -> None:
        warm_up()
        result.append(timed())

    thread = threading.Thread(target=body, name="engine")
    thread.start()
    thread.join()
    if not result:
        raise RuntimeError("the second thread's run failed (its traceback is above)")
    return result[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen2.5-coder", help="the preset whose draft model is timed")
    ap.add_argument("--model", default=None, help="a checkpoint instead of the preset's draft")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--dequantize", action="store_true", help="a GGUF dequantised to --dtype (16-bit linears)")
    ap.add_argument("--rows", default="1,8", help="requests decoded at once, comma-separated")
    ap.add_argument("--tokens", type=int, default=64, help="tokens each request decodes")
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--name", default=None, help="results/engine_thread_<name>.json (default: the model's name)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    add_render_flag(ap)
    args = ap.parse_args(argv)
    if rendered(args, table):
        return 0

    from arbitrage_fast import Engine, EngineConfig, SamplingParams
    from arbitrage_fast.eval.datasets import load_dataset
    from arbitrage_fast.eval.intervals import paired_bootstrap
    from arbitrage_fast.presets import resolve

    path = args.model or resolve(args.preset).draft
    engine = Engine(EngineConfig(draft=path, target=path, dtype=args.dtype, dequantize=args.dequantize,
                                 exact_arithmetic=False))
    prompts = [i.prompt for i in load_dataset("gsm8k", n=max(int(r) for r in args.rows.split(",")), split="test", seed=0)]

    def requests(rows: int, tokens: int = args.tokens) -> tuple[float, list[str]]:
        t = time.perf_counter()
        batch = engine.generate_batch(prompts[:rows], policy="draft_only",
                                      sampling=SamplingParams(max_new_tokens=tokens, ignore_eos=True))
        return time.perf_counter() - t, [r.text for r in batch]

    name = args.name or Path(path).stem
    openmp = next((line.strip() for line in torch.__config__.parallel_info().splitlines() if "OpenMP" in line), None)
    out = ResultFile({"run": {**cpu_run_record(), "openmp": openmp},
                      "model": Path(path).name, "dtype": args.dtype, "dequantize": args.dequantize, "rows": []},
                     args.out_dir, f"engine_thread_{name}.json")
    for rows in (int(r) for r in args.rows.split(",")):
        run = {"main_thread": lambda: requests(rows),
               "own_thread": lambda: on_a_second_thread(lambda: requests(rows, 2), lambda: requests(rows))}
        requests(rows)  # warm-up: first-touch of pages, the main thread's OpenMP pool
        times = {v: [] for v in VARIANTS}
        identical = True
        for rep in range(args.repeats):
            texts = {}
            for variant in VARIANTS if rep % 2 == 0 else VARIANTS[::-1]:
                seconds, texts[variant] = run[variant]()
                times[variant].append(seconds)
            identical &= texts["main_thread"] == texts["own_thread"]
        tokens = rows * args.tokens
        out.payload["rows"].append({
            "rows": rows, "tokens": args.tokens, "main_thread_s": times["main_thread"],
            "own_thread_s": times["own_thread"],
            "tok_s": {v: tokens * len(times[v]) / sum(times[v]) for v in VARIANTS},
            "speedup": paired_bootstrap(times["main_thread"], times["own_thread"], "speedup"),
            "identical": identical})
        out.save()
        print(table(out.payload), flush=True)
    print(f"wrote {out.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
