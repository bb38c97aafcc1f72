"""What the fused router costs a draft decode step.

A draft decode step here is one batch-1 token through a 1B-shaped draft (random weights) over
the paged cache: embedding, all layers, final RMSNorm, LM head, argmax. The router variant
replaces the final RMSNorm with `triton_kernels.router_head.fused_norm_router` (F = --width),
which also accumulates the router's running pre-activation, so the score is ready at the
step boundary without another pass. Overhead = (step with router - step without) / step
without, reported for eager launches and for CUDA-graph replays (the iteration of
`bench_decode.StaticDecode`), plus the two kernels alone: the norm and the fused kernel
that replaces it (graphed, 100 calls per replay on a GPU).

    python benchmarks/bench_router_overhead.py [--shape llama-3.2-1b] [--width 64]
    python benchmarks/bench_router_overhead.py --smoke
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _harness as H  # noqa: E402
import shapes  # noqa: E402
from bench_decode import SEQ, StaticDecode, make_cache, router_buffers  # noqa: E402

from arbitrage_fast import nvtx  # noqa: E402
from arbitrage_fast.models.random_init import random_model  # noqa: E402
from arbitrage_fast.roles import Role  # noqa: E402
from arbitrage_fast.runtime.model_runner import ModelRunner  # noqa: E402

KERNEL_CALLS = 100


def _overhead(base: H.Timing, routed: H.Timing) -> float:
    return 100.0 * (routed.median_s - base.median_s) / base.median_s


def _per_token(t: H.Timing, n: int) -> dict:
    return H.timing_dict(t, n)


def _graphed(fn, n: int):
    """A CUDA graph of n calls of fn (warmed up on a side stream first)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            fn()
    return graph


def run(args, device, results: H.ResultFile) -> None:
    """Fill `results.payload` section by section (eager, graphs, kernels), saving after each;
    a section that fails records its error and the next one runs."""
    dtype = getattr(torch, args.dtype)
    name = args.shape
    with nvtx.range("init"):
        loaded = random_model(shapes.hf_config(name), device, dtype, seed=args.seed, name=name)
    model, spec = loaded.model, loaded.spec
    C, N = args.context, args.tokens
    cache = make_cache(spec, C + N + 1, dtype, device)
    cache.add_sequence(SEQ)
    prompt = torch.randint(0, spec.vocab_size, (C,), generator=torch.Generator().manual_seed(args.seed)).tolist()
    with nvtx.range("prefill"):
        ModelRunner(model, cache, Role.DRAFT).forward_one(SEQ, prompt)
    token = prompt[-1]
    router = router_buffers(spec.hidden_size, args.width, device, dtype, args.seed)
    # Both variants decode the same positions of the same sequence (the router variant's
    # writes simply overwrite the same KV slots).
    plain = StaticDecode(model, cache, 0, SEQ, C, N)
    routed = StaticDecode(model, cache, 0, SEQ, C, N, router=router)

    def reset():
        plain.reset(token)
        routed.reset(token)

    def loop(step, label):
        def fn():
            with nvtx.range(label):
                for _ in range(N):
                    step()
        return fn

    result = results.payload
    result.update(shape=name, dtype=args.dtype, device=H.device_name(device), context=C, tokens=N,
                  router_width=args.width, hidden_size=spec.hidden_size, env=H.environment(device))
    try:
        t = H.time_variants({"draft_step": loop(plain.step, "draft_step.eager"),
                             "draft_step+router": loop(routed.step, "draft_step+router.eager")},
                            device, args.repeats, args.warmup, reset)
        result["eager"] = dict(draft_step=_per_token(t["draft_step"], N),
                               draft_step_router=_per_token(t["draft_step+router"], N),
                               overhead_pct=_overhead(t["draft_step"], t["draft_step+router"]))
    except Exception as e:
        result["eager"] = H.error_row(e)
    results.save()

    if device.type == "cuda":
        try:
            with nvtx.range("capture"):
                plain.capture()
                routed.capture()
            t = H.time_variants({"draft_step": loop(plain.replay, "draft_step.graph"),
                                 "draft_step+router": loop(routed.replay, "draft_step+router.graph")},
                                device, args.repeats, args.warmup, reset)
            result["graphs"] = dict(draft_step=_per_token(t["draft_step"], N),
                                    draft_step_router=_per_token(t["draft_step+router"], N),
                                    overhead_pct=_overhead(t["draft_step"], t["draft_step+router"]))
        except Exception as e:
            result["graphs"] = H.error_row(e)
        results.save()

    try:
        result["kernels"] = _kernels(model, router, device, args)
    except Exception as e:
        result["kernels"] = H.error_row(e)
    results.save()


def _kernels(model, router, device, args) -> dict:
    """The final norm alone vs the fused norm + router kernel alone, per call."""
    x = torch.randn(1, model.spec.hidden_size, device=device, dtype=model.norm.weight.dtype)
    r = router
    from arbitrage_fast.triton_kernels.router_head import fused_norm_router

    def norm():
        model.norm(x)

    def fused():
        fused_norm_router(x, model.norm.weight, model.norm.eps, r["w_last"], r["w_mean"], r["h_sum"], r["count"],
                          r["out_hidden"], r["out_pre"])

    calls = KERNEL_CALLS if device.type == "cuda" else 10
    fns = {"final_norm": norm, "fused_norm_router": fused}
    if device.type == "cuda":
        graphs = {k: _graphed(f, calls) for k, f in fns.items()}
        fns = {k: g.replay for k, g in graphs.items()}
    else:
        fns = {k: (lambda f=f: [f() for _ in range(calls)]) for k, f in fns.items()}
    t = H.time_variants(fns, device, args.repeats, args.warmup)
    out = {k: v.median_s / calls * 1e6 for k, v in t.items()}
    return dict(us_per_call=out, calls_per_sample=calls, graphed=device.type == "cuda",
                impl="triton" if _triton_used(x) else "torch reference")


def _triton_used(x) -> bool:
    from arbitrage_fast.triton_kernels.router_head import use_triton

    return use_triton(x)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    H.common_args(ap, repeats=7, warmup=2)
    ap.add_argument("--shape", default=None, help="draft shape (default llama-3.2-1b; smoke: smoke-llama-draft)")
    ap.add_argument("--width", type=int, default=64, help="router hidden width F")
    ap.add_argument("--context", type=int, default=None, help="cached tokens before the step (default 512; smoke 32)")
    ap.add_argument("--tokens", type=int, default=None, help="decode steps per timed repeat (default 64; smoke 4)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = ap.parse_args(argv)
    device = H.resolve_device(args.device, args.smoke, args.threads)
    args.shape = args.shape or ("smoke-llama-draft" if args.smoke else "llama-3.2-1b")
    args.context = args.context or (32 if args.smoke else 512)
    args.tokens = args.tokens or (4 if args.smoke else 64)
    results = H.ResultFile({}, args.out_dir, f"router_overhead_{H.device_slug(device)}.json")
    with torch.inference_mode():
        try:
            run(args, device, results)
        except Exception as e:  # model build or prefill failed
            results.payload["error"] = H.error_row(e)["error"]
            results.save()
    result = results.payload
    parts = []
    for mode in ("eager", "graphs"):
        m = result.get(mode)
        if m and "overhead_pct" in m:
            parts.append(f"{mode} step {m['draft_step']['median_s'] * 1e6:.0f} us {m['overhead_pct']:+.1f}%")
        elif m:
            parts.append(f"{mode} FAILED")
    k = result.get("kernels", {}).get("us_per_call")
    if k:
        parts.append(f"kernels norm {k['final_norm']:.1f} us vs fused {k['fused_norm_router']:.1f} us")
    print(f"router overhead ({args.shape}, F={args.width}, {H.device_name(device)}): "
          + ("; ".join(parts) or f"FAILED {result.get('error')}") + f" -> {results.path}")
    failed = "error" in result or any("error" in result.get(m, {}) for m in ("eager", "graphs", "kernels"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
