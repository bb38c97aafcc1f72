"""Plumbing shared by the Triton kernels: one guarded import, the dispatch rule, launch sizes.

Triton is optional (CPU-only installs may lack it, and some wheels fail to import without a
driver), so every kernel module imports it through here and exposes `HAS_TRITON`; the torch
references keep working either way.

The dispatch rule, the same for every kernel module: each exports one public op (say
`first_step_end`) beside its Triton launcher (`*_triton`) and its torch twin (`*_reference`).
The op runs the Triton kernel on CUDA tensors and the twin on anything else, so callers never
choose. The decoder's ops (norm, RoPE with the KV write, SiLU-mul, paged attention) also have
compiled CPU kernels (csrc/decoder_ops.cpp, csrc/paged_attention_cpu.cpp), which the op runs on
CPU tensors where the extension is built (`native_cpu`): RoPE's always, being the twin's bit for
bit; the others only when the caller passes `exact=False`, as they sum or round within ulps of
the twin, not to it. CPU tensors never go through the Triton interpreter from the op, even with
TRITON_INTERPRET=1 (the test suite sets it): the interpreter is for testing a kernel, which the
tests do by calling the launcher directly.
"""
from __future__ import annotations

import functools
import os

import torch

try:  # pragma: no cover - depends on the install
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # ImportError, or a wheel that cannot load its backend here
    triton = None
    tl = None
    HAS_TRITON = False


# `triton.jit` picks the interpreter when a kernel is defined, so what counts is the setting
# when the kernel modules were imported (they import this module first), not a later one.
INTERPRETED = HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """The dispatch rule: the Triton kernel for CUDA tensors, the torch twin for all others."""
    return HAS_TRITON and all(t.is_cuda for t in tensors)


@functools.lru_cache(maxsize=None)
def _native_cpu_built() -> bool:
    from arbitrage_fast.kv.ops import native_available  # lazily: kv imports nothing from here

    return native_available("cpu")


def native_cpu(*tensors: torch.Tensor) -> bool:
    """Whether the compiled CPU kernels serve these tensors (all on the CPU, extension built)."""
    return all(t.device.type == "cpu" for t in tensors) and _native_cpu_built()


def triton_usable(*tensors: torch.Tensor) -> bool:
    """Whether a launcher can run on these tensors: on the GPU, or built for the interpreter."""
    if not HAS_TRITON:
        return False
    return INTERPRETED or all(t.is_cuda for t in tensors)


def require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed; use the *_reference function instead")


def next_pow2(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum): Triton block shapes must be powers of two."""
    n = max(int(n), minimum, 1)
    return 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int | None) -> int:
    """Streaming multiprocessors of a CUDA device (1 on CPU, where only the interpreter runs)."""
    if device_index is None or not torch.cuda.is_available():
        return 1
    return torch.cuda.get_device_properties(device_index).multi_processor_count
