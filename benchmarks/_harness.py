"""Timing and bookkeeping shared by the benchmarks.

On a GPU, time is read from CUDA events recorded around each repeat and collected after one
synchronisation at the very end, so nothing inside a timed region waits for the device; on
the CPU, perf_counter. Variants are interleaved repeat by repeat (A B A B ...), so drift in
clocks or machine load hits each alike, and the median is reported.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"

# Peak HBM bandwidth (bytes/s) by a substring of torch.cuda.get_device_name(); first match wins.
PEAK_BANDWIDTH = (
    ("H200", 4.8e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM
    ("A100 80GB", 2.0e12),
    ("A100-SXM4-80GB", 2.0e12),
    ("A100-PCIE-80GB", 2.0e12),
)


@dataclass
class Timing:
    median_s: float
    min_s: float
    mean_s: float
    samples: list[float]


def common_args(parser: argparse.ArgumentParser, repeats: int = 5, warmup: int = 2) -> None:
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, seconds end to end")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present; cpu for --smoke)")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed repeats (the median is reported)")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed repeats first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where the JSON goes")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's; 1 for --smoke, whose tiny shapes "
                             "only lose to OpenMP hand-offs on a busy machine)")


def resolve_device(arg: str | None, smoke: bool, threads: int | None = None) -> torch.device:
    """The device to run on; also sets torch's CPU thread count (see --threads)."""
    if threads or smoke:
        torch.set_num_threads(threads or 1)
    if arg:
        device = torch.device(arg)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda was asked for but torch sees no CUDA device")
        return device
    return torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """A file-name-safe name for the device: nvidia_h200, cpu."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name(device).lower()).strip("_")


def peak_bandwidth(device: torch.device, override: float | None = None) -> float | None:
    """Peak memory bandwidth in bytes/s: --peak-bw if given, else the table, else None."""
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in PEAK_BANDWIDTH if key in name), None)


def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return dict(
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"), device=device_name(device),
        torch=torch.__version__, cuda=torch.version.cuda, triton=triton_version,
        python=platform.python_version(), cpu_count=os.cpu_count(),
    )


def cpu_run_record() -> dict:
    """Where and how a CPU benchmark ran: the fields every CPU result records. The load
    average is kept because a shared machine's load sways wall-clock times."""
    import sys
    from datetime import date

    try:
        from arbitrage_fast import _C
        kernel_threads = _C.kernel_threads()  # what the native kernels' loops actually run on
    except ImportError:
        kernel_threads = None
    return {"date": date.today().isoformat(), "command": "python " + " ".join(sys.argv),
            "machine": f"{platform.machine()}, {os.cpu_count()} cpus", "threads": torch.get_num_threads(),
            "kernel_threads": kernel_threads, "load_avg_1m": os.getloadavg()[0]}


def time_variants(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int,
                  reset: Callable[[], None] | None = None) -> dict[str, Timing]:
    """Time each callable `repeats` times, interleaved; `reset` runs before every call, untimed.

    A callable should enqueue its work and return without reading results back: on a GPU the
    events bracket only device time between the enqueue of its first and last kernel.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    cuda = device.type == "cuda"
    for _ in range(warmup):
        for fn in fns.values():
            if reset:
                reset()
            fn()
    synchronize(device)
    marks: dict[str, list] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if reset:
                reset()
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                marks[name].append((start, end))
            else:
                t = time.perf_counter()
                fn()
                marks[name].append(time.perf_counter() - t)
    synchronize(device)
    out = {}
    for name, ms in marks.items():
        samples = [s.elapsed_time(e) / 1e3 for s, e in ms] if cuda else ms
        out[name] = Timing(statistics.median(samples), min(samples), statistics.fmean(samples), samples)
    return out


def timing_dict(t: Timing, per: int = 1) -> dict:
    """A Timing as JSON fields, divided by `per` (e.g. tokens per repeat)."""
    d = asdict(t)
    return {k: ([x / per for x in v] if isinstance(v, list) else v / per) for k, v in d.items()}


def add_render_flag(parser: argparse.ArgumentParser) -> None:
    """`--render JSON`: print the Markdown table of a finished run and exit (see `rendered`)."""
    parser.add_argument("--render", type=Path, default=None, metavar="JSON",
                        help="print the Markdown table of a finished run and exit")


def rendered(args, table: Callable[[object], str]) -> bool:
    """With --render, print `table` of that run's JSON and say so (the caller then exits)."""
    if args.render is None:
        return False
    print(table(json.loads(Path(args.render).read_text())))
    return True


def write_json(payload, out_dir: Path, name: str) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    # Written aside and renamed: a run killed mid-write leaves the previous whole file.
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    tmp.replace(path)
    return path


class ResultFile:
    """A benchmark's JSON, rewritten after every row: a run cut short by a timeout or a crash
    in a later row keeps every row it finished. `payload` is the list of rows, or a dict whose
    sections the benchmark fills in; call `save()` after each change (`append` does)."""

    def __init__(self, payload, out_dir: Path, name: str) -> None:
        self.payload, self.out_dir, self.name = payload, out_dir, name
        self.path = self.save()

    def save(self) -> Path:
        return write_json(self.payload, self.out_dir, self.name)

    def append(self, row: dict) -> None:
        self.payload.append(row)
        self.save()


def error_row(exc: BaseException, **fields) -> dict:
    """A row that failed: what it was, and why; no speed and no roofline fraction."""
    return dict(fields, error=f"{type(exc).__name__}: {exc}")


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, (Path, torch.device, torch.dtype)):
        return str(x)
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def free_device_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed_generate(engine, prompt, policy, threshold, sampling):
    """One chat-templated request: (result, wall seconds, process CPU seconds)."""
    t, c = time.perf_counter(), time.process_time()
    res = engine.generate(prompt, policy=policy, threshold=threshold, sampling=sampling, chat=True)
    return res, time.perf_counter() - t, time.process_time() - c


# --- whole requests through one engine, two ways, alternating (bench_layer_op, bench_engine_thread)


def add_requests_ab_args(parser: argparse.ArgumentParser, results_prefix: str) -> None:
    """The options of an A/B over whole greedy requests on one preset's draft model."""
    parser.add_argument("--preset", default="qwen2.5-coder", help="the preset whose draft model is timed")
    parser.add_argument("--model", default=None, help="a checkpoint instead of the preset's draft")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--dequantize", action="store_true", help="a GGUF dequantised to --dtype (16-bit linears)")
    parser.add_argument("--rows", default="1,8", help="requests decoded at once, comma-separated")
    parser.add_argument("--tokens", type=int, default=64, help="tokens each request decodes")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--name", default=None,
                        help=f"results/{results_prefix}_<name>.json (default: the model's name)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    add_render_flag(parser)


def requests_ab_engine(args):
    """(engine, model path, prompts) for `add_requests_ab_args`' options: the model as draft and
    target, exact arithmetic off (one compiled op per layer on the CPU), GSM8K test prompts."""
    from arbitrage_fast import Engine, EngineConfig
    from arbitrage_fast.eval.datasets import load_dataset
    from arbitrage_fast.presets import resolve

    path = args.model or resolve(args.preset).draft
    engine = Engine(EngineConfig(draft=path, target=path, dtype=args.dtype, dequantize=args.dequantize,
                                 exact_arithmetic=False))
    n = max(int(r) for r in args.rows.split(","))
    return engine, path, [i.prompt for i in load_dataset("gsm8k", n=n, split="test", seed=0)]


def requests_ab_rows(out: "ResultFile", args, variants: Callable[[int], dict], warm_up: Callable[[int], object],
                     ours: str, baseline: str, table: Callable[[object], str]) -> None:
    """One result row per `--rows` value: `warm_up(rows)`, then `alternating_ab` over
    `variants(rows)`; the file is saved and the table printed after each row."""
    for rows in (int(r) for r in args.rows.split(",")):
        warm_up(rows)
        out.payload["rows"].append(alternating_ab(variants(rows), args.repeats, rows, args.tokens, ours, baseline))
        out.save()
        print(table(out.payload), flush=True)
    print(f"wrote {out.path}")


def alternating_ab(run: dict[str, Callable[[], tuple[float, object]]], repeats: int, rows: int, tokens: int,
                   ours: str, baseline: str) -> dict:
    """A result row: each variant run `repeats` times, the order swapped every repeat (A B, B A,
    ...) so a shared machine's load hits both alike. `run[v]()` returns (seconds, outputs); the
    speed-up is a paired bootstrap of `baseline`'s times over `ours`."""
    from arbitrage_fast.eval.intervals import paired_bootstrap

    names = list(run)
    times = {v: [] for v in names}
    identical = True
    for rep in range(repeats):
        outputs = {}
        for v in names if rep % 2 == 0 else names[::-1]:
            seconds, outputs[v] = run[v]()
            times[v].append(seconds)
        identical &= all(o == outputs[names[0]] for o in outputs.values())
    return {"rows": rows, "tokens": tokens, **{f"{v}_s": times[v] for v in names},
            "tok_s": {v: rows * tokens * len(times[v]) / sum(times[v]) for v in names},
            "speedup": paired_bootstrap(times[ours], times[baseline], "speedup"), "identical": identical}
