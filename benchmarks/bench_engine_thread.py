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

from _harness import (ResultFile, add_requests_ab_args, cpu_run_record, rendered,  # noqa: E402
                      requests_ab_engine, requests_ab_rows)

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
    add_requests_ab_args(ap, "engine_thread")
    args = ap.parse_args(argv)
    if rendered(args, table):
        return 0

    from arbitrage_fast import SamplingParams

    engine, path, prompts = requests_ab_engine(args)

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
    requests_ab_rows(out, args, lambda rows: {
        "main_thread": lambda: requests(rows),
        "own_thread": lambda: on_a_second_thread(lambda: requests(rows, 2), lambda: requests(rows))},
        requests,  # warm-up: first-touch of pages, the main thread's OpenMP pool
        ours="main_thread", baseline="own_thread", table=table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
