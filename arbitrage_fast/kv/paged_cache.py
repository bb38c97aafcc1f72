"""One KV arena shared by the draft and the target, and the block pool that carves it up.

The arena is one tensor [num_pages, page_elems]. A page holds block_size_m tokens of all
layers' K and V of model m, and each model picks its block size so it fills a page: the
draft's per-token KV is smaller, so its pages hold more tokens. Each model reads and writes
the arena through its own strided view [pages, layers, 2, block_size_m, kv_heads, head_dim].
One memory budget therefore serves both models and flows to whichever needs it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .ops import copy_pages
from .reference_pool import ReferenceBlockPool


@dataclass(frozen=True)
class KVSpec:
    """The KV shape of one model."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"KVSpec.{name} must be > 0, got {getattr(self, name)}")

    @property
    def per_token_elems(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim


def page_geometry(specs: list[KVSpec], min_block_size: int) -> tuple[int, list[int]]:
    """(page_elems, block_sizes): the model with the largest per-token KV gets
    min_block_size tokens per page; every other model fits as many tokens as the page holds."""
    if not specs:
        raise ValueError("need the KVSpec of at least one model")
    if min_block_size <= 0:
        raise ValueError(f"min_block_size must be > 0, got {min_block_size}")
    page_elems = max(s.per_token_elems for s in specs) * min_block_size
    return page_elems, [page_elems // s.per_token_elems for s in specs]


def _make_pool(num_pages: int, block_sizes: list[int]):
    try:
        from arbitrage_fast._C import BlockPool
    except ImportError as exc:
        warnings.warn(
            f"arbitrage_fast._C is not available ({exc}); using the slower pure-Python block pool. "
            "Build the extension with `pip install --no-build-isolation -e .`.",
            RuntimeWarning, stacklevel=3)
        return ReferenceBlockPool(num_pages, block_sizes)
    return BlockPool(num_pages, block_sizes)


class PagedKVCache:
    """The arena, each model's view of it, and the pool that decides who owns which page."""

    def __init__(self, specs: list[KVSpec], num_pages: int, dtype: torch.dtype,
                 device: torch.device | str, min_block_size: int = 16) -> None:
        self.specs = tuple(specs)
        self.page_elems, self.block_sizes = page_geometry(self.specs, min_block_size)
        self.dtype = dtype
        self.device = torch.device(device)
        self.pool = _make_pool(num_pages, self.block_sizes)
        # Zeroed, not empty: a masked-out slot read by a kernel must never hold NaN bits.
        self.arena = torch.zeros(num_pages, self.page_elems, dtype=dtype, device=self.device)
        self._views = [self._make_view(m) for m in range(len(self.specs))]

    # ------------------------------------------------------------------ geometry
    @staticmethod
    def num_pages_for_budget(specs: list[KVSpec], budget_bytes: int, dtype: torch.dtype,
                             min_block_size: int = 16) -> int:
        """How many pages fit in `budget_bytes` of arena."""
        page_bytes = page_geometry(specs, min_block_size)[0] * dtype.itemsize
        pages = int(budget_bytes) // page_bytes
        if pages < 1:
            raise ValueError(f"a KV budget of {budget_bytes} bytes holds no page of {page_bytes} bytes")
        return pages

    @property
    def num_pages(self) -> int:
        return self.arena.shape[0]

    @property
    def page_bytes(self) -> int:
        return self.page_elems * self.arena.element_size()

    def block_size(self, model: int) -> int:
        return self.block_sizes[model]

    def _make_view(self, model: int) -> torch.Tensor:
        s, bs = self.specs[model], self.block_sizes[model]
        row = s.num_kv_heads * s.head_dim
        return torch.as_strided(
            self.arena,
            (self.num_pages, s.num_layers, 2, bs, s.num_kv_heads, s.head_dim),
            (self.page_elems, 2 * bs * row, bs * row, row, s.head_dim, 1),
        )

    def view(self, model: int) -> torch.Tensor:
        """Model `model`'s [pages, layers, 2, block_size, kv_heads, head_dim] view of the arena."""
        return self._views[model]

    # ------------------------------------------------------------------ sequences
    def add_sequence(self, seq_id: int) -> None:
        self.pool.add_sequence(seq_id)

    def has_sequence(self, seq_id: int) -> bool:
        return self.pool.has_sequence(seq_id)

    def free_sequence(self, seq_id: int) -> None:
        self.pool.free_sequence(seq_id)

    def fork(self, src_seq: int, dst_seq: int) -> None:
        """dst shares every page of src until one of them writes (copy-on-write)."""
        self.pool.fork(src_seq, dst_seq)

    def share_prefix(self, src_seq: int, dst_seq: int, model: int, num_tokens: int) -> None:
        """dst's KV in model `model` becomes src's first num_tokens positions, its pages shared
        copy-on-write (dst's own pages of that model are released)."""
        self.pool.share_prefix(src_seq, dst_seq, model, num_tokens)

    def num_tokens(self, seq_id: int, model: int) -> int:
        return self.pool.num_tokens(seq_id, model)

    def block_table(self, seq_id: int, model: int) -> list[int]:
        return self.pool.block_table(seq_id, model)

    def extend(self, seq_id: int, model: int, num_tokens: int) -> list[tuple[int, int]]:
        """Make room for positions [0, num_tokens); raises KVCacheExhausted and changes nothing
        when the arena is too full. Returns the copy-on-write pairs, already copied."""
        copies = self.pool.extend(seq_id, model, num_tokens)
        if copies:
            src, dst = zip(*copies)
            copy_pages(self.arena, torch.tensor(src, dtype=torch.long, device=self.device),
                       torch.tensor(dst, dtype=torch.long, device=self.device))
        return copies

    def truncate(self, seq_id: int, model: int, num_tokens: int) -> None:
        """Roll model `model` back to its first num_tokens positions, freeing whole pages past them."""
        self.pool.truncate(seq_id, model, num_tokens)

    # ------------------------------------------------------------------ kernel inputs
    def slot_mapping(self, seq_id: int, model: int, start: int, end: int) -> torch.Tensor:
        """int64 slots (page * block_size + offset) of positions [start, end), on the host."""
        num = self.pool.num_tokens(seq_id, model)
        if not 0 <= start <= end <= num:
            raise ValueError(f"positions [{start}, {end}) of sequence {seq_id} model {model} "
                             f"are not all allocated (it has {num}); extend first")
        bs = self.block_sizes[model]
        first, last = start // bs, -(-end // bs)
        pages = torch.tensor(self.pool.block_table(seq_id, model)[first:last], dtype=torch.long)
        pos = torch.arange(start, end)
        return pages[pos // bs - first] * bs + pos % bs

    def block_table_tensor(self, seq_ids: list[int], model: int) -> torch.Tensor:
        """int32 [len(seq_ids), max_blocks] on the host, padded with page 0 (at least one column,
        so kernels never see a zero-width table)."""
        tables = [self.pool.block_table(s, model) for s in seq_ids]
        width = max([1, *map(len, tables)])
        out = torch.zeros(len(tables), width, dtype=torch.int32)
        for row, table in enumerate(tables):
            if table:
                out[row, : len(table)] = torch.tensor(table, dtype=torch.int32)
        return out

    # ------------------------------------------------------------------ accounting
    def can_allocate(self, num_pages: int) -> bool:
        return self.pool.can_allocate(num_pages)

    def pages_needed(self, seq_id: int, model: int, num_tokens: int) -> int:
        return self.pool.pages_needed(seq_id, model, num_tokens)

    def stats(self) -> dict:
        stats = dict(self.pool.stats())
        pb = self.page_bytes
        stats.update(
            page_bytes=pb,
            total_bytes=stats["total_pages"] * pb,
            used_bytes=stats["used_pages"] * pb,
            free_bytes=stats["free_pages"] * pb,
            bytes_per_model=[n * pb for n in stats["pages_per_model"]],
        )
        return stats

    def __repr__(self) -> str:
        s = self.stats()
        return (f"PagedKVCache(pages={s['total_pages']}, free={s['free_pages']}, "
                f"block_sizes={self.block_sizes}, page_bytes={self.page_bytes}, dtype={self.dtype})")
