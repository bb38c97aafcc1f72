"""Model shapes the benchmarks time, written out as the published `config.json` fields.

Weights are random (see `arbitrage_fast.models.random_init`): only the shape matters for
speed, so nothing is downloaded. The `smoke-*` shapes are tiny stand-ins of the same
architectures (Llama with tied/untied head, Qwen2 with q/k/v biases) for CPU tests.

Published parameter counts, which `tests/test_random_init.py` checks these against:
Llama-3.2-1B 1.24e9, Llama-3.1-8B 8.03e9, Qwen2.5-1.5B 1.54e9, Qwen2.5-7B 7.62e9.
"""
from __future__ import annotations

_LLAMA3_ROPE = {"rope_type": "llama3", "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192}

SHAPES: dict[str, dict] = {
    "llama-3.2-1b": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=2048,
        intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={**_LLAMA3_ROPE, "factor": 32.0}, tie_word_embeddings=True, hidden_act="silu",
        attention_bias=False, mlp_bias=False, bos_token_id=128000, eos_token_id=128001,
    ),
    "llama-3.1-8b": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={**_LLAMA3_ROPE, "factor": 8.0}, tie_word_embeddings=False, hidden_act="silu",
        attention_bias=False, mlp_bias=False, bos_token_id=128000, eos_token_id=128001,
    ),
    "qwen2.5-1.5b": dict(
        model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=151936, hidden_size=1536,
        intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
        max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1000000.0, sliding_window=131072,
        use_sliding_window=False, max_window_layers=21, tie_word_embeddings=True, hidden_act="silu",
        bos_token_id=151643, eos_token_id=151643,
    ),
    "qwen2.5-7b": dict(
        model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=152064, hidden_size=3584,
        intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1000000.0, sliding_window=131072,
        use_sliding_window=False, max_window_layers=28, tie_word_embeddings=False, hidden_act="silu",
        bos_token_id=151643, eos_token_id=151643,
    ),
    # Tiny twins for CPU smoke runs: same code paths, seconds instead of minutes.
    "smoke-llama-draft": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=512, hidden_size=64,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={**_LLAMA3_ROPE, "factor": 32.0}, tie_word_embeddings=True, hidden_act="silu",
        bos_token_id=1, eos_token_id=2,
    ),
    "smoke-llama-target": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=512, hidden_size=128,
        intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={**_LLAMA3_ROPE, "factor": 8.0}, tie_word_embeddings=False, hidden_act="silu",
        bos_token_id=1, eos_token_id=2,
    ),
    "smoke-qwen2": dict(
        model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=640, hidden_size=96,
        intermediate_size=192, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0, sliding_window=32768,
        use_sliding_window=False, max_window_layers=2, tie_word_embeddings=False, hidden_act="silu",
        bos_token_id=1, eos_token_id=2,
    ),
}

REAL_SHAPES = ("llama-3.2-1b", "qwen2.5-1.5b", "llama-3.1-8b", "qwen2.5-7b")
SMOKE_SHAPES = ("smoke-llama-draft", "smoke-qwen2", "smoke-llama-target")

# Draft/target pairs share a vocabulary (the engine passes token ids between them directly).
PAIRS = {"llama": ("llama-3.2-1b", "llama-3.1-8b"), "smoke": ("smoke-llama-draft", "smoke-llama-target")}


def get_shape(name: str) -> dict:
    if name not in SHAPES:
        raise KeyError(f"unknown shape {name!r}; expected one of {', '.join(SHAPES)}")
    return dict(SHAPES[name])


def hf_config(name: str):
    """The shape as a transformers config object (what `DecoderSpec.from_hf_config` reads)."""
    from arbitrage_fast.models.random_init import config_from_dict

    return config_from_dict(get_shape(name))
