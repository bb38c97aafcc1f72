"""A decoder layer as one compiled op against the same layer's modules, same engine, same run.

With exact arithmetic off every layer of a CPU model runs as one op (`PackedLayer`,
csrc/decoder_layer_cpu.cpp) where its linears allow; the modules call the same kernels in the
same order from Python. This times whole greedy requests through the engine (`draft_only`,
EOS ignored) both ways on one loaded model, switching the layers' op off and on between
repeats in alternating order, so load on a shared machine hits both alike; the outputs must
be identical. One request (`--rows 1`) is the latency case, several at once (`generate_batch`)
the batched one. The speed-up is a paired bootstrap over repeats (sum of the modules' times
over the op's).

    python benchmarks/bench_layer_op.py --preset qwen2.5-coder --dequantize --rows 1,8
    python benchmarks/bench_layer_op.py --render benchmarks/results/layer_op_qwen2.5-coder.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from _harness import (ResultFile, add_requests_ab_args, cpu_run_record, rendered,  # noqa: E402
                      requests_ab_engine, requests_ab_rows)

VARIANTS = ("modules", "one_op")


def table(payload: dict) -> str:
    lines = ["| model | dtype | rows | tokens a request | repeats | tok/s modules | tok/s one op | speed-up [95% CI] | outputs identical |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        if "error" in r:
            lines.append(f"| {payload['model']} | {payload['dtype']} | {r['rows']} | | | | | failed: {r['error']} | |")
            continue
        est, lo, hi = r["speedup"]
        lines.append(f"| {payload['model']} | {payload['dtype']} | {r['rows']} | {r['tokens']} | {len(r['one_op_s'])} "
                     f"| {r['tok_s']['modules']:.1f} | {r['tok_s']['one_op']:.1f} | {est:.2f}x [{lo:.2f}, {hi:.2f}] "
                     f"| {'yes' if r['identical'] else '**no**'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_requests_ab_args(ap, "layer_op")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if rendered(args, table):
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)

    from arbitrage_fast import SamplingParams

    engine, path, prompts = requests_ab_engine(args)
    model = engine.draft_model.model
    ops = [layer.one_op for layer in model.layers]
    if not all(ops):
        raise SystemExit(f"{sum(o is None for o in ops)} of {len(ops)} layers of {path} do not run as one op")
    sampling = SamplingParams(max_new_tokens=args.tokens, ignore_eos=True)

    def run(variant: str, rows: int) -> tuple[float, list[str]]:
        for layer, op in zip(model.layers, ops):
            layer.one_op = op if variant == "one_op" else None
        t = time.perf_counter()
        if rows == 1:
            texts = [engine.generate(prompts[0], policy="draft_only", sampling=sampling).text]
        else:
            texts = [r.text for r in engine.generate_batch(prompts[:rows], policy="draft_only", sampling=sampling)]
        return time.perf_counter() - t, texts

    name = args.name or Path(path).stem
    out = ResultFile({"run": cpu_run_record(), "model": Path(path).name, "dtype": args.dtype,
                      "dequantize": args.dequantize, "rows": []}, args.out_dir, f"layer_op_{name}.json")
    requests_ab_rows(out, args, lambda rows: {v: (lambda v=v: run(v, rows)) for v in VARIANTS},
                     lambda rows: run("one_op", rows),  # warm-up: first-touch of pages, allocator
                     ours="one_op", baseline="modules", table=table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
