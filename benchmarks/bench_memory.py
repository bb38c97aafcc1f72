"""Resident memory of each GGUF model loaded packed (the default) and dequantised, against its file size.

A packed load keeps the quantized tensors in their stored blocks, so its weights should take
about the file's size (goal: at most 1.1x); a dequantised load widens them to the model's
float dtype. Each load runs in a fresh process, so one load's freed memory cannot hide in
another's peak, and the process reports:

  weight bytes    every tensor the model holds, each storage once (a tied LM head once)
  RSS after load  resident set once the model is built, every weight page read (a mapped
                  weight is resident only once read) and garbage collected
  peak RSS        getrusage's ru_maxrss over the whole process, the load's transient copies
                  included (a first dequantised load parses the GGUF through transformers)

each also as a ratio to the file size. A process that imports torch, transformers and the
loader and loads nothing gives the baseline every RSS includes (mostly torch's libraries);
the peak less that baseline, over the file size, is about what the load itself took at most.
A dequantised load reads the safetensors folder kept for the file (`gguf_cache`) when there is
one; when there is not, the first load parses the GGUF and writes it, and the load is measured
again from the folder, so both rows appear. `--parse` adds a dequantised load with that cache
off, the parse every first load pays (minutes for the 1.5B on two cores).

    python benchmarks/bench_memory.py [GGUF ...] [--dtype bfloat16] [--parse]   # default: the qwen2.5-coder pair
    python benchmarks/bench_memory.py --report results/memory.json
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from _harness import RESULTS, cpu_run_record, write_json  # noqa: E402

from arbitrage_fast.models import gguf_cache  # noqa: E402

GOAL = 1.1  # packed weight bytes / file bytes


def _held(model: torch.nn.Module) -> dict[object, torch.Tensor | torch.UntypedStorage]:
    """Every storage `model` holds, once each (a tied LM head once). A oneDNN-packed weight is
    an opaque tensor without a storage, kept outside parameters and buffers
    (cpu_linear.PackedLinear): it is found among the modules' attributes."""
    held: dict[object, torch.Tensor | torch.UntypedStorage] = {}
    for module in model.modules():
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False),
                   *(v for v in vars(module).values() if isinstance(v, torch.Tensor))]
        for t in tensors:
            if t.is_mkldnn:
                held[("mkldnn", id(t))] = t
            else:
                held[t.untyped_storage().data_ptr()] = t.untyped_storage()
    return held


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(s.nbytes() if isinstance(s, torch.UntypedStorage) else s.numel() * s.element_size()
               for s in _held(model).values())


def read_every_page(model: torch.nn.Module) -> None:
    """Read a byte of every 4 KiB page of every storage. A dequantised load maps its safetensors
    folder, and a mapped page counts in RSS only once read, as the first forward reads it; so
    both loads are measured as models ready to run."""
    for s in _held(model).values():
        if isinstance(s, torch.UntypedStorage):
            int(torch.empty(0, dtype=torch.uint8).set_(s)[::4096].sum())


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib * 1024


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _import_what_a_load_imports() -> None:
    import transformers  # noqa: F401  (the loader reads configs and tokenizers through it)

    import arbitrage_fast._C  # noqa: F401
    from arbitrage_fast.models import gguf_packed, loader  # noqa: F401


def child(path: str | None, mode: str, dtype: str) -> dict:
    """One measurement, run in a process of its own (`--child`)."""
    _import_what_a_load_imports()
    if path is None:
        return {"rss_after_load": _rss_bytes(), "peak_rss": _peak_rss_bytes()}
    from arbitrage_fast.models.loader import load_model, resolve_dtype

    source = "packed blocks"
    if mode == "dequantised":
        if not gguf_cache.enabled():
            source = "GGUF parse, cache off"
        elif gguf_cache.is_complete(gguf_cache.folder_for(Path(path), resolve_dtype(dtype))):
            source = "safetensors cache"
        else:
            source = "GGUF parse, folder written"
    start = time.perf_counter()
    model = load_model(path, dtype, dequantize=mode == "dequantised").model
    load_s = time.perf_counter() - start
    read_every_page(model)
    gc.collect()
    return {"mode": mode, "source": source, "load_s": round(load_s, 1), "weight_bytes": weight_bytes(model),
            "rss_after_load": _rss_bytes(), "peak_rss": _peak_rss_bytes()}


def in_fresh_process(path: Path | None, mode: str, dtype: str, cache: bool = True) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--dtype", dtype] + ([str(path)] if path else [])
    env = {**os.environ, **({} if cache else {gguf_cache.ENV: "0"})}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def default_models() -> list[Path]:
    from arbitrage_fast.presets import resolve

    pair = resolve("qwen2.5-coder")
    return [Path(pair.draft), Path(pair.target)]


def run(args) -> dict:
    record = {**cpu_run_record(), "dtype": args.dtype, "torch": torch.__version__,
              "baseline": in_fresh_process(None, "baseline", args.dtype), "models": []}
    base = record["baseline"]["peak_rss"]
    print(f"baseline (imports only): peak RSS {_mb(base)}", flush=True)
    for path in args.models or default_models():
        entry = {"model": path.stem, "path": str(path), "file_bytes": path.stat().st_size, "loads": []}
        record["models"].append(entry)

        def measure(mode: str, cache: bool = True) -> str:
            entry["loads"].append(in_fresh_process(path, mode, args.dtype, cache))
            print(render_row(entry, entry["loads"][-1], base), flush=True)
            return entry["loads"][-1]["source"]

        measure("packed")
        if measure("dequantised") == "GGUF parse, folder written":
            measure("dequantised")  # the folder exists now: the load users see from then on
        if args.parse:
            measure("dequantised", cache=False)
    return record


HEADER = ("| model | file | load | weights | weights / file | RSS after load | peak RSS | peak / file "
          "| (peak - baseline) / file | load s |\n|---|---|---|---|---|---|---|---|---|---|")


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB"


def render_row(entry: dict, load: dict, baseline: int) -> str:
    size = entry["file_bytes"]
    how = "packed" if load["mode"] == "packed" else f"dequantised ({load['source']})"
    return (f"| {entry['model']} | {_mb(size)} | {how} | {_mb(load['weight_bytes'])} | "
            f"{load['weight_bytes'] / size:.2f}x | {_mb(load['rss_after_load'])} | {_mb(load['peak_rss'])} | "
            f"{load['peak_rss'] / size:.2f}x | {(load['peak_rss'] - baseline) / size:.2f}x | {load['load_s']} |")


def render(record: dict) -> str:
    base = record["baseline"]["peak_rss"]
    rows = [render_row(e, load, base) for e in record["models"] for load in e["loads"]]
    verdicts = []
    for e in record["models"]:
        ratio = next(load["weight_bytes"] for load in e["loads"] if load["mode"] == "packed") / e["file_bytes"]
        verdicts.append(f"{e['model']} {ratio:.2f}x ({'met' if ratio <= GOAL else 'not met'})")
    return "\n".join([f"{record['dtype']} for the float tensors; every RSS includes the {_mb(base)} peak of a "
                      "process that imports torch, transformers and the loader and loads nothing.", "",
                      HEADER, *rows, "",
                      f"Packed weights / file size (goal <= {GOAL}x): " + "; ".join(verdicts) + "."])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", type=Path, help="GGUF files (default: the qwen2.5-coder pair)")
    ap.add_argument("--dtype", default="bfloat16", help="dtype of the float tensors and of a dequantised load")
    ap.add_argument("--parse", action="store_true",
                    help="also load dequantised with the safetensors cache off: the GGUF parse a first load does")
    ap.add_argument("--report", default=None, metavar="JSON", help="print a finished run's table and exit")
    ap.add_argument("--child", choices=("baseline", "packed", "dequantised"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(str(args.models[0]) if args.models else None, args.child, args.dtype)))
        return
    if args.report:
        print(render(json.loads(Path(args.report).read_text())))
        return
    for path in args.models:
        if not path.is_file() or path.suffix != ".gguf":
            raise SystemExit(f"{path}: not a .gguf file")
    record = run(args)
    path = write_json(record, RESULTS, "memory.json")
    print(render(record))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
