"""What the batch-invariant mode costs: tokens/s of one request and of a batch, mode on vs off.

Two engines over the same checkpoint (loaded twice, since the mode may wrap the model's layers),
one with `EngineConfig(batch_invariant=True)`. Each times greedy `target_only` decoding of one
GSM8K problem alone and of the first `--batch` problems at once (continuous batching, EOS
ignored, `--tokens` each, prompts prefilled inside the timed run); the four variants alternate
repeat by repeat so machine load hits each alike. Reported: tokens/s and the on/off ratios,
measured in one run; and whether the mode's batched tokens equal its tokens alone.

    python benchmarks/bench_batch_invariant.py --model ~/.cache/arbitrage_fast/qwen2.5-coder-0.5b-instruct.gguf
    python benchmarks/bench_batch_invariant.py --model Q.gguf --dequantize     # bf16 nn.Linear weights
    python benchmarks/bench_batch_invariant.py --smoke                          # tiny random model, seconds
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from _harness import RESULTS, ResultFile, cpu_run_record, time_variants, timing_dict  # noqa: E402


def _checkpoint(args) -> tuple[Path, str, tempfile.TemporaryDirectory | None]:
    if args.model:
        return Path(args.model).expanduser(), Path(args.model).stem, None
    sys.path.insert(0, str(ROOT.parent / "tests"))
    from helpers.tiny_models import build_tiny_lm

    tmp = tempfile.TemporaryDirectory()
    size = dict(hidden=64, layers=2) if args.smoke else dict(hidden=512, layers=8, heads=8, kv_heads=4)
    return build_tiny_lm(Path(tmp.name) / "m", "qwen2", **size), "tiny-qwen2", tmp


def _prompts(n: int, smoke: bool) -> list[str]:
    if smoke:
        return [f"Start with {i}. Add {3 * i}. What is the result?" for i in range(n)]
    from arbitrage_fast.eval.datasets import load_dataset

    return [item.question for item in load_dataset("gsm8k", n=None)[:n]]


def _engine(path: Path, args, invariant: bool):
    from arbitrage_fast import Engine, EngineConfig
    from arbitrage_fast.models.loader import load_model

    loaded = load_model(path, args.dtype, dequantize=args.dequantize)
    t = time.perf_counter()
    engine = Engine(EngineConfig(draft=str(path), target=str(path), dtype=args.dtype, kv_pages=args.kv_pages,
                                 batch_invariant=invariant), draft=loaded, target=loaded)
    return engine, time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    from arbitrage_fast import SamplingParams
    from arbitrage_fast.roles import Role

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help=".gguf file or HF folder (default: a random tiny Qwen2)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--dequantize", action="store_true", help="a GGUF's weights as plain nn.Linear layers")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    p.add_argument("--batch", type=int, default=8, help="requests in the batched variant")
    p.add_argument("--kv-pages", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--smoke", action="store_true", help="a tiny model, 4 tokens, seconds end to end")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.smoke:
        args.tokens, args.batch = min(args.tokens, 4), min(args.batch, 3)
    if args.threads:
        torch.set_num_threads(args.threads)

    path, label, tmp = _checkpoint(args)
    prompts = _prompts(args.batch, args.smoke)
    sampling = SamplingParams(max_new_tokens=args.tokens, ignore_eos=True)
    engines, build_s = {}, {}
    for mode, invariant in (("off", False), ("on", True)):
        engines[mode], build_s[mode] = _engine(path, args, invariant)

    tokens: dict[str, list[list[int]]] = {}

    def run(mode: str, batched: bool):
        def go():
            eng = engines[mode]
            results = (eng.generate_batch(prompts, policy="target_only", sampling=sampling) if batched
                       else [eng.generate(prompts[0], policy="target_only", sampling=sampling)])
            tokens[f"{mode}_{'batch' if batched else 'alone'}"] = [r.token_ids for r in results]
        return go

    variants = {f"{mode}_{kind}": run(mode, kind == "batch") for mode in ("off", "on") for kind in ("alone", "batch")}
    timings = time_variants(variants, torch.device("cpu"), args.repeats, args.warmup)
    generated = {"alone": args.tokens, "batch": args.tokens * args.batch}
    tok_s = {name: generated[name.split("_")[1]] / t.median_s for name, t in timings.items()}
    layers = engines["on"].invariant_layers[Role.TARGET]
    row = dict(
        cpu_run_record(), model=label, dtype=args.dtype, dequantize=args.dequantize, tokens=args.tokens,
        batch=args.batch, tokens_per_s=tok_s, timings={k: timing_dict(t) for k, t in timings.items()},
        ratio_on_off_alone=tok_s["on_alone"] / tok_s["off_alone"],
        ratio_on_off_batch=tok_s["on_batch"] / tok_s["off_batch"],
        batch_speedup_off=tok_s["off_batch"] / tok_s["off_alone"],
        batch_speedup_on=tok_s["on_batch"] / tok_s["on_alone"],
        linear_layers_kept=layers.kept, linear_layers_rowwise=layers.rowwise,
        engine_build_s=build_s,  # the mode's load-time probe of the linear layers is the difference
        on_batch_equals_alone=tokens["on_batch"][0] == tokens["on_alone"][0],
        off_batch_equals_alone=tokens["off_batch"][0] == tokens["off_alone"][0],
    )
    slug = "_deq" if args.dequantize else ""
    ResultFile([row], args.out_dir, f"batch_invariant_{label}_{args.dtype}{slug}.json")
    print(f"{label} {args.dtype}: tok/s off alone {tok_s['off_alone']:.2f}, on alone {tok_s['on_alone']:.2f} "
          f"({row['ratio_on_off_alone']:.2f}x); off batch {tok_s['off_batch']:.2f}, on batch {tok_s['on_batch']:.2f} "
          f"({row['ratio_on_off_batch']:.2f}x); layers kept {layers.kept}, row-wise {layers.rowwise}; "
          f"mode on: batch == alone {row['on_batch_equals_alone']}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
