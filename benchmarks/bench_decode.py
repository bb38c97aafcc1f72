"""Batch-1 decode speed of random-weight models of real shapes, against the HBM roofline.

For each shape: prefill `--context` tokens, then decode `--tokens` more, two ways:

  graphs=false  the eager runner: `ModelRunner.forward` once per token over the paged cache
                (host-side slot/metadata work and every kernel launch included), built with
                `padded_decode=False` (the engine's runners replay a batch-bucket graph for
                such a forward on CUDA, runtime/batch_graphs.py). The token fed
                is a fixed id, so the loop never waits for the device; the engine's own loop
                also reads each sampled token back, which this row leaves out.
  graphs=true   one decode iteration (slot from position, forward, LM head, argmax fed back as
                the next input, position += 1) captured once as a CUDA graph, then replayed
                `--tokens` times with no host work at all. Captured here with torch.cuda.CUDAGraph
                over static buffers (`StaticDecode`): the bare model, the roofline's best case.
  engine loop   the engine's own decode iteration (`runtime/graphs.py` DecodeLoop: also token
                log-prob and entropy, per-position buffers for rollback) run `--tokens` times
                as one chunk: graph replays on CUDA (graphs=true), eager elsewhere.

Roofline: a batch-1 decode token must read every weight once (only one row of an untied
embedding table; all of it when tied, since the LM head reads it) plus the KV of the context
it attends to (mean context over the timed tokens). fraction = (bytes/token / s/token) / peak.

    python benchmarks/bench_decode.py                      # the four real shapes, GPU
    python benchmarks/bench_decode.py --shapes llama-3.1-8b --context 4096
    python benchmarks/bench_decode.py --smoke              # tiny shapes on the CPU
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

from arbitrage_fast import nvtx  # noqa: E402
from arbitrage_fast.config import SamplingParams  # noqa: E402
from arbitrage_fast.kv.paged_cache import KVSpec, PagedKVCache  # noqa: E402
from arbitrage_fast.models.random_init import random_model  # noqa: E402
from arbitrage_fast.runtime.attention_metadata import AttentionMetadata  # noqa: E402
from arbitrage_fast.runtime.graphs import decode_graphs  # noqa: E402
from arbitrage_fast.roles import Role  # noqa: E402
from arbitrage_fast.runtime.model_runner import ModelRunner  # noqa: E402

SEQ = 0


class StaticDecode:
    """One sequence's decode iteration over static device buffers, closed on the device.

    `step()` computes the slot of the current position from the (pre-extended) block table,
    runs the model, takes the argmax as the next input and advances the position: nothing
    comes from the host, so the whole iteration can be captured as a CUDA graph and replayed.
    With `router` buffers the final RMSNorm is replaced by the fused norm + router kernel.
    The host-side `seq_lens` list is kept in step too, for the CPU attention path (only the
    un-captured CPU run reads it).
    """

    def __init__(self, model, cache: PagedKVCache, model_index: int, seq_id: int, start: int,
                 capacity: int, router: dict | None = None) -> None:
        self.model, self.router = model, router
        self.kv = cache.view(model_index)
        self.bs = cache.block_size(model_index)
        self.start = start
        dev = cache.device
        cache.extend(seq_id, model_index, start + capacity)
        self.block_table = cache.block_table_tensor([seq_id], model_index).to(dev)
        self.input_ids = torch.zeros(1, dtype=torch.long, device=dev)
        self.positions = torch.full((1,), start, dtype=torch.long, device=dev)
        self.meta = AttentionMetadata(
            positions=self.positions, slot_mapping=torch.zeros(1, dtype=torch.long, device=dev),
            block_tables=self.block_table, query_lens=[1], seq_lens=[start + 1], block_size=self.bs)
        self.logits = None
        self.graph = None
        self._host_pos = start
        if router is not None:
            from arbitrage_fast.triton_kernels.router_head import fused_norm_router
            self._fused_norm_router = fused_norm_router

    def reset(self, token: int = 0) -> None:
        self.positions.fill_(self.start)
        self.input_ids.fill_(token)
        self._host_pos = self.start
        if self.router is not None:
            self.router["h_sum"].zero_()
            self.router["count"].zero_()

    def step(self) -> None:
        pos = self.positions
        self.meta.slot_mapping.copy_(self.block_table[0, pos // self.bs].long() * self.bs + pos % self.bs)
        self.meta.seq_lens_tensor.copy_(pos + 1)
        self.meta.seq_lens[0] = self._host_pos + 1
        if self.router is None:
            hidden = self.model(self.input_ids, self.meta, self.kv)
        else:
            r = self.router
            residual = self.model.forward_residual(self.input_ids, self.meta, self.kv)
            self._fused_norm_router(residual, self.model.norm.weight, self.model.norm.eps, r["w_last"], r["w_mean"],
                              r["h_sum"], r["count"], r["out_hidden"], r["out_pre"])
            hidden = r["out_hidden"]
        self.logits = self.model.compute_logits(hidden)
        self.input_ids.copy_(self.logits.argmax(-1))
        self.positions.add_(1)
        self._host_pos += 1

    def capture(self, warmup: int = 3) -> None:
        """Record one `step()` as a CUDA graph (kernels compiled by warm-up runs on a side stream)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self.step()
        torch.cuda.current_stream().wait_stream(stream)
        self.reset()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step()
        self.reset()

    def replay(self) -> None:
        self.graph.replay()


def router_buffers(hidden: int, width: int, device, dtype, seed: int = 0) -> dict:
    """Random folded router weights (F = width) and the running-sum buffers of one row."""
    gen = torch.Generator(device=device).manual_seed(seed)
    w = lambda: torch.randn(width, hidden, generator=gen, device=device) * hidden ** -0.5  # noqa: E731
    return dict(w_last=w(), w_mean=w(), h_sum=torch.zeros(1, hidden, device=device),
                count=torch.zeros(1, dtype=torch.int32, device=device),
                out_hidden=torch.empty(1, hidden, dtype=dtype, device=device),
                out_pre=torch.empty(1, width, device=device))


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one batch-1 decode token reads: all of them, except that an untied
    embedding table contributes one row (a tied one is read whole by the LM head)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    emb = model.embed_tokens.weight
    if model.lm_head.weight is not emb:
        total -= emb.numel() * emb.element_size() - emb.shape[1] * emb.element_size()
    return total


def make_cache(spec, tokens: int, dtype, device) -> PagedKVCache:
    kv = KVSpec(spec.num_layers, spec.num_kv_heads, spec.head_dim)
    block = 16
    return PagedKVCache([kv], num_pages=-(-tokens // block) + 2, dtype=dtype, device=device, min_block_size=block)


def bench_shape(name: str, args, device, peak, results: H.ResultFile) -> None:
    """The shape's rows (eager, graphs, engine loop), each saved to `results` once measured."""
    dtype = getattr(torch, args.dtype)
    with nvtx.range(f"{name}.init"):
        loaded = random_model(shapes.hf_config(name), device, dtype, seed=args.seed, name=name)
    model, spec = loaded.model, loaded.spec
    C, N = args.context, args.tokens
    cache = make_cache(spec, C + N + 1, dtype, device)
    runner = ModelRunner(model, cache, Role.DRAFT, padded_decode=False)  # the eager row and the references
    cache.add_sequence(SEQ)
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, spec.vocab_size, (C,), generator=gen).tolist()
    token = int(prompt[-1])
    with nvtx.range(f"{name}.prefill"):
        runner.forward_one(SEQ, prompt)

    weight_bytes = weight_bytes_per_token(model)
    kv_token_bytes = spec.kv_elems_per_token * cache.arena.element_size()
    mean_context = C + (N + 1) / 2
    bytes_per_token = weight_bytes + kv_token_bytes * mean_context
    base = dict(shape=name, dtype=args.dtype, device=H.device_name(device), context=C, tokens=N,
                params=sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
                weight_bytes_per_token=weight_bytes, kv_bytes_per_context_token=kv_token_bytes,
                mean_context=mean_context, bytes_per_token=bytes_per_token, peak_bw=peak,
                env=H.environment(device))

    def row(graphs: bool, timing: H.Timing, **extra) -> dict:
        s_tok = timing.median_s / N
        bw = bytes_per_token / s_tok
        out = dict(base, graphs=graphs, tok_s=1.0 / s_tok, s_per_token=s_tok, achieved_bw=bw,
                   timing=H.timing_dict(timing, N), **extra)
        if peak:  # no fraction at all where the peak is unknown (CPU), rather than a null one
            out["roofline_fraction"] = bw / peak
        return out

    def eager():
        with nvtx.range(f"{name}.decode.eager"):
            for _ in range(N):
                runner.forward_one(SEQ, [token]).logits.argmax(-1)

    # Each variant is recorded and the next one runs, whatever happened to the one before.
    try:
        t = H.time_variants({"eager": eager}, device, args.repeats, args.warmup,
                            reset=lambda: runner.truncate(SEQ, C))["eager"]
        results.append(row(False, t, path="ModelRunner.forward"))
    except Exception as e:
        results.append(H.error_row(e, **base, graphs=False, path="ModelRunner.forward"))

    if args.graphs and device.type == "cuda":
        variants = [("StaticDecode", model)]
        if args.compile:
            # Inductor's fusions over the same layers, captured into the same graph: the
            # alternative to the hand-fused kernels, timed beside them.
            variants.append(("StaticDecode + torch.compile", torch.compile(model, dynamic=False)))
        for path, decoder in variants:
            runner.truncate(SEQ, C)
            try:
                results.append(_graph_row(name, decoder, cache, runner, token, args, device, row, path))
            except Exception as e:
                results.append(H.error_row(e, **base, graphs=True, path=path))
    runner.truncate(SEQ, C)
    try:
        results.append(_engine_loop_row(name, runner, token, args, device, row))
    except Exception as e:
        results.append(H.error_row(e, **base, graphs=None, path="engine DecodeLoop"))
    del runner, cache, model, loaded
    H.free_device_memory(device)


def _graph_row(name, model, cache, runner, token, args, device, row, path: str) -> dict:
    C, N = args.context, args.tokens
    # The reference logits for the same input at the same position, through the runner.
    reference = runner.forward_one(SEQ, [token]).logits.float()
    runner.truncate(SEQ, C)
    static = StaticDecode(model, cache, 0, SEQ, C, N)
    with nvtx.range(f"{name}.capture"):
        static.capture()
    static.reset(token)
    static.replay()
    diff = (static.logits.float() - reference).abs().max().item()
    same_argmax = bool(static.logits.argmax(-1).item() == reference.argmax(-1).item())

    def replay():
        with nvtx.range(f"{name}.decode.graph"):
            for _ in range(N):
                static.replay()

    t = H.time_variants({"graph": replay}, device, args.repeats, args.warmup, reset=lambda: static.reset(token))["graph"]
    out = row(True, t, path=f"{path} (torch.cuda.CUDAGraph, benchmark-local)",
              graph_vs_runner_max_abs_logit_diff=diff, graph_vs_runner_same_argmax=same_argmax)
    del static
    return out


def _engine_loop_row(name, runner, token, args, device, row) -> dict:
    """The engine's decode iteration, `--tokens` of them as one chunk from position --context."""
    C, N = args.context, args.tokens
    loop = decode_graphs(runner).loop(1, N + 1, SamplingParams(), None, track_features=False)
    runner.cache.extend(SEQ, runner.index, C + N)  # the positions the chunk feeds
    loop.buffers.set_block_table(0, runner.cache.block_table(SEQ, runner.index))

    def reset():
        loop.buffers.start_row(0, C)
        loop.buffers.input_ids.fill_(token)

    def run():
        with nvtx.range(f"{name}.decode.engine_loop"):
            loop.run(N)

    t = H.time_variants({"loop": run}, device, args.repeats, args.warmup, reset=reset)["loop"]
    reset()
    loop.run(1)
    first = int(loop.buffers.tokens[0, 0])
    runner.truncate(SEQ, C)
    reference = int(runner.forward_one(SEQ, [token]).logits.argmax(-1))
    return row(loop.captured, t, path="engine DecodeLoop (runtime/graphs.py)",
               loop_vs_runner_same_first_token=first == reference)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    H.common_args(ap, repeats=5, warmup=2)
    ap.add_argument("--shapes", default=None, help=f"comma-separated, from {', '.join(shapes.SHAPES)}")
    ap.add_argument("--context", type=int, default=None, help="tokens prefilled before timing (default 1024; smoke 32)")
    ap.add_argument("--tokens", type=int, default=None, help="decode tokens per timed repeat (default 128; smoke 8)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--no-graphs", dest="graphs", action="store_false", help="skip the CUDA-graph rows")
    ap.add_argument("--peak-bw", type=float, default=None, help="peak memory bandwidth, bytes/s (overrides the table)")
    ap.add_argument("--compile", action="store_true",
                    help="also a graph row with the model under torch.compile (CUDA; results/decode_compile_*.json)")
    args = ap.parse_args(argv)
    device = H.resolve_device(args.device, args.smoke, args.threads)
    names = args.shapes.split(",") if args.shapes else list(shapes.SMOKE_SHAPES if args.smoke else shapes.REAL_SHAPES)
    args.context = args.context or (32 if args.smoke else 1024)
    args.tokens = args.tokens or (8 if args.smoke else 128)
    peak = H.peak_bandwidth(device, args.peak_bw)
    prefix = "decode_compile" if args.compile else "decode"
    results = H.ResultFile([], args.out_dir, f"{prefix}_{H.device_slug(device)}.json")
    with torch.inference_mode():
        for name in names:
            try:
                bench_shape(name, args, device, peak, results)
            except Exception as e:  # model build or prefill failed: the shape's one row says why
                results.append(H.error_row(e, shape=name, graphs=None))
                H.free_device_memory(device)
    rows, path = results.payload, results.path
    parts = []
    for r in rows:
        if r.get("tok_s"):
            frac = f" {r['roofline_fraction']:.0%}" if r.get("roofline_fraction") else ""
            parts.append(f"{r['shape']}{_variant(r)} {r['tok_s']:.0f} tok/s{frac}")
        else:
            parts.append(f"{r['shape']}{_variant(r)} FAILED")
    print(f"decode ({H.device_name(device)}, ctx {args.context}): " + "; ".join(parts) + f" -> {path}")
    return 0 if all(r.get("tok_s") for r in rows) else 1


def _variant(row: dict) -> str:
    engine = "engine" if str(row.get("path", "")).startswith("engine") else ""
    graph = "graph" if row.get("graphs") else ""
    compiled = "compile" if "torch.compile" in str(row.get("path", "")) else ""
    tags = ",".join(t for t in (engine, graph, compiled) if t)
    return f"[{tags}]" if tags else ""


if __name__ == "__main__":
    sys.exit(main())
