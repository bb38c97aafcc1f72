"""The scheduler's decode iterations replayed from CUDA graphs, one graph per batch bucket.

When every work item of a role's forward is one decode token (no prefill chunk, no
verification run), the iteration is as launch-bound as a batch-1 decode on a small model:
hundreds of tiny kernels for a few dozen rows of work. `ModelRunner.run` then hands the batch
here: it is padded up to the next bucket (1, 2, 4, 8, 16, 32), its inputs are copied into
static buffers, and the graph captured for that bucket is replayed. A forward with a prefill
chunk in it, a batch over the largest bucket, and every forward on the CPU stay eager.

Padded rows. A padded row feeds token 0 at position 0 into slot -1 with a KV length of 0:
slot -1 writes nothing (`rope_write_kv` and `write_kv` skip it) and an empty sequence attends
to nothing (the paged decode kernel and its torch twin give zeros; the sliding-window gather
masks every key), so a padded row neither reads nor writes anyone's pages. Its output rows
are dropped. Every op of the decoder is row-wise except attention, which is per sequence, so
the real rows' arithmetic is that of the unpadded batch.

The batch reaches the layers in the device form of `AttentionMetadata` (lengths as tensors,
block tables at the buffers' full width): a graph cannot take host lists that change every
iteration. The padded forward is one function, run eagerly where nothing is captured; a
runner built with `padded=True` uses it on any device, which is how the CPU tests check the
padding. Graphs are captured lazily, on a bucket's first use, with every row padded during
the warm-up; all buckets share one memory pool (cuda_graph.py). A replay's outputs live in the
graph's static tensors, which its next replay overwrites, so the runner gets copies of the
real rows.

ARBITRAGE_FAST_CUDA_GRAPHS=0 turns the buckets off (eager and unpadded, as on the CPU).
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch

from .attention_metadata import AttentionMetadata
from .cuda_graph import GraphPool, cuda_graphs_enabled
from .work import ModelWork

BUCKETS = (1, 2, 4, 8, 16, 32)

# Token, position, slot and KV length of a padded row: one column of `DecodeInputs.fields`.
_PAD = torch.tensor([0, 0, -1, 0], dtype=torch.long)


def bucket_for(rows: int, buckets: Sequence[int] = BUCKETS) -> int | None:
    """The smallest bucket that holds `rows` decode rows; None past the largest (run eagerly)."""
    if rows < 1:
        raise ValueError(f"a decode batch has at least one row, got {rows}")
    return next((b for b in buckets if b >= rows), None)


def is_decode_batch(works: Sequence[ModelWork]) -> bool:
    """True when every work item feeds one token (so yields one output row, whatever its rows)."""
    return bool(works) and all(len(w.tokens) == 1 for w in works)


class DecodeInputs:
    """Static device inputs of up to `rows` decode rows: a captured graph reads these addresses."""

    def __init__(self, rows: int, table_width: int, block_size: int, device: torch.device) -> None:
        self.block_size = block_size
        # [4, rows]: each row's token, position, slot and KV length; one tensor, so one
        # host-to-device copy per iteration.
        self.fields = _PAD[:, None].repeat(1, rows).to(device)
        self.block_tables = torch.zeros(rows, table_width, dtype=torch.int32, device=device)

    @property
    def table_width(self) -> int:
        return self.block_tables.shape[1]

    def pad(self, bucket: int) -> None:
        """Every row of the bucket padded: what a warm-up before capture must run on."""
        self.fields[:, :bucket].copy_(_PAD[:, None].expand(-1, bucket))

    def fill(self, bucket: int, tokens: list[int], starts: list[int], tables: torch.Tensor) -> None:
        """The real rows first (token fed at position start, into the slot the block table gives
        it, after which the sequence holds start + 1 tokens), then padded rows up to `bucket`.
        tables: the real rows' int32 block tables on the host, padded with page 0."""
        n, bs = len(tokens), self.block_size
        pos = torch.tensor(starts, dtype=torch.long)
        host = _PAD[:, None].repeat(1, bucket)
        host[0, :n] = torch.tensor(tokens, dtype=torch.long)
        host[1, :n] = pos
        host[2, :n] = tables[torch.arange(n), pos // bs].long() * bs + pos % bs
        host[3, :n] = pos + 1
        self.fields[:, :bucket].copy_(host)
        self.block_tables[:bucket].zero_()  # page 0 past each table, as block_table_tensor pads
        self.block_tables[:n, : tables.shape[1]].copy_(tables)


class DecodeBuckets:
    """One runner's padded decode path: bucket choice, static inputs, graphs per bucket.

    padded: None = on where graphs are captured (CUDA, unless ARBITRAGE_FAST_CUDA_GRAPHS=0);
    True = decode batches always take the padded path, eager where nothing is captured (the
    CPU tests); False = never (every forward eager and unpadded)."""

    def __init__(self, runner, padded: bool | None = None, buckets: Sequence[int] = BUCKETS) -> None:
        buckets = tuple(buckets)
        if not buckets or buckets[0] < 1 or list(buckets) != sorted(set(buckets)):
            raise ValueError(f"buckets must be increasing batch sizes >= 1, got {buckets}")
        self.runner = runner
        self.buckets = buckets
        graphs = cuda_graphs_enabled(runner.device)
        self.padded = graphs if padded is None else padded
        self.capturing = self.padded and graphs
        self.served: Counter[int] = Counter()  # forwards run per bucket (debugging, metrics)
        self._inputs: DecodeInputs | None = None
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._pool = GraphPool()

    @property
    def captured(self) -> tuple[int, ...]:
        """The buckets whose decode iteration is now replayed from a graph."""
        return tuple(sorted(self._graphs))

    @torch.inference_mode()
    def run(self, works: Sequence[ModelWork], starts: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(hidden [n, H], fp32 logits [n, V]) of the n real rows of a decode batch whose KV room
        `reserve` made, or None when this forward is not the padded path's (run it eagerly)."""
        if not (self.padded and is_decode_batch(works)):
            return None
        bucket = bucket_for(len(works), self.buckets)
        if bucket is None:
            return None
        r = self.runner
        tables = r.cache.block_table_tensor([w.seq_id for w in works], r.index)
        inputs = self.static_inputs()
        if tables.shape[1] > inputs.table_width:  # a sequence past the model's context
            return None
        captured = None
        if self.capturing:
            captured = self._graph(bucket)
            if captured is None:  # the capture failed: eager and unpadded from now on
                return None
        n = len(works)
        inputs.fill(bucket, [w.tokens[0] for w in works], starts, tables)
        self.served[bucket] += 1
        if captured is None:
            hidden, logits = self.forward(bucket)
            return hidden[:n], logits[:n]
        graph, (hidden, logits) = captured
        graph.replay()
        return hidden[:n].clone(), logits[:n].clone()

    def forward(self, bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The padded decode forward over the static inputs' first `bucket` rows: what a graph
        captures, and what runs eagerly where none is."""
        r, inputs = self.runner, self.static_inputs()
        tokens, positions, slots, kv_lens = inputs.fields[:, :bucket]
        meta = AttentionMetadata.for_device_decode(positions=positions, slot_mapping=slots,
                                                   block_tables=inputs.block_tables[:bucket],
                                                   seq_lens_tensor=kv_lens.to(torch.int32), block_size=r.block_size)
        hidden = r.model(tokens, meta, r.kv_view)
        return hidden, r.model.compute_logits(hidden)

    def static_inputs(self) -> DecodeInputs:
        """The inputs every bucket's forward reads (rows of the largest bucket), made on first use."""
        if self._inputs is None:
            r = self.runner
            # Wide enough for any sequence of the model's context (or of the whole arena).
            width = min(r.cache.num_pages, -(-r.max_len // r.block_size))
            self._inputs = DecodeInputs(self.buckets[-1], width, r.block_size, r.device)
        return self._inputs

    def _graph(self, bucket: int):
        if bucket not in self._graphs:
            self.static_inputs().pad(bucket)  # the warm-up runs for real: it must write no KV
            captured = self._pool.capture(lambda: self.forward(bucket), f"the decode batch of {bucket} rows")
            if captured is None:
                self.padded = self.capturing = False
                return None
            self._graphs[bucket] = captured
        return self._graphs[bucket]
