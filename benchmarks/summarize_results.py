"""One line per benchmark row found in a results folder: what gpu_check.sh prints at its end.

Reads whatever is there, finished or not (the benchmarks rewrite their JSON after each row),
and prints failed rows with their error: a partial visit still says what it measured.

    python benchmarks/summarize_results.py [benchmarks/results]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path




def decode_lines(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        path = str(r.get("path", ""))
        kind = "engine" if path.startswith("engine") else "compiled" if "torch.compile" in path else "model"
        head = f"decode  {r.get('shape', '?'):<14} {kind:<8} graphs={str(r.get('graphs')):<5} "
        if "error" in r:
            out.append(head + f"ERROR {r['error']}")
            continue
        frac = r.get("roofline_fraction")
        out.append(head + f"{r['tok_s']:8.1f} tok/s" + (f"  roofline {frac:.1%}" if frac is not None else ""))
    return out


def router_lines(r: dict) -> list[str]:
    out = [f"router  ERROR {r['error']}"] if "error" in r else []
    for mode in ("eager", "graphs"):
        m = r.get(mode)
        if m and "overhead_pct" in m:
            out.append(f"router  {mode:<6} step {m['draft_step']['median_s'] * 1e6:8.1f} us  "
                       f"+router {m['draft_step_router']['median_s'] * 1e6:8.1f} us  overhead {m['overhead_pct']:+.2f}%")
        elif m:
            out.append(f"router  {mode:<6} ERROR {m.get('error')}")
    k = r.get("kernels")
    if k:
        out.append(f"router  kernels (us/call): {k['us_per_call']} [{k['impl']}]" if "us_per_call" in k
                   else f"router  kernels ERROR {k.get('error')}")
    return out


def step_lines(d: dict) -> list[str]:
    if "policies" not in d:
        return []
    out = [f"steps   {d['draft']} -> {d['target']}, {d['steps']}x{d['step_tokens']} tokens, "
           f"decode_chunk={d.get('decode_chunk')}, graphs captured {d.get('captured_graphs')} ({d['note']})"]
    for r in d["policies"]:
        rate = r.get("forced_escalation_rate")
        key = r["policy"] + (f"@{rate}" if rate is not None else "")
        if "error" in r:
            out.append(f"steps   {key:<16} ERROR {r['error']}")
            continue
        extra = f"  x{r['speedup_vs_every_step']:.2f} vs every_step" if "speedup_vs_every_step" in r else ""
        out.append(f"steps   {key:<16} {r['step_latency_s'] * 1e3:8.2f} ms/step  {r['tok_s']:7.1f} tok/s"
                   f"  escalated {r['stats']['escalations']}/{r['steps']}"
                   f"  host reads/step {r.get('host_syncs_per_step', float('nan')):.2f}{extra}")
    return out


def summarize(folder: Path) -> list[str]:
    lines = []
    for pattern, fn in (("decode_*.json", decode_lines), ("router_overhead_*.json", router_lines),
                        ("step_latency_*.json", step_lines)):
        for path in sorted(folder.glob(pattern)):
            try:
                lines += fn(json.loads(path.read_text()))
            except (OSError, ValueError, KeyError, TypeError) as e:
                lines.append(f"{path.name}: unreadable ({type(e).__name__}: {e})")
    return lines or [f"no benchmark results in {folder}"]


if __name__ == "__main__":
    print("\n".join(summarize(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results"))))
