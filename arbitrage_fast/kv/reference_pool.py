"""Pure-Python model of the C++ BlockPool: the oracle of its tests and its fallback.

Same API, same exceptions, same allocation order (a LIFO free list, fresh pools hand out
pages 0, 1, 2, ...), so block tables can be compared page for page with the C++ pool.
Written for clarity, not speed: the engine uses it only when the extension is not built.
"""

from __future__ import annotations

try:  # one exception class for both pools, so `except KVCacheExhausted` catches either
    from arbitrage_fast._C import KVCacheExhausted
except ImportError:  # extension not built

    class KVCacheExhausted(RuntimeError):  # type: ignore[no-redef]
        """The KV arena has too few free pages for a request; the pool is unchanged."""


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class ReferenceBlockPool:
    """Ref-counted pages; per sequence, one block table and token count per model."""

    def __init__(self, num_pages: int, block_sizes: list[int]) -> None:
        if not 0 < num_pages < 2**31:
            raise ValueError(f"num_pages must be in [1, 2^31), got {num_pages}")
        if not block_sizes:
            raise ValueError("block_sizes must name at least one model")
        for m, bs in enumerate(block_sizes):
            if bs <= 0:
                raise ValueError(f"block_sizes[{m}] must be > 0, got {bs}")
        self._block_sizes = list(block_sizes)
        self._refcount = [0] * num_pages
        self._owner = [-1] * num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # top of the stack last
        self._pages_per_model = [0] * len(block_sizes)
        # seq_id -> one [num_tokens, pages] pair per model (lists: both are updated in place)
        self._seqs: dict[int, list[list]] = {}

    # ------------------------------------------------------------------ lookups
    def _seq(self, seq_id: int) -> list:
        if seq_id not in self._seqs:
            raise KeyError(f"unknown sequence {seq_id}")
        return self._seqs[seq_id]

    def _check_model(self, model: int) -> None:
        if not 0 <= model < len(self._block_sizes):
            raise IndexError(f"model index {model} out of range [0, {len(self._block_sizes)})")

    def _table(self, seq_id: int, model: int) -> list:
        seq = self._seq(seq_id)
        self._check_model(model)
        return seq[model]

    # ------------------------------------------------------------------ pages
    def _allocate(self, model: int) -> int:
        page = self._free.pop()
        self._refcount[page] = 1
        self._owner[page] = model
        self._pages_per_model[model] += 1
        return page

    def _release(self, page: int) -> None:
        self._refcount[page] -= 1
        if self._refcount[page] == 0:
            self._pages_per_model[self._owner[page]] -= 1
            self._owner[page] = -1
            self._free.append(page)

    def _release_tail(self, pages: list[int], keep: int) -> None:
        while len(pages) > keep:
            self._release(pages.pop())

    # ------------------------------------------------------------------ sequences
    def add_sequence(self, seq_id: int) -> None:
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id} already exists")
        self._seqs[seq_id] = [[0, []] for _ in self._block_sizes]

    def has_sequence(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    def free_sequence(self, seq_id: int) -> None:
        for table in self._seq(seq_id):
            self._release_tail(table[1], 0)
        del self._seqs[seq_id]

    def sequence_ids(self) -> list[int]:
        return sorted(self._seqs)

    def num_tokens(self, seq_id: int, model: int) -> int:
        return self._table(seq_id, model)[0]

    def block_table(self, seq_id: int, model: int) -> list[int]:
        return list(self._table(seq_id, model)[1])

    # ------------------------------------------------------------------ grow / shrink / share
    def pages_needed(self, seq_id: int, model: int, new_num_tokens: int) -> int:
        num, pages = self._table(seq_id, model)
        if new_num_tokens < num:
            raise ValueError(f"extend cannot shrink sequence {seq_id} model {model} from {num} "
                             f"to {new_num_tokens} tokens; use truncate")
        if new_num_tokens == num:
            return 0
        bs = self._block_sizes[model]
        # The next token lands in the partly filled last page; if shared, copy it first.
        cow = num % bs != 0 and self._refcount[pages[-1]] > 1
        return _ceil_div(new_num_tokens, bs) - len(pages) + int(cow)

    def extend(self, seq_id: int, model: int, new_num_tokens: int) -> list[tuple[int, int]]:
        needed = self.pages_needed(seq_id, model, new_num_tokens)
        if needed > len(self._free):
            raise KVCacheExhausted(
                f"KV cache exhausted: sequence {seq_id} model {model} needs {needed} pages to grow "
                f"to {new_num_tokens} tokens, only {len(self._free)} of {len(self._refcount)} are free")
        table = self._table(seq_id, model)
        num, pages = table
        bs = self._block_sizes[model]
        copies = []
        if new_num_tokens > num and num % bs != 0 and self._refcount[pages[-1]] > 1:
            shared = pages[-1]
            own = self._allocate(model)
            self._release(shared)
            pages[-1] = own
            copies.append((shared, own))
        while len(pages) < _ceil_div(new_num_tokens, bs):
            pages.append(self._allocate(model))
        table[0] = new_num_tokens
        return copies

    def truncate(self, seq_id: int, model: int, num_tokens: int) -> None:
        table = self._table(seq_id, model)
        if not 0 <= num_tokens <= table[0]:
            raise ValueError(f"truncate sequence {seq_id} model {model} to {num_tokens} tokens: "
                             f"must be in [0, {table[0]}]")
        self._release_tail(table[1], _ceil_div(num_tokens, self._block_sizes[model]))
        table[0] = num_tokens

    def fork(self, src_seq: int, dst_seq: int) -> None:
        src = self._seq(src_seq)
        if dst_seq in self._seqs:
            raise ValueError(f"cannot fork into sequence {dst_seq}: it already exists")
        for _, pages in src:
            for page in pages:
                self._refcount[page] += 1
        self._seqs[dst_seq] = [[num, list(pages)] for num, pages in src]

    def share_prefix(self, src_seq: int, dst_seq: int, model: int, num_tokens: int) -> None:
        self._check_model(model)
        if src_seq == dst_seq:
            raise ValueError(f"cannot share a prefix of sequence {src_seq} with itself")
        src, dst = self._seq(src_seq)[model], self._seq(dst_seq)[model]
        if not 0 <= num_tokens <= src[0]:
            raise ValueError(f"share {num_tokens} tokens of sequence {src_seq} model {model}: "
                             f"must be in [0, {src[0]}]")
        pages = src[1][:_ceil_div(num_tokens, self._block_sizes[model])]
        for page in pages:  # before releasing dst's: a page both hold never reaches refcount 0
            self._refcount[page] += 1
        self._release_tail(dst[1], 0)
        dst[0], dst[1] = num_tokens, pages

    # ------------------------------------------------------------------ accounting
    def can_allocate(self, num_pages: int) -> bool:
        if num_pages < 0:
            raise ValueError(f"can_allocate needs a page count >= 0, got {num_pages}")
        return num_pages <= len(self._free)

    def refcount(self, page: int) -> int:
        if not 0 <= page < len(self._refcount):
            raise IndexError(f"page {page} out of range [0, {len(self._refcount)})")
        return self._refcount[page]

    def free_list(self) -> list[int]:
        return list(self._free)

    def stats(self) -> dict:
        total, free = len(self._refcount), len(self._free)
        return {
            "total_pages": total,
            "free_pages": free,
            "used_pages": total - free,
            "pages_per_model": list(self._pages_per_model),
            "num_sequences": len(self._seqs),
            "block_sizes": list(self._block_sizes),
        }

    @property
    def num_pages(self) -> int:
        return len(self._refcount)

    @property
    def num_models(self) -> int:
        return len(self._block_sizes)

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def __repr__(self) -> str:
        return (f"ReferenceBlockPool(num_pages={self.num_pages}, free={self.num_free_pages}, "
                f"sequences={len(self._seqs)})")
