"""How the runtime captures a CUDA graph: when graphs are on, and the capture recipe.

Both kinds of captured decode (a single request's chunked step loop, graphs.py, and the
scheduler's batch buckets, batch_graphs.py) follow one recipe: warm-up calls on a side stream
first, so Triton compiles and cuBLAS picks its kernels outside the capture; then one capture
into a memory pool that every graph of the owner shares (graphs replay one at a time, so their
intermediates can overlap; what a graph returns stays allocated and is never reused by another
capture). A capture that fails (say, an op that reads the device back) is not an error: eager
is slower, never wrong, so the owner warns and runs eagerly.

ARBITRAGE_FAST_CUDA_GRAPHS=0 runs eagerly on the GPU too (profiling, bisecting).
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, TypeVar

import torch

ENV = "ARBITRAGE_FAST_CUDA_GRAPHS"
_WARMUP_CALLS = 2

T = TypeVar("T")


def cuda_graphs_enabled(device: torch.device) -> bool:
    """Graphs are captured on CUDA devices unless ARBITRAGE_FAST_CUDA_GRAPHS=0."""
    return device.type == "cuda" and os.environ.get(ENV, "1") != "0"


class GraphPool:
    """One graph memory pool and the recipe that captures into it."""

    def __init__(self) -> None:
        self._handle = None  # created on the first capture: building one needs a CUDA device

    def capture(self, fn: Callable[[], T], what: str) -> tuple[torch.cuda.CUDAGraph, T] | None:
        """(graph, what `fn` returned while captured: the static outputs every replay rewrites),
        or None with a warning when `fn` cannot be captured. The warm-up calls run `fn` for
        real: the caller makes them harmless (rows that write no KV) and resets what they advance."""
        if self._handle is None:
            self._handle = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(_WARMUP_CALLS):
                    fn()
            torch.cuda.current_stream().wait_stream(stream)
            with torch.cuda.graph(graph, pool=self._handle):
                out = fn()
        except RuntimeError as exc:  # e.g. a kernel that syncs; eager is slower, never wrong
            warnings.warn(f"{what} could not be captured as a CUDA graph ({exc}); running it eagerly",
                          RuntimeWarning, stacklevel=3)
            return None
        return graph, out
