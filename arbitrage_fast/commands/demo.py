"""`demo`: the README's main job. One problem solved step by step (each step marked draft or
target), then a small table comparing target_only, rsd and arbitrage on a few problems."""
from __future__ import annotations

from arbitrage_fast.config import SamplingParams

from .common import build_engine

DEMO_THRESHOLDS = {"target_only": None, "draft_only": None, "rsd": 0.9, "arbitrage": 0.3}


def run(preset, args) -> int:
    from arbitrage_fast.eval.datasets import load_dataset
    from arbitrage_fast.eval.sweep import run_sweep

    engine = build_engine(preset, args.device, args.dtype, decode_chunk=args.decode_chunk)
    policies = ["target_only", "rsd", "arbitrage"] if engine.router is not None else ["target_only", "draft_only", "rsd"]
    items = load_dataset(preset.dataset, n=args.n, split="test", seed=args.seed)
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens)
    shown = "arbitrage" if engine.router is not None else "rsd"
    print(f"draft:  {preset.draft}\ntarget: {preset.target}\nrouter: {preset.router or '(none: arbitrage needs one)'}\n")
    first = items[0]
    print(f"{first.prompt.strip()}\n--- {shown} (threshold {DEMO_THRESHOLDS[shown]}) ---")
    res = engine.generate(first.prompt, policy=shown, threshold=DEMO_THRESHOLDS[shown], sampling=sampling,
                          chat=preset.chat)
    for i, step in enumerate(res.steps):
        score = f"router {step.router_score:.2f}" if step.router_score is not None else (
            f"prm {step.draft_prm:.2f}" if step.draft_prm is not None else "")
        print(f"  [{step.source:6s}] {step.text.strip():40s} {score}")
    print(f"  gold answer: {first.answer}   ({res.stats['wall_s'] * 1000:.0f} ms, "
          f"{res.stats['escalations']} of {res.stats['steps']} steps escalated)\n")
    thresholds = {p: [t] for p, t in DEMO_THRESHOLDS.items() if t is not None and p in policies}
    points = run_sweep(engine, items, policies, thresholds, sampling=sampling, progress=not args.quiet,
                       generate_kwargs={"chat": preset.chat})
    print(f"{'policy':12s} {'threshold':>9s} {'accuracy':>8s} {'latency':>10s} {'target share':>12s} {'escalated':>9s}")
    for p in points:
        total = p["draft_tokens"] + p["target_tokens"]
        share = p["target_tokens"] / total if total else 0.0
        t = "-" if p["threshold"] is None else f"{p['threshold']:g}"
        print(f"{p['policy']:12s} {t:>9s} {p['accuracy']:8.2f} {p['latency_s'] * 1000:8.1f}ms {share:12.2f} "
              f"{p['escalation_rate']:9.2f}")
    print(f"\n({len(items)} {preset.dataset} problems; target share = target-written tokens / all written tokens)")
    return 0
