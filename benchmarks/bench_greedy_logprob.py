"""The greedy token, its log-prob and the entropy per decode row: the compiled op against torch's ops.

Every greedy decode row takes the argmax of its logits and the chosen token's log-prob, and a
row whose step feeds router features its entropy too; over a ~150k vocabulary torch reads the
row six times for the first two (argmax, then log-sum-exp's max, subtract, exp, sum) and four
more for the entropy. `torch.ops.arbitrage_fast.greedy_logprob` reads it twice either way. Timed
interleaved on the same fp32 logits for a few row counts, without and with the entropy (the
tokens must agree):

    python benchmarks/bench_greedy_logprob.py --vocab 151936 --rows 1,8 --repeats 200
    python benchmarks/bench_greedy_logprob.py --render benchmarks/results/greedy_logprob.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from _harness import RESULTS, add_render_flag, cpu_run_record, rendered, time_variants, write_json  # noqa: E402


def table(payload: dict) -> str:
    lines = ["| rows | vocab | entropy | torch µs | op µs | op speed-up | same tokens |",
             "|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        lines.append(f"| {r['rows']} | {r['vocab']} | {'yes' if r['entropy'] else 'no'} | {r['torch_us']:.0f} "
                     f"| {r['op_us']:.0f} "
                     f"| {r['torch_us'] / r['op_us']:.2f}x | {'yes' if r['same_tokens'] else '**no**'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    add_render_flag(ap)
    args = ap.parse_args(argv)
    if rendered(args, table):
        return 0
    from arbitrage_fast.runtime.sampler import token_statistics

    out = {"run": cpu_run_record(), "rows": []}
    for rows in (int(r) for r in args.rows.split(",")):
        logits = torch.randn(rows, args.vocab, generator=torch.Generator().manual_seed(rows)) * 5
        for entropy in (False, True):

            def torch_ops(entropy=entropy):
                tokens = logits.argmax(-1)
                return tokens, *token_statistics(logits, tokens, entropy=entropy)

            def op(entropy=entropy):
                return torch.ops.arbitrage_fast.greedy_logprob(logits, entropy)

            times = time_variants({"torch": torch_ops, "op": op}, torch.device("cpu"), args.repeats, warmup=5)
            out["rows"].append({"rows": rows, "vocab": args.vocab, "entropy": entropy,
                                "torch_us": times["torch"].median_s * 1e6, "op_us": times["op"].median_s * 1e6,
                                "same_tokens": torch.equal(torch_ops()[0], op()[0])})
    path = write_json(out, args.out_dir, "greedy_logprob.json")
    print(table(out))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
