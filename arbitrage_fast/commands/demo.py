"""`demo`: the README's main job. One problem solved step by step (each step marked draft or
target), then a small table comparing target_only, rsd and arbitrage on a few problems."""
from __future__ import annotations

import time

from arbitrage_fast.config import SamplingParams

from .common import build_engine, decoding_options
from .thresholds import recommended_thresholds

# What the demo shows for a policy its preset recommends no threshold for (thresholds.py).
FALLBACK_THRESHOLDS = {"rsd": 0.95, "arbitrage": 0.5}
# (problems in the table, token cap) when not given: the real pair decodes a few tokens a second
# on a 2-core CPU, so its demo solves two problems; its cap lets a whole GSM8K solution reach
# its \boxed{} answer (the 1.5B's solutions ran 127-379 tokens on 43 of 50 recorded problems,
# the rest past a 400 cap).
DEMO_DEFAULTS = {"testbed": (20, 256), "qwen2.5-coder": (2, 512)}
FALLBACK_DEFAULTS = (4, 256)


def demo_sizes(preset, args) -> tuple[int, int]:
    """(n, max_new_tokens): what the command line gave, else the preset's demo defaults."""
    n, cap = DEMO_DEFAULTS.get(preset.name, FALLBACK_DEFAULTS)
    return (args.n if args.n is not None else n), (args.max_new_tokens if args.max_new_tokens is not None else cap)


def demo_thresholds(preset) -> dict[str, float]:
    """Each shown policy's threshold: the preset's recommended one, else the fallback."""
    return {**FALLBACK_THRESHOLDS, **recommended_thresholds(preset)}


def run(preset, args) -> int:
    from arbitrage_fast.eval.datasets import load_dataset
    from arbitrage_fast.eval.sweep import run_sweep

    start = time.perf_counter()
    engine = build_engine(preset, args.device, args.dtype, **decoding_options(args))
    policies = ["target_only", "rsd", "arbitrage"] if engine.router is not None else ["target_only", "draft_only", "rsd"]
    n, max_new_tokens = demo_sizes(preset, args)
    items = load_dataset(preset.dataset, n=n, split="test", seed=args.seed, instruction=preset.instruction)
    sampling = SamplingParams(max_new_tokens=max_new_tokens)
    shown = "arbitrage" if engine.router is not None else "rsd"
    print(f"draft:  {preset.draft}\ntarget: {preset.target}\nrouter: {preset.router or '(none: arbitrage needs one)'}\n"
          f"loaded in {time.perf_counter() - start:.1f} s ({engine.config.dtype} on {engine.config.device})\n")
    first = items[0]
    chosen = demo_thresholds(preset)
    print(f"{first.prompt.strip()}\n--- {shown} (threshold {chosen[shown]:.3g}) ---", flush=True)
    run = engine.stream(first.prompt, policy=shown, threshold=chosen[shown], sampling=sampling,
                        chat=preset.chat)
    t = time.perf_counter()
    for step in run:  # printed as decided: on a CPU a real step takes seconds
        now = time.perf_counter()
        score = f"router {step.router_score:.2f}" if step.router_score is not None else (
            f"prm {step.draft_prm:.2f}" if step.draft_prm is not None else "")
        print(f"  [{step.source:6s}] {_one_line(step.text):60s} {score:10s} {len(step.token_ids):3d} tok "
              f"{(now - t) * 1000:7.0f} ms", flush=True)
        t = now
    res = run.result
    print(f"  gold answer: {first.answer}   ({res.stats['wall_s'] * 1000:.0f} ms, "
          f"{res.stats['escalations']} of {res.stats['steps']} steps escalated, finish: {res.finish_reason})\n")
    thresholds = {p: [t] for p, t in chosen.items() if p in policies}
    points = run_sweep(engine, items, policies, thresholds, sampling=sampling, progress=not args.quiet,
                       generate_kwargs={"chat": preset.chat})
    print(f"{'policy':12s} {'threshold':>9s} {'accuracy':>8s} {'latency':>10s} {'target share':>12s} {'escalated':>9s}")
    for p in points:
        total = p["draft_tokens"] + p["target_tokens"]
        share = p["target_tokens"] / total if total else 0.0
        t = "-" if p["threshold"] is None else f"{p['threshold']:.3g}"
        print(f"{p['policy']:12s} {t:>9s} {p['accuracy']:8.2f} {p['latency_s'] * 1000:8.1f}ms {share:12.2f} "
              f"{p['escalation_rate']:9.2f}")
    print(f"\n({len(items)} {preset.dataset} problems; target share = target-written tokens / all written tokens)")
    return 0


def _one_line(text: str, width: int = 60) -> str:
    """A step on one row: newlines shown as spaces, long steps cut with an ellipsis."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"
