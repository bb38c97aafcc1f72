"""Paged KV memory: the shared arena, its block pool, and the ops that write into it."""

from .ops import copy_pages, write_kv
from .paged_cache import KVSpec, PagedKVCache
from .reference_pool import KVCacheExhausted, ReferenceBlockPool

__all__ = ["KVCacheExhausted", "KVSpec", "PagedKVCache", "ReferenceBlockPool", "copy_pages", "write_kv"]
