"""Answers per second at a measured accuracy: the servers solve the same test problems under
concurrent load, every answer is graded, and throughput and accuracy are compared in one run.

`bench_serving.py` times a fixed number of tokens per request (ignore_eos), which says nothing
of the answers. Here each request is a test problem in the instruct models' prompt shape (the
chat template and Qwen's step-by-step instruction), generation stops where the server's model
stops (or at `--max-tokens`), and the answer is graded against the gold one. The problems are
taken in blocks of `--block`: each block is sent to one server at a time, all its problems at
once (one client each), and to every server in turn, the order rotating every block, so drift in
the machine's load hits each server alike. A block's wall time is the server's time to answer
those problems under that load.

Reported per server: accuracy with its Wilson interval, answers that hit the cap, answers/s and
tokens/s; against the reference server (`--reference`, vLLM by default): the answers/s ratio
with a paired bootstrap interval over blocks, the accuracy difference with a paired bootstrap
interval over problems, and whether the two are matched (that interval holds 0).

    python benchmarks/bench_serving_answers.py --preset qwen2.5-coder \\
        --servers vllm,batched:arbitrage@0.709+dense-rows=4 \\
        --vllm-python /opt/vllm/bin/python --vllm-model DIR --dataset gsm8k --n 48

The JSON (benchmarks/results/serving_answers_<name>.json) is rewritten after every block and
holds every answer's text; `--report JSON` prints a finished run's table.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from _harness import RESULTS, cpu_run_record, write_json  # noqa: E402
from bench_serving import (  # noqa: E402
    free_port, one_request, serve_command, server_args, server_argv, start, vllm_argv, vllm_version)


def drive_block(url: str, bodies: list[dict]) -> dict:
    """All `bodies` sent at once, one client each; the block's wall time and each request's record
    in the order of `bodies` (None where it failed, with the error listed)."""
    records: list[dict | None] = [None] * len(bodies)
    errors: list[str] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=3600) as http:
            try:
                records[i] = one_request(http, bodies[i])
            except Exception as e:  # noqa: BLE001 - recorded; the server's figures are then refused
                with lock:
                    errors.append(f"problem {i}: {type(e).__name__}: {e}")

    start_s = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"wall_s": time.perf_counter() - start_s, "records": records, "errors": errors}


def graded(items: list, records: list[dict | None]) -> list[dict]:
    """One entry per problem: its id, whether the answer reaches the gold one, and the request's
    figures and text (a failed request counts as no answer)."""
    from arbitrage_fast.eval.grading import grade

    out = []
    for item, rec in zip(items, records, strict=True):
        if rec is None:
            out.append({"item": item.id, "correct": False, "failed": True})
            continue
        out.append({"item": item.id, "correct": grade(rec["text"], item.answer), "tokens": rec["tokens"],
                    "latency_s": rec["latency_s"], "finish_reason": rec["finish_reason"], "text": rec["text"]})
    return out


def summarise(blocks: list[dict], reference: str | None) -> list[dict]:
    """Per server over the blocks every server finished: accuracy, answers/s, tokens/s and, against
    `reference`, the paired ratio and difference with their intervals. A server with a failed
    request gets no figures (its row says so)."""
    from arbitrage_fast.eval.intervals import paired_bootstrap, wilson_interval

    servers = list(dict.fromkeys(b["server"] for b in blocks))
    by = {(b["server"], b["block"]): b for b in blocks}
    done = sorted(k for k in {b["block"] for b in blocks} if all((s, k) in by for s in servers))
    out = []
    for server in servers:
        mine = [by[(server, k)] for k in done]
        failures = [e for b in mine for e in b["errors"]]
        entry = {"server": server, "blocks": len(mine)}
        if failures or not mine:
            entry["failed"] = failures or ["no block finished on every server"]
            out.append(entry)
            continue
        answers = [a for b in mine for a in b["answers"]]
        correct = sum(a["correct"] for a in answers)
        wall = sum(b["wall_s"] for b in mine)
        entry.update(problems=len(answers), correct=correct, accuracy=correct / len(answers),
                     accuracy_ci=list(wilson_interval(correct, len(answers))),
                     capped=sum(a["finish_reason"] == "length" for a in answers),
                     tokens=sum(a["tokens"] for a in answers), wall_s=wall, answers_s=len(answers) / wall,
                     tok_s=sum(a["tokens"] for a in answers) / wall)
        theirs = [by[(reference, k)] for k in done] if reference in servers and server != reference else None
        if theirs and not any(b["errors"] for b in theirs):
            # Wall seconds per block: the speed-up of their sums is the answers/s ratio (the
            # blocks hold the same problems on both servers).
            value, low, high = paired_bootstrap([b["wall_s"] for b in mine], [b["wall_s"] for b in theirs], "speedup")
            entry["answers_s_vs_reference"] = value
            entry["answers_s_vs_reference_ci"] = [low, high] if len(mine) > 1 else None
            ref_answers = [a for b in theirs for a in b["answers"]]
            diff, d_low, d_high = paired_bootstrap([float(a["correct"]) for a in answers],
                                                   [float(a["correct"]) for a in ref_answers], "difference")
            entry.update(accuracy_diff=diff, accuracy_diff_ci=[d_low, d_high], matched=d_low <= 0 <= d_high)
        out.append(entry)
    return out


def render(out: dict) -> str:
    """The run's table (what RESULTS.md shows), from its JSON."""
    ref = out["reference"]
    lines = [f"| server | problems | accuracy [95% CI] | capped | answers/s | tok/s | answers/s vs {ref} [95% CI] "
             f"| accuracy − {ref} [95% CI] | matched |", "|---|---|---|---|---|---|---|---|---|"]
    for e in out["summary"]:
        if "failed" in e:
            lines.append(f"| {e['server']} | failed: {'; '.join(e['failed'])[:100]} ||||||||")
            continue
        low, high = e["accuracy_ci"]
        row = [e["server"], str(e["problems"]), f"{e['accuracy']:.3f} [{low:.3f}, {high:.3f}]", str(e["capped"]),
               f"{e['answers_s']:.4f}", f"{e['tok_s']:.1f}"]
        if "answers_s_vs_reference" in e:
            ci = e["answers_s_vs_reference_ci"]
            row.append(f"{e['answers_s_vs_reference']:.2f}x" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""))
            d_low, d_high = e["accuracy_diff_ci"]
            row += [f"{e['accuracy_diff']:+.3f} [{d_low:+.3f}, {d_high:+.3f}]", "yes" if e["matched"] else "no"]
        else:
            row += ["", "", ""]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    server_args(ap)
    ap.add_argument("--servers", default="vllm,batched:target_only",
                    help="servers in order: vllm, or batched:POLICY[@THRESHOLD][+FLAG[=VALUE]...] as in "
                         "bench_serving.py")
    ap.add_argument("--reference", default="vllm", help="the server the others are compared with")
    ap.add_argument("--dataset", default="gsm8k", choices=("gsm8k", "math500"))
    ap.add_argument("--n", type=int, default=48, help="test problems (a multiple of --block)")
    ap.add_argument("--block", type=int, default=8, help="problems in flight at once")
    ap.add_argument("--max-tokens", type=int, default=400)
    ap.add_argument("--name", default="answers")
    ap.add_argument("--report", default=None, metavar="JSON", help="print a finished run's table and exit")
    args = ap.parse_args(argv)
    if args.report:
        print(render(json.loads(Path(args.report).read_text())))
        return 0
    if args.block < 1 or args.n < args.block or args.n % args.block:
        raise SystemExit(f"--n {args.n} must be a positive multiple of --block {args.block}")
    names = [n for n in args.servers.split(",") if n]
    if args.reference not in names:
        raise SystemExit(f"--reference {args.reference!r} is not among --servers {names}")
    if "vllm" in names and not (args.vllm_python and args.vllm_model):
        raise SystemExit("the vllm server needs --vllm-python and --vllm-model")

    from arbitrage_fast.eval.datasets import load_dataset
    from arbitrage_fast.presets import STEP_BY_STEP_BOXED

    items = load_dataset(args.dataset, n=args.n, split="test", seed=0, instruction=STEP_BY_STEP_BOXED)
    if len(items) < args.n:
        raise SystemExit(f"{args.dataset}'s test split has {len(items)} problems, fewer than --n {args.n}")
    bodies = [{"messages": [{"role": "user", "content": i.prompt}], "max_tokens": args.max_tokens,
               "temperature": 0.0} for i in items]
    models, serve = serve_command(args)
    out = {"run": cpu_run_record(), "dataset": args.dataset, "split": "test", "n": args.n, "block": args.block,
           "max_tokens": args.max_tokens, "dtype": args.dtype, "models": models, "dequantize": args.dequantize,
           "max_batch": args.max_batch, "servers": names, "reference": args.reference, "blocks": [],
           "summary": []}
    logs = RESULTS / "serving_logs"
    logs.mkdir(parents=True, exist_ok=True)
    sizes = {"batched": args.max_batch, "batch1": 1}
    servers = {}
    try:
        for name in names:
            port = free_port()
            if name == "vllm":
                argv = vllm_argv(args.vllm_python, args.vllm_model, args.dtype, port, args.vllm_args)
                out["vllm_version"] = vllm_version(args.vllm_python)
            elif name.split("+")[0].partition(":")[0] in sizes:
                argv = server_argv(serve, name, port, sizes, "target_only", None)
            else:
                raise SystemExit(f"unknown server {name!r}: expected vllm or batched:POLICY[@THRESHOLD][+FLAG...]")
            servers[name] = start(name, argv, port, logs / f"answers_{args.name}_{name}.log", args.startup_s)
            drive_block(servers[name].url, [{**bodies[0], "max_tokens": 8}])  # warm-up, not timed
        for k in range(args.n // args.block):
            block_items = items[k * args.block:(k + 1) * args.block]
            block_bodies = bodies[k * args.block:(k + 1) * args.block]
            for name in names[k % len(names):] + names[:k % len(names)]:
                result = drive_block(servers[name].url, block_bodies)
                answers = graded(block_items, result["records"])
                out["blocks"].append({"server": name, "block": k, "wall_s": result["wall_s"],
                                      "errors": result["errors"], "answers": answers})
                out["summary"] = summarise(out["blocks"], args.reference)
                write_json(out, RESULTS, f"serving_answers_{args.name}.json")
                print(json.dumps({"server": name, "block": k, "wall_s": round(result["wall_s"], 1),
                                  "correct": sum(a["correct"] for a in answers), "errors": result["errors"]}),
                      flush=True)
    finally:
        for server in servers.values():
            server.close()
    print(render(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
