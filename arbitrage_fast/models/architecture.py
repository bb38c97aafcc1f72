"""What the native decoder needs to know about a checkpoint, read once from its HF config.

Keeping this separate from the loader means the forward never touches a transformers
config object: every architecture quirk is decided here, where it can be tested alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


class UnsupportedArchitectureError(ValueError):
    """The checkpoint is not a Llama-family causal LM this engine can run."""


@dataclass(frozen=True)
class DecoderSpec:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    # Per-layer sliding window (None = full attention), as transformers applies it.
    sliding_windows: tuple[int | None, ...]
    inv_freq: torch.Tensor
    rope_attention_scaling: float

    @property
    def kv_elems_per_token(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, config) -> "DecoderSpec":
        archs = list(getattr(config, "architectures", None) or [])
        model_type = getattr(config, "model_type", None)
        arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None and not archs and model_type in SUPPORTED_ARCHITECTURES.values():
            arch = model_type
        if arch is None:
            raise UnsupportedArchitectureError(
                f"unsupported architecture {archs or model_type!r}: the engine runs causal LMs of the "
                f"Llama family ({', '.join(sorted(SUPPORTED_ARCHITECTURES))})"
            )
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        if num_heads % num_kv_heads:
            raise UnsupportedArchitectureError(
                f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}"
            )
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise UnsupportedArchitectureError(f"unsupported hidden_act {act!r} (expected 'silu')")
        if arch == "qwen2":
            qkv_bias, o_bias, mlp_bias = True, False, False
        else:
            qkv_bias = o_bias = bool(getattr(config, "attention_bias", False))
            mlp_bias = bool(getattr(config, "mlp_bias", False))
        inv_freq, scaling = _rope_frequencies(config, head_dim)
        return cls(
            architecture=arch,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=config.rms_norm_eps,
            max_position_embeddings=config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            sliding_windows=_sliding_windows(config, arch),
            inv_freq=inv_freq,
            rope_attention_scaling=scaling,
        )


def _sliding_windows(config, arch: str) -> tuple[int | None, ...]:
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None:
        return (None,) * n
    if layer_types is not None:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if arch == "mistral":
        return (window,) * n
    return (None,) * n


def _rope_frequencies(config, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies exactly as transformers computes them (Llama-3 scaling included).

    Reusing transformers' own initialisers is what makes the native forward bit-compatible
    with `generate` for every rope_type it knows.
    """
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        return inv_freq, 1.0
    if rope_type in ("dynamic", "longrope"):
        raise UnsupportedArchitectureError(f"rope_type {rope_type!r} depends on sequence length; not supported")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise UnsupportedArchitectureError(f"unknown rope_type {rope_type!r}")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return inv_freq.float(), float(scaling)
