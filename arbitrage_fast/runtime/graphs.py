"""CUDA-graph capture and replay of the decode iteration, one graph per batch size.

A batch-1 decode of a small draft is launch-bound: one eager iteration issues hundreds of
tiny kernels. Captured once, an iteration is a single `replay()`; the host enqueues the K
replays of a chunk back to back and never waits between them. One graph serves every
iteration of every chunk because nothing in it depends on the host: each row's position,
slot and step index come from device counters in the static `DecodeBuffers`, which the
iteration itself advances.

Capture follows the runtime's recipe (cuda_graph.py): warm-up runs on a side stream with
every row inactive, so no KV page is written; then one capture into a memory pool shared by
all graphs of the runner. Graphs cover greedy decoding only: sampling
draws from the request's own `torch.Generator`, and capturing a private generator's state
is not something every supported torch version does, so sampled steps run the very same
iteration eagerly (still without host syncs between tokens). On the CPU everything is
eager: this module is then a thin pass-through, so the logic it replays is tested there.
The scheduler's batched decode iterations have their own graphs, one per batch bucket
(batch_graphs.py).

Set ARBITRAGE_FAST_CUDA_GRAPHS=0 to run eagerly on the GPU too (profiling, bisecting).
"""
from __future__ import annotations

import weakref

import torch

from arbitrage_fast.config import SamplingParams

from arbitrage_fast.router.head import FoldedRouter

from .cuda_graph import GraphPool, cuda_graphs_enabled
from .decode_iteration import DecodeBuffers, DecodeIteration

_GREEDY = SamplingParams()
_MIN_CAPACITY = 32


class DecodeLoop:
    """K decode iterations per `run(K)`: graph replays when captured, eager calls otherwise."""

    def __init__(self, iteration: DecodeIteration, graph=None) -> None:
        self.iteration = iteration
        self.graph = graph

    @property
    def buffers(self) -> DecodeBuffers:
        return self.iteration.buffers

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def record_first(self, hidden: torch.Tensor, logits: torch.Tensor) -> None:
        """A step's first token comes from the catch-up prefill's logits: always eager."""
        self.iteration.record(hidden, logits)

    def run(self, iterations: int) -> None:
        step = self.graph.replay if self.graph is not None else self.iteration
        for _ in range(iterations):
            step()


class DecodeGraphs:
    """One runner's decode buffers (per batch size) and captured graphs (per batch size,
    feature tracking and router), all allocated from one graph memory pool."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.enabled = cuda_graphs_enabled(runner.device)
        self._buffers: dict[int, DecodeBuffers] = {}
        self._graphs: dict[tuple[int, bool, bool], DecodeLoop] = {}
        self._pool = GraphPool()

    @property
    def captured(self) -> list[tuple[int, bool, bool]]:
        """(batch size, feature tracking, router) of each decode iteration now replayed from a graph."""
        return sorted(key for key, loop in self._graphs.items() if loop.captured)

    def loop(self, batch: int, capacity: int, sampling: SamplingParams, generator: torch.Generator | None,
             track_features: bool, router: FoldedRouter | None = None) -> DecodeLoop:
        """A loop over buffers that hold steps of `capacity` tokens; captures on first use.
        A graph bakes in its router's weights: another router is captured anew."""
        buffers = self._buffers_for(batch, capacity)
        if not (self.enabled and sampling.greedy):
            return DecodeLoop(DecodeIteration(self.runner, buffers, sampling, generator, track_features,
                                              router=router))
        key = (batch, track_features, router is not None)
        if key not in self._graphs or self._graphs[key].iteration.router is not router:
            iteration = DecodeIteration(self.runner, buffers, _GREEDY, None, track_features, static_tables=True,
                                        router=router)
            self._graphs[key] = DecodeLoop(iteration, self._capture(iteration))
        return self._graphs[key]

    def _buffers_for(self, batch: int, capacity: int) -> DecodeBuffers:
        buffers = self._buffers.get(batch)
        if buffers is None or buffers.capacity < capacity:
            # Graphs bake buffer addresses in: new buffers mean new graphs for this batch size.
            self._graphs = {k: v for k, v in self._graphs.items() if k[0] != batch}
            r = self.runner
            width = min(r.cache.num_pages, -(-r.max_len // r.block_size))
            size = max(_MIN_CAPACITY, 1 << (capacity - 1).bit_length())
            buffers = DecodeBuffers(batch, size, r.model.spec.hidden_size, width, r.device)
            self._buffers[batch] = buffers
        return buffers

    def _capture(self, iteration: DecodeIteration):
        b = iteration.buffers
        b.active.fill_(False)  # warm-up must not write into anyone's KV pages
        b.kv_len.zero_()
        b.step_pos.zero_()
        captured = self._pool.capture(iteration, "the decode iteration")
        if captured is None:
            self.enabled = False
        b.step_pos.zero_()
        return None if captured is None else captured[0]


_PER_RUNNER: "weakref.WeakKeyDictionary[object, DecodeGraphs]" = weakref.WeakKeyDictionary()


def decode_graphs(runner) -> DecodeGraphs:
    """The runner's DecodeGraphs, created on first use (kept beside it, freed with it)."""
    graphs = _PER_RUNNER.get(runner)
    if graphs is None:
        graphs = _PER_RUNNER[runner] = DecodeGraphs(runner)
    return graphs
