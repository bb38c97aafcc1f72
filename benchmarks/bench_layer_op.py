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

from _harness import RESULTS, ResultFile, add_render_flag, cpu_run_record, rendered  # noqa: E402

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
    ap.add_argument("--preset", default="qwen2.5-coder", help="the preset whose draft model is timed")
    ap.add_argument("--model", default=None, help="a checkpoint instead of the preset's draft")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--dequantize", action="store_true", help="a GGUF dequantised to --dtype (16-bit linears)")
    ap.add_argument("--rows", default="1,8", help="requests decoded at once, comma-separated")
    ap.add_argument("--tokens", type=int, default=64, help="tokens each request decodes")
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--name", default=None, help="results/layer_op_<name>.json (default: the model's name)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    add_render_flag(ap)
    args = ap.parse_args(argv)
    if rendered(args, table):
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)

    from arbitrage_fast import Engine, EngineConfig, SamplingParams
    from arbitrage_fast.eval.datasets import load_dataset
    from arbitrage_fast.eval.intervals import paired_bootstrap
    from arbitrage_fast.presets import resolve

    path = args.model or resolve(args.preset).draft
    engine = Engine(EngineConfig(draft=path, target=path, dtype=args.dtype, dequantize=args.dequantize,
                                 exact_arithmetic=False))
    model = engine.draft_model.model
    ops = [layer.one_op for layer in model.layers]
    if not all(ops):
        raise SystemExit(f"{sum(o is None for o in ops)} of {len(ops)} layers of {path} do not run as one op")
    prompts = [i.prompt for i in load_dataset("gsm8k", n=max(int(r) for r in args.rows.split(",")), split="test", seed=0)]
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
    for rows in (int(r) for r in args.rows.split(",")):
        run("one_op", rows)  # warm-up: first-touch of pages, allocator
        times = {v: [] for v in VARIANTS}
        identical = True
        for rep in range(args.repeats):
            texts = {}
            for variant in VARIANTS if rep % 2 == 0 else VARIANTS[::-1]:
                seconds, texts[variant] = run(variant, rows)
                times[variant].append(seconds)
            identical &= texts["modules"] == texts["one_op"]
        tokens = rows * args.tokens
        out.payload["rows"].append({
            "rows": rows, "tokens": args.tokens, "modules_s": times["modules"], "one_op_s": times["one_op"],
            "tok_s": {v: tokens * len(times[v]) / sum(times[v]) for v in VARIANTS},
            "speedup": paired_bootstrap(times["one_op"], times["modules"], "speedup"), "identical": identical})
        out.save()
        print(table(out.payload), flush=True)
    print(f"wrote {out.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
