"""Greedy decode speed of the native engine vs transformers' `generate`, same weights, same run.

Reports tokens/s for both and their ratio (the only figure worth comparing across noisy,
shared machines). The checkpoint is parsed once by transformers and the engine's decoder is
built from the same tensors (what the loader does for a .gguf file), so both sides run
identical weights. Both decode the same prompt for the same number of tokens with EOS
ignored; the repeats alternate (transformers, engine, transformers, ...) so drift in machine
load hits both alike; the engine's tokens must equal transformers'.

    python benchmarks/bench_cpu_decode.py --preset qwen2.5-coder --role draft --dtype bfloat16
    python benchmarks/bench_cpu_decode.py --model PATH.gguf|HF_FOLDER [--tokens 64] [--threads 2]
    python benchmarks/bench_cpu_decode.py --tiny      # a small random Llama, no download

`--quant` (a .gguf model) times the engine three ways on the same file, prompt, token count and
threads, in one run: weights packed as stored (the default load), dequantised to bf16 (the
`dequantize=True` reference path), and llama.cpp through llama-cpp-python (the `bench` extra;
skipped when absent). Each path is timed on whole requests and on 1-token ones, which split the
prompt's prefill from the later tokens as llama-bench's pp and tg do. Results go to
results/cpu_decode_quant.json, one record per model and thread count; `--render` prints its table:

    python benchmarks/bench_cpu_decode.py --preset qwen2.5-coder --role draft --quant --threads 2
    python benchmarks/bench_cpu_decode.py --render benchmarks/results/cpu_decode_quant.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from _harness import RESULTS, add_render_flag, cpu_run_record, rendered, write_json  # noqa: E402
GSM8K_PROMPT_INDEX = 0


def resolve_path(args) -> tuple[Path, str, tempfile.TemporaryDirectory | None]:
    """(checkpoint, label, temp dir to keep alive) from --model / --preset / --tiny."""
    if args.preset:
        from arbitrage_fast.presets import resolve

        preset = resolve(args.preset)
        path = Path(preset.draft if args.role == "draft" else preset.target)
        return path, path.stem, None
    if args.model:
        return Path(args.model), Path(args.model).stem, None
    sys.path.insert(0, str(ROOT.parent / "tests"))
    from helpers.tiny_models import build_tiny_lm

    tmp = tempfile.TemporaryDirectory()
    return build_tiny_lm(Path(tmp.name) / "m", "llama", hidden=512, layers=8, heads=8, kv_heads=4), "tiny-llama-8x512", tmp


def load_both(path: Path, dtype: torch.dtype):
    """transformers' model and tokenizer, and the native decoder built from the same tensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from arbitrage_fast.models.architecture import DecoderSpec
    from arbitrage_fast.models.loader import LoadedModel, _build

    kw = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    folder = path.parent if path.suffix == ".gguf" else path
    t = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kw).eval()
    tok = AutoTokenizer.from_pretrained(folder, **kw)
    load_s = time.perf_counter() - t
    spec = DecoderSpec.from_hf_config(hf.config)
    t = time.perf_counter()
    native = _build(spec, dict(hf.state_dict()), dtype, "cpu", path)
    build_s = time.perf_counter() - t
    loaded = LoadedModel(model=native, spec=spec, tokenizer=tok, hf_config=hf.config, path=str(path))
    return hf, tok, loaded, {"transformers_load_s": load_s, "native_build_s": build_s}


def prompt_ids(tok, text: str | None) -> list[int]:
    """A chat-templated GSM8K problem (the engine's real workload), or `text` as given."""
    if text is None and getattr(tok, "chat_template", None):
        from arbitrage_fast.eval.datasets import load_dataset

        question = load_dataset("gsm8k", n=None)[GSM8K_PROMPT_INDEX].question
        chat = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                       add_generation_prompt=True)
        return tok(chat, add_special_tokens=False)["input_ids"]
    return tok(text or "Janet has 16 eggs. She eats 3 for breakfast and bakes muffins with 4.")["input_ids"]


def _timed(fn, repeats: int) -> tuple[float, list[int]]:
    """Median seconds of `repeats` calls after one warm-up call, and the last call's tokens."""
    fn()
    times, tokens = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        tokens = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), tokens


def run_quant(args, path: Path, label: str) -> int:
    """Packed vs dequantised bf16 vs llama.cpp on one GGUF file (see the module docstring)."""
    from arbitrage_fast import Engine, EngineConfig, SamplingParams
    from arbitrage_fast.models import gguf_ops
    from arbitrage_fast.models.loader import load_model

    if path.suffix != ".gguf":
        raise SystemExit(f"--quant needs a .gguf model, got {path}")
    n = args.tokens
    record = {"model": label, "format": _file_type(path), "threads": torch.get_num_threads(), "tokens": n,
              "kernel_path": (gguf_ops.cpu_paths() or ["torch reference"])[0]}
    seconds, tokens = {}, {}

    def phases(name: str, generate) -> None:
        """Whole n-token requests, and 1-token ones (the prompt's prefill and one step), as
        llama-bench splits prompt processing from generation: both medians of the repeats."""
        first, _ = _timed(lambda: generate(1), args.repeats)
        seconds[name], tokens[name] = _timed(lambda: generate(n), args.repeats)
        record[f"{name}_prefill_s"] = first
        record[f"{name}_decode_ms"] = 1e3 * (seconds[name] - first) / (n - 1)

    for name, dtype, dequantize in (("engine", "float32", False), ("bf16", "bfloat16", True)):
        loaded = load_model(path, dtype, dequantize=dequantize)
        engine = Engine(EngineConfig(draft=str(path), target=str(path), dtype=dtype, kv_pages=64,
                                     decode_chunk=args.decode_chunk), draft=loaded, target=loaded)
        ids = prompt_ids(loaded.tokenizer, args.prompt)
        phases(name, lambda k: engine.generate(ids, policy="target_only", sampling=SamplingParams(
            max_new_tokens=k, ignore_eos=True, max_step_tokens=k)).token_ids)
        del engine, loaded
    record["prompt_tokens"] = len(ids)
    record["engine_tok_s"], record["bf16_tok_s"] = n / seconds["engine"], n / seconds["bf16"]
    record["llamacpp_tok_s"], record["llamacpp_version"] = None, None
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed (pip install -e \".[bench]\"): llama.cpp not timed", file=sys.stderr)
    else:
        llm = llama_cpp.Llama(model_path=str(path), n_threads=record["threads"], n_ctx=len(ids) + n + 16,
                              verbose=False)

        def run_llamacpp(k: int) -> list[int]:
            llm.reset()
            out = []
            for t in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
                out.append(t)
                if len(out) == k:
                    return out
            return out

        phases("llamacpp", run_llamacpp)
        record["llamacpp_tok_s"], record["llamacpp_version"] = n / seconds["llamacpp"], llama_cpp.__version__
    record["engine_vs_bf16"] = record["engine_tok_s"] / record["bf16_tok_s"]
    if record["llamacpp_tok_s"]:
        record["engine_vs_llamacpp"] = record["engine_tok_s"] / record["llamacpp_tok_s"]
    # Greedy tokens agree at the start; where they part is a near-tie broken by rounding.
    record["tokens_agree_with_bf16"] = next((i for i, (a, b) in enumerate(zip(tokens["engine"], tokens["bf16"]))
                                             if a != b), n)
    record.update(cpu_run_record())
    print(json.dumps(record, indent=2))
    out = RESULTS / "cpu_decode_quant.json"
    rows = json.loads(out.read_text()) if out.is_file() else []
    rows = [r for r in rows if (r["model"], r["threads"]) != (label, record["threads"])] + [record]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def quant_table(rows: list[dict]) -> str:
    """RESULTS.md's table of results/cpu_decode_quant.json (`--render`): whole requests, then the
    prompt's prefill and each later token, the packed path over llama.cpp's time as a ratio."""
    def x(v):
        return f"**{v:.2f}x**" if v is not None else "not measured"

    def per(r, key, scale=1.0):
        return f"{r[f'engine_{key}'] * scale:.0f} / {r[f'llamacpp_{key}'] * scale:.0f}" if r.get(f"llamacpp_{key}") else "-"

    head = ["model", "file types (by bytes)", "threads (kernel)", "packed tok/s", "bf16 tok/s", "llama.cpp tok/s",
            "packed / bf16", "packed / llama.cpp", "prefill ms, packed / llama.cpp", "ms per later token, packed / llama.cpp",
            "greedy tokens equal to bf16's"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        llama = f"{r['llamacpp_tok_s']:.2f}" if r.get("llamacpp_tok_s") else "not measured"
        lines.append("| " + " | ".join([
            r["model"], r["format"], f"{r['threads']} ({r.get('kernel_threads', '?')})", f"{r['engine_tok_s']:.2f}",
            f"{r['bf16_tok_s']:.2f}", llama, x(r["engine_vs_bf16"]), x(r.get("engine_vs_llamacpp")),
            per(r, "prefill_s", 1e3), per(r, "decode_ms"), f"{r['tokens_agree_with_bf16']} of {r['tokens']}"]) + " |")
    return "\n".join(lines)


def _file_type(path: Path) -> str:
    """The GGUF's types by share of quantized bytes, e.g. "Q5_0 71% + Q8_0 ...". """
    from arbitrage_fast.models.gguf_directory import GGUFDirectory

    sizes: dict[str, int] = {}
    for t in GGUFDirectory(path).tensors.values():
        sizes[t.qtype.name] = sizes.get(t.qtype.name, 0) + t.n_bytes
    total = sum(sizes.values())
    return " + ".join(f"{k} {100 * v / total:.0f}%" for k, v in sorted(sizes.items(), key=lambda kv: -kv[1]) if v / total > 0.01)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF folder or .gguf file")
    ap.add_argument("--preset", help="a preset name (qwen2.5-coder); see --role")
    ap.add_argument("--role", default="draft", choices=["draft", "target"], help="which model of the preset")
    ap.add_argument("--tiny", action="store_true", help="time a random 8-layer, 512-wide Llama")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds of each side (alternating)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--decode-chunk", type=int, default=1, help="EngineConfig.decode_chunk")
    ap.add_argument("--prompt", default=None, help="plain-text prompt (default: a chat-templated GSM8K problem)")
    ap.add_argument("--quant", action="store_true",
                    help="GGUF: packed weights vs dequantised bf16 vs llama.cpp (results/cpu_decode_quant.json)")
    add_render_flag(ap)
    args = ap.parse_args()
    if rendered(args, quant_table):
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    from arbitrage_fast import Engine, EngineConfig, SamplingParams

    path, label, _tmp = resolve_path(args)
    if args.quant:
        return run_quant(args, path, label)
    dtype = getattr(torch, args.dtype)
    hf, tok, loaded, load_times = load_both(path, dtype)
    hf.generation_config.eos_token_id = None  # exactly n tokens on both sides, same argmax rule
    engine = Engine(EngineConfig(draft=str(path), target=str(path), dtype=args.dtype, kv_pages=64,
                                 decode_chunk=args.decode_chunk), draft=loaded, target=loaded)
    ids = prompt_ids(tok, args.prompt)
    n = args.tokens
    sp = SamplingParams(max_new_tokens=n, ignore_eos=True, max_step_tokens=n)
    x = torch.tensor([ids])

    def run_hf():
        with torch.inference_mode():
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False)
        return out[0, len(ids):].tolist()

    def run_engine():
        return engine.generate(ids, policy="target_only", sampling=sp).token_ids

    times = {"transformers": [], "engine": []}
    cpu = {"transformers": [], "engine": []}  # process CPU seconds: less swayed by other jobs' load
    tokens = {}
    run_hf(), run_engine()  # warm-up: first-call allocations and oneDNN primitive creation
    for _ in range(args.repeats):
        for name, fn in (("transformers", run_hf), ("engine", run_engine)):
            t, c = time.perf_counter(), time.process_time()
            tokens[name] = fn()
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        **cpu_run_record(), "model": label, "dtype": args.dtype, "prompt_tokens": len(ids), "tokens": n,
        "decode_chunk": args.decode_chunk, **load_times,
        "transformers_tok_s": n / med["transformers"], "engine_tok_s": n / med["engine"],
        "speedup": med["transformers"] / med["engine"],
        "speedup_best": min(times["transformers"]) / min(times["engine"]),
        "cpu_time_speedup": statistics.median(cpu["transformers"]) / statistics.median(cpu["engine"]),
        "seconds": times, "cpu_seconds": cpu, "tokens_identical": tokens["transformers"] == tokens["engine"],
    }
    print(json.dumps(result, indent=2))
    write_json(result, RESULTS, f"cpu_decode_{label}_{args.dtype}_t{result['threads']}.json")
    return 0 if result["tokens_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
