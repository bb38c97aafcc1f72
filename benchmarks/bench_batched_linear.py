"""What a batch of decode rows costs a linear layer on the CPU, per implementation, in one run.

Continuous batching pays off only if a forward over B rows costs far less than B forwards of
one row: the weight is read once for all of them. This times the layers of a real model's
shapes for B = 1, 4, 8, 16 rows with each CPU implementation the engine can run:

  torch_bf16   F.linear on bf16 weights (the reference; on CPUs without native bf16 it
               converts and multiplies row by row)
  onednn_packed_bf16  the same weights packed once for oneDNN (cpu_linear.PackedLinear), the
               bf16 layer the engine runs where oneDNN has native bf16
  kernel_bf16  torch.ops.arbitrage_fast.bf16_linear (csrc/bf16_linear.cpp)
  gguf_<type>  torch.ops.arbitrage_fast.gguf_linear on the same shape in a GGUF block format
               (gguf_<type>_avx2: the same blocks through the AVX2 kernels, beside the 512-bit
               ones on an AVX-512 VNNI CPU)
  int3_g64     torch.ops.arbitrage_fast.int3_linear (csrc/int3_linear.cpp): quantize-on-load
               int3's CPU blocks, which replaced Q4_1 blocks of the same values; its time is
               also reported over gguf_Q4_1's (3.5 bits a weight read against 5)

and reports, per implementation and shape, the time of B rows over the time of one row (the
batching cost; 1.0 would be free) and each implementation's time over torch_bf16's. Repeats
are interleaved across implementations (benchmarks/_harness.py), so machine load hits each
alike. Shapes default to Qwen2.5-0.5B's (hidden 896, MLP 4864, vocabulary 151,936).

    python benchmarks/bench_batched_linear.py [--threads 2] [--rows 1,4,8,16]
    python benchmarks/bench_batched_linear.py --threads 1 --shapes gate_up   # int3 vs Q4_1, quick
    python benchmarks/bench_batched_linear.py --report results/batched_linear.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from _harness import RESULTS, cpu_run_record, time_variants, write_json  # noqa: E402

SHAPES = {"qkv": (1152, 896), "o": (896, 896), "gate_up": (9728, 896), "down": (896, 4864),
          "lm_head": (151936, 896)}


def implementations(n: int, k: int, gen: torch.Generator) -> dict:
    """Each implementation as x -> x @ W.T over one [n, k] weight (GGUF blocks are random:
    the kernels' time does not depend on the values)."""
    from arbitrage_fast.models import gguf_ops, int3_blocks
    from arbitrage_fast.models.gguf_random import random_blocks

    from arbitrage_fast.models.cpu_linear import pack, packing_supported

    w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    impls = {"torch_bf16": lambda x: F.linear(x, w), "kernel_bf16": lambda x: torch.ops.arbitrage_fast.bf16_linear(x, w)}
    if packing_supported(w.device, w.dtype):  # oneDNN runs bf16 natively: the layer the engine runs
        dense = nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
        dense.weight.data.copy_(w)
        impls["onednn_packed_bf16"] = pack(dense)
    wide = "avx512_vnni" in gguf_ops.cpu_paths()
    for name in ("Q8_0", "Q5_0", "Q6_K", "Q4_K", "Q4_1"):
        qtype = gguf_ops.TYPE_IDS[name]
        if k % gguf_ops.block_shape(qtype)[0]:
            continue
        blocks = random_blocks(qtype, n, k, gen)
        impls[f"gguf_{name}"] = lambda x, b=blocks, q=qtype: gguf_ops.gguf_linear(x, b, q)
        if wide and name != "Q4_1":  # the 512-bit kernels beside the 256-bit AVX2 ones
            impls[f"gguf_{name}_avx2"] = lambda x, b=blocks, q=qtype: torch.ops.arbitrage_fast.gguf_linear(x, b, q, "avx2")
    if k % 32 == 0:
        groups = -(-k // 64)
        int3 = int3_blocks.pack(torch.randint(0, 8, (n, k), generator=gen), torch.full((n, groups), 0.01).half(),
                                torch.full((n, groups), -0.03).half(), 64)
        impls["int3_g64"] = lambda x, b=int3: int3_blocks.int3_linear(x, b, 64)
    return impls


def run(args) -> dict:
    import arbitrage_fast._C  # noqa: F401 - registers the ops

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows = [int(r) for r in args.rows.split(",")]
    record = {**cpu_run_record(), "rows": rows, "shapes": {}}
    for shape in args.shapes.split(","):
        n, k = SHAPES[shape]
        impls = implementations(n, k, gen)
        xs = {b: torch.randn(b, k, generator=gen).to(torch.bfloat16) for b in rows}
        fns = {f"{name}@{b}": (lambda f=f, x=xs[b]: f(x)) for name, f in impls.items() for b in rows}
        timings = time_variants(fns, torch.device("cpu"), args.repeats, args.warmup)
        record["shapes"][shape] = {"n": n, "k": k, "median_s": {key: t.median_s for key, t in timings.items()}}
        print(render_shape(shape, record["shapes"][shape], rows), flush=True)
    return record


def render_shape(shape: str, entry: dict, rows: list[int]) -> str:
    med = entry["median_s"]
    names = sorted({key.split("@")[0] for key in med}, key=lambda s: (s != "torch_bf16", s))
    lines = [f"{shape} [{entry['n']} x {entry['k']}]: time of B rows / time of 1 row; then time at "
             f"B={rows[0]} and B={rows[-1]} / torch_bf16's",
             "| implementation | " + " | ".join(f"B={b}" for b in rows) + f" | B={rows[0]} vs torch | B={rows[-1]} vs torch |",
             "|---|" + "---|" * (len(rows) + 2)]
    for name in names:
        one = med[f"{name}@{rows[0]}"]
        cells = [f"{med[f'{name}@{b}'] / one:.2f}" for b in rows]
        first = med[f"{name}@{rows[0]}"] / med[f"torch_bf16@{rows[0]}"]
        last = med[f"{name}@{rows[-1]}"] / med[f"torch_bf16@{rows[-1]}"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {first:.2f} | {last:.2f} |")
    if "int3_g64" in names and "gguf_Q4_1" in names:
        lines.append("int3_g64 time / gguf_Q4_1 time: " + ", ".join(
            f"B={b} {med[f'int3_g64@{b}'] / med[f'gguf_Q4_1@{b}']:.2f}" for b in rows))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,4,8,16")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--report", default=None, metavar="JSON", help="print a finished run's tables and exit")
    ap.add_argument("--name", default="batched_linear", help="results/NAME.json")
    args = ap.parse_args()
    if args.report:
        record = json.loads(Path(args.report).read_text())
        print("\n\n".join(render_shape(s, e, record["rows"]) for s, e in record["shapes"].items()))
        return
    path = write_json(run(args), RESULTS, f"{args.name}.json")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
