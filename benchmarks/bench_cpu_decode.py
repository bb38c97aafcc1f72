"""Greedy decode speed of the native engine vs transformers' `generate`, same checkpoint, same run.

Reports tokens/s for both and their ratio (the only figure worth comparing across noisy
machines). Both decode the same prompt for the same number of tokens with EOS ignored; the
engine's tokens are checked equal to transformers' so the comparison is like for like.

    python benchmarks/bench_cpu_decode.py --model PATH [--dtype bfloat16] [--tokens 128]
    python benchmarks/bench_cpu_decode.py --tiny      # builds a small random Llama to time
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent


def time_transformers(path, prompt_ids, n, dtype, repeats):
    from transformers import AutoModelForCausalLM

    kw = {}
    p = Path(path)
    if p.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=dtype).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype).eval()
    # No EOS: both sides decode exactly n tokens with the same argmax rule (min_new_tokens would
    # instead mask EOS logits and change the tokens).
    model.generation_config.eos_token_id = None
    ids = torch.tensor([prompt_ids])
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 do_sample=False, **kw)
        best = min(best, time.perf_counter() - t)
    return best, out[0, len(prompt_ids):].tolist()


def time_engine(path, prompt_ids, n, dtype, repeats):
    from arbitrage_fast import Engine, EngineConfig, SamplingParams

    engine = Engine(EngineConfig(draft=str(path), target=str(path), dtype=dtype))
    sp = SamplingParams(max_new_tokens=n, ignore_eos=True, max_step_tokens=n)
    best, res = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        res = engine.generate(prompt_ids, policy="target_only", sampling=sp)
        best = min(best, time.perf_counter() - t)
    return best, res.token_ids


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF folder or .gguf file")
    ap.add_argument("--tiny", action="store_true", help="time a random 8-layer, 512-wide Llama")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prompt", default="Janet has 16 eggs. She eats 3 for breakfast and bakes muffins with 4.")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = None
    path = args.model
    if args.tiny or not path:
        sys.path.insert(0, str(ROOT.parent / "tests"))
        from helpers.tiny_models import build_tiny_lm

        tmp = tempfile.TemporaryDirectory()
        path = build_tiny_lm(Path(tmp.name) / "m", "llama", hidden=512, layers=8, heads=8, kv_heads=4)
    from transformers import AutoTokenizer

    p = Path(path)
    tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name) if p.suffix == ".gguf" else AutoTokenizer.from_pretrained(p)
    prompt_ids = tok(args.prompt)["input_ids"]
    dtype = getattr(torch, args.dtype)
    # Interleave so drift in machine load hits both sides alike.
    hf_s, hf_tokens = time_transformers(path, prompt_ids, args.tokens, dtype, args.repeats)
    eng_s, eng_tokens = time_engine(path, prompt_ids, args.tokens, args.dtype, args.repeats)
    result = {
        "date": date.today().isoformat(), "model": str(args.model or "tiny-llama-8x512"), "dtype": args.dtype,
        "tokens": args.tokens, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "transformers_tok_s": args.tokens / hf_s, "engine_tok_s": args.tokens / eng_s,
        "speedup": hf_s / eng_s, "tokens_identical": hf_tokens == eng_tokens,
    }
    print(json.dumps(result, indent=2))
    out = ROOT / "results" / f"cpu_decode_{Path(str(result['model'])).name}_{args.dtype}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
