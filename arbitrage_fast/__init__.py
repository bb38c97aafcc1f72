"""arbitrage-fast: step-level speculative reasoning with a router fused into the draft.

A small draft model writes each reasoning step; a policy keeps it or escalates to the
large target model. Public API: `Engine`, `EngineConfig`, `SamplingParams`.
"""
from __future__ import annotations

__version__ = "0.1.0"

from ._kernels_path import install as _install_kernels_path

_install_kernels_path()  # a source checkout maps triton_kernels/ to arbitrage_fast.triton_kernels

__all__ = ["Engine", "EngineConfig", "SamplingParams", "GenerationResult", "Step", "KVCacheExhausted", "POLICY_NAMES"]


def __getattr__(name: str):
    # Lazy so that `import arbitrage_fast._C` or the kernels never pay for torch/transformers imports.
    if name in ("Engine", "ModelMismatchError"):
        from . import engine
        return getattr(engine, name)
    if name in ("EngineConfig", "SamplingParams"):
        from . import config
        return getattr(config, name)
    if name in ("GenerationResult", "Step"):
        from . import sequence
        return getattr(sequence, name)
    if name == "KVCacheExhausted":
        from .kv import KVCacheExhausted
        return KVCacheExhausted
    if name == "POLICY_NAMES":
        from .policies import POLICY_NAMES
        return POLICY_NAMES
    raise AttributeError(f"module 'arbitrage_fast' has no attribute {name!r}")
