"""Finished requests' KV kept for later ones (automatic prefix caching, as vLLM's and SGLang's).

Off by default (`EngineConfig(prefix_cache=True)`, `serve --enable-prefix-caching`): a sweep
times each request alone, and a kept page is a page the pool does not count as free.

When a request ends (finished or aborted), the whole pages of the context it computed in each
model stay in the pool under a holder sequence of this cache's own, shared with the request's
pages (reference counted, copy-on-write) exactly as running requests share theirs. A later
request whose context starts with the same tokens takes them at catch-up instead of computing
them: prefix_sharing.py asks the running requests and this cache alike. Multi-turn chat is the
case that pays most (each turn's prompt begins with the whole conversation before it), then a
system prompt or template shared by every request.

An entry holds, per model, the committed tokens whose KV it has: the same rule as for running
donors (KV past the committed context is never offered), cut to whole pages. An entry whose
tokens another entry extends in every model is dropped (the longer one holds its pages too).
Entries are evicted least recently used, before any running request is preempted: when a
forward cannot reserve its room and when a waiting request needs pages to be admitted.
Evicting an entry returns only the pages no running request still shares.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass

from .kv.paged_cache import PagedKVCache
from .prefix_sharing import common_prefix_len
from .roles import Role
from .sequence import Sequence


@dataclass(frozen=True)
class CachedPrefix:
    seq_id: int  # the holder sequence in the pool (negative: never a request's id)
    tokens: dict[Role, list[int]]  # per model, the tokens whose KV the holder has (whole pages)

    def covers(self, other: "CachedPrefix") -> bool:
        """True when this entry holds every token of `other` in every model `other` has."""
        return all(role in self.tokens and len(ids) <= len(self.tokens[role])
                   and common_prefix_len(ids, self.tokens[role]) == len(ids) for role, ids in other.tokens.items())


class PrefixCache:
    def __init__(self, cache: PagedKVCache) -> None:
        self.cache = cache
        self._entries: OrderedDict[int, CachedPrefix] = OrderedDict()  # least recently used first
        self._holder_ids = itertools.count(-1, -1)
        self.hits = 0  # prefixes taken from an entry

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[CachedPrefix]:
        return list(self._entries.values())

    def retain(self, seq: Sequence, roles) -> None:
        """Keep the whole pages of what `seq` computed in each of `roles` (before it is freed)."""
        tokens = {}
        for role in roles:
            page = self.cache.block_size(role)
            n = min(len(seq.tokens(role)), self.cache.num_tokens(seq.seq_id, role))
            if n - n % page:
                tokens[role] = list(seq.tokens(role)[:n - n % page])
        if not tokens:
            return
        entry = CachedPrefix(next(self._holder_ids), tokens)
        for old in list(self._entries.values()):
            if old.covers(entry):
                self._entries.move_to_end(old.seq_id)
                return
        self.cache.add_sequence(entry.seq_id)
        for role, ids in tokens.items():
            self.cache.share_prefix(seq.seq_id, entry.seq_id, role, len(ids))
        for old in [e for e in self._entries.values() if entry.covers(e)]:
            self._drop(old.seq_id)
        self._entries[entry.seq_id] = entry

    def hit(self, seq_id: int) -> None:
        """A request took this entry's prefix: it is now the last to be evicted."""
        self._entries.move_to_end(seq_id)
        self.hits += 1

    def evict_one(self) -> bool:
        """Drop the least recently used entry; False when there is none."""
        if not self._entries:
            return False
        self._drop(next(iter(self._entries)))
        return True

    def clear(self) -> None:
        while self.evict_one():
            pass

    def stats(self) -> dict:
        return {"entries": len(self._entries), "hits": self.hits,
                "tokens": sum(len(ids) for e in self._entries.values() for ids in e.tokens.values())}

    def _drop(self, seq_id: int) -> None:
        del self._entries[seq_id]
        self.cache.free_sequence(seq_id)
