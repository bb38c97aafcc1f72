"""Writing K/V into pages and copying pages.

`write_kv` and `copy_pages` call the compiled ops (`torch.ops.arbitrage_fast.*`, registered by
`arbitrage_fast._C`) when the extension is built for the tensors' device, and the pure-torch
references otherwise. The references define what is correct; tests compare the two.

    write_kv(cache[P, L, 2, bs, H, D], layer, key[N, H, D], value[N, H, D], slots[N] int64)
        cache[slots[i] // bs, layer, 0, slots[i] % bs] = key[i]; value goes to index 1;
        slot -1 is padding and is skipped. `cache` is a strided view of the arena.
    copy_pages(arena[P, E], src[n] int64, dst[n] int64)
        arena[dst[i]] = arena[src[i]]; no dst page may also be a src page.
"""

from __future__ import annotations

import torch


def _native_devices() -> frozenset[str]:
    try:
        from arbitrage_fast import _C
    except ImportError:
        return frozenset()
    return frozenset({"cpu", "meta", "cuda"} if _C.has_cuda else {"cpu", "meta"})


_NATIVE_DEVICES = _native_devices()


def write_kv_reference(cache: torch.Tensor, layer: int, key: torch.Tensor, value: torch.Tensor,
                       slots: torch.Tensor) -> None:
    keep = slots >= 0
    written = slots[keep]
    block_size = cache.shape[3]
    page, offset = written // block_size, written % block_size
    cache[page, layer, 0, offset] = key[keep]
    cache[page, layer, 1, offset] = value[keep]


def copy_pages_reference(arena: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    arena[dst] = arena[src]


def write_kv(cache: torch.Tensor, layer: int, key: torch.Tensor, value: torch.Tensor,
             slots: torch.Tensor) -> None:
    """Store key[i], value[i] at token slot slots[i] of `layer` (slot -1: skip)."""
    if cache.device.type in _NATIVE_DEVICES:
        torch.ops.arbitrage_fast.write_kv(cache, layer, key, value, slots)
    else:
        write_kv_reference(cache, layer, key, value, slots)


def copy_pages(arena: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy whole pages src[i] -> dst[i] (copy-on-write after a fork)."""
    if arena.device.type in _NATIVE_DEVICES:
        torch.ops.arbitrage_fast.copy_pages(arena, src, dst)
    else:
        copy_pages_reference(arena, src, dst)


def native_available(device: torch.device | str) -> bool:
    """Whether the compiled ops serve tensors on `device`."""
    if isinstance(device, str) and ":" not in device:  # the per-call form ("cpu"): no torch.device to build
        return device in _NATIVE_DEVICES
    return torch.device(device).type in _NATIVE_DEVICES
