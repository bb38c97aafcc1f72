"""Shared pieces of the subcommands: building an engine from a preset, writing JSON."""
from __future__ import annotations

import json
from pathlib import Path


def build_engine(preset, device: str = "cpu", dtype: str | None = None, *, prm="inference", router: bool = True,
                 decode_chunk: int | None = None, spec_k: int = 0, dequantize: bool = False,
                 draft_quant: str | None = None, target_quant: str | None = None, quant_group: int = 64,
                 max_batch: int | None = None, reflection_cues: tuple[str, ...] | None = None,
                 lookahead_k: int | None = None, batch_invariant: bool = False, prefix_cache: bool = False,
                 exact_arithmetic: bool | None = None, dense_rows: int | None = None):
    """prm="inference" uses the preset's inference PRM, "label" its labelling PRM;
    decode_chunk None picks by device (`default_decode_chunk`; 1 with batch_invariant, which
    the chunked decoder cannot serve); max_batch, reflection_cues and lookahead_k None keep the
    engine's defaults."""
    from arbitrage_fast import Engine, EngineConfig

    chosen = preset.prm if prm == "inference" else preset.label_prm
    if decode_chunk is None:
        decode_chunk = 1 if batch_invariant else default_decode_chunk(device)
    extra = {} if max_batch is None else {"max_batch": max_batch}
    if reflection_cues:
        extra["reflection_cues"] = reflection_cues
    if lookahead_k is not None:
        extra["lookahead_k"] = lookahead_k
    return Engine(EngineConfig(draft=preset.draft, target=preset.target, device=device,
                               dtype=dtype or preset.dtype, prm=chosen, router=preset.router if router else None,
                               routers=dict(preset.routers) if router else {},
                               decode_chunk=decode_chunk, spec_k=spec_k, dequantize=dequantize,
                               draft_quant=draft_quant, target_quant=target_quant, quant_group=quant_group,
                               batch_invariant=batch_invariant, prefix_cache=prefix_cache,
                               exact_arithmetic=exact_arithmetic, dense_rows=dense_rows, **extra))


def decoding_options(args) -> dict:
    """The `--decode-chunk` / `--spec-k` / `--reflection-cues` / `--lookahead-k` /
    `--batch-invariant` flags and `load_options` as `build_engine` keywords."""
    return {"decode_chunk": args.decode_chunk, "spec_k": args.spec_k,
            "reflection_cues": getattr(args, "reflection_cues", None),
            "lookahead_k": getattr(args, "lookahead_k", None), "batch_invariant": args.batch_invariant,
            **load_options(args)}


def load_options(args) -> dict:
    """How the models load and compute: `--dequantize`, `--draft-quant`, `--target-quant`,
    `--quant-group`, `--[no-]exact-arithmetic`, `--dense-rows`."""
    return {"dequantize": getattr(args, "dequantize", False), "draft_quant": getattr(args, "draft_quant", None),
            "target_quant": getattr(args, "target_quant", None), "quant_group": getattr(args, "quant_group", 64),
            "exact_arithmetic": getattr(args, "exact_arithmetic", None),
            "dense_rows": getattr(args, "dense_rows", None)}


def quant_info(args) -> dict:
    """The load flags that change a model's answers (quantization, arithmetic), for keys of
    stored results; empty by default, so files written before these flags existed still match."""
    opts = load_options(args)
    # dequantised GGUF weights compute otherwise than packed ones (bf16 weights, no int8 activations)
    # as do a dense copy's wide forwards (no int8 rounding of their inputs)
    info = {k: opts[k] for k in ("dequantize", "draft_quant", "target_quant", "dense_rows") if opts[k]}
    if any(opts[k] in ("int4", "int3") for k in info):
        info["quant_group"] = opts["quant_group"]
    if opts["exact_arithmetic"] is not None:
        info["exact_arithmetic"] = opts["exact_arithmetic"]
    return info


def default_max_batch(device: str) -> int:
    """Requests a server runs at once: 32 on a GPU (the largest CUDA-graph bucket); 8 on a
    CPU, where a forward's cost grows with its rows sooner (a few cores share the matmuls)."""
    import torch

    return 32 if torch.device(device).type == "cuda" else 8


def default_decode_chunk(device: str) -> int:
    """0 (adaptive chunks) on CUDA, 1 (per token) elsewhere.

    On CUDA the chunked decoder keeps the host out of a step's loop (at most 2 reads a step,
    graph replays between them), which a launch-bound batch-1 decode needs. Per-token decoding
    batches every request's token into one forward, replayed from a batch-bucket graph, but
    reads the host once a token; which wins under load is unmeasured. On the CPU there are
    no launches to hide, while every token decoded past a boundary and rolled back costs a
    whole forward, so reading each token is cheapest.
    """
    import torch

    return 0 if torch.device(device).type == "cuda" else 1


def write_json(obj, path: str | Path | None) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))
