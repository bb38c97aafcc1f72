"""Tiny random-weight draft/target checkpoints with a real BPE tokenizer, built on the spot.

Weights are scaled up from the default init so greedy argmaxes are far from ties: exactness
tests then compare real decisions, not rounding noise.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from .tiny_prm import build_tokenizer

_ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


def build_tiny_lm(folder: str | Path, arch: str = "llama", *, hidden: int = 64, layers: int = 2, heads: int = 4,
                  kv_heads: int = 2, seed: int = 0, tie: bool = True, init_std: float = 0.1,
                  max_positions: int = 512, boundary_bias: float = 0.0, noise: float = 0.0, noise_seed: int = 99,
                  vocab_size: int = 300, **extra) -> Path:
    """Save a random causal LM + tokenizer with save_pretrained; returns the folder.

    boundary_bias adds to the LM-head rows of "\\n\\n"-containing tokens so that steps
    end on real boundaries, not only at the per-step cap. noise (relative to init_std) perturbs
    every weight: the same seed with noise gives a model that mostly, not always, agrees.
    """
    folder = Path(folder)
    tok = build_tokenizer(vocab_size)
    cfg_cls, model_cls = _ARCHS[arch]
    cfg = cfg_cls(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
        tie_word_embeddings=tie, initializer_range=init_std, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **extra,
    )
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    if noise:
        g = torch.Generator().manual_seed(noise_seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * noise * init_std)
    if boundary_bias:
        ids = [i for i, t in enumerate(tok.batch_decode([[i] for i in range(len(tok))])) if "\n\n" in t]
        with torch.no_grad():
            model.get_output_embeddings().weight[ids] += boundary_bias * model.config.initializer_range
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
