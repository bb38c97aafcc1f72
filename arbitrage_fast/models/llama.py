"""Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5) over the paged KV arena.

Parameter names follow transformers' so checkpoints map one to one, except two fusions
(q/k/v into `qkv_proj`, gate/up into `gate_up_proj`) done at load time: fewer, larger
GEMMs per layer is most of what makes a batch-1 decode fast on any device.
"""
from __future__ import annotations

import torch
from torch import nn

from arbitrage_fast.runtime.attention_metadata import AttentionMetadata

from .architecture import DecoderSpec
from .attention import PagedAttention
from .layers import GatedMLP, RMSNorm, RotaryEmbedding
from .packed_layer import PackedLayer


class DecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = PagedAttention(
            layer_idx, spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim,
            spec.qkv_bias, spec.o_bias, spec.sliding_windows[layer_idx],
        )
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = GatedMLP(spec.hidden_size, spec.intermediate_size, spec.mlp_bias)
        self.one_op: PackedLayer | None = None  # the whole layer as one CPU op (set_exact_arithmetic)
        self.wide_op: PackedLayer | None = None  # the same over a 16-bit copy of packed weights (dense_copy.py)

    def forward(self, h, residual, cos, sin, meta, kv_cache, wide: bool = False):
        """(this layer's MLP output, the residual stream before it): the add that closes the
        layer happens in the next norm's kernel, so each norm costs one launch. `wide`: the
        forward is wide enough for the layer's dense copy, where it has one."""
        op = self.wide_op if wide and self.wide_op is not None else self.one_op
        if op is not None and op.serves(h, meta, kv_cache):
            return op(h, residual, cos, sin, meta, kv_cache)
        if residual is None:  # the first layer: the embedding is the stream
            normed, residual = self.input_layernorm(h), h
        else:
            normed, residual = self.input_layernorm(h, residual)
        attn = self.self_attn(normed, cos, sin, meta, kv_cache)
        normed, residual = self.post_attention_layernorm(attn, residual)
        return self.mlp(normed), residual


class LlamaDecoder(nn.Module):
    """`forward` returns the final *normed* hidden states; `compute_logits` maps them to fp32 logits.

    Keeping the two apart lets the runner take logits only where it samples, and hands the
    router the exact hidden states the LM head reads.
    """

    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.rotary = RotaryEmbedding(spec.inv_freq, spec.rope_attention_scaling)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Forwards of at least dense_rows tokens run the layers' dense copies and dense_head
        # (dense_copy.py); None: one set of weights.
        self.dense_rows: int | None = None
        self.dense_head: nn.Module | None = None

    def set_exact_arithmetic(self, exact: bool) -> None:
        """Whether the norms, the MLP activation and the attention keep transformers' arithmetic
        (True, the default: greedy tokens equal transformers' in fp32) or may run the compiled
        CPU kernels, which sum in another order (within ulps) and cost several times less per
        token. Packed quantized weights already depart from transformers' outputs by their
        rounding, so their loaders turn it off."""
        for m in self.modules():
            if isinstance(m, (RMSNorm, GatedMLP, PagedAttention)):
                m.exact = exact
        for layer in self.layers:  # each layer then runs as one op where its linears allow (packed_layer.py)
            layer.one_op = PackedLayer(layer) if not exact and PackedLayer.eligible(layer) else None
            layer.wide_op = None  # a dense copy belongs to the ops it was made beside
        self.dense_rows, self.dense_head = None, None

    def _wide(self, rows: int) -> bool:
        return self.dense_rows is not None and rows >= self.dense_rows

    def _layers(self, input_ids: torch.Tensor, meta: AttentionMetadata,
                kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(last MLP output, residual stream before it): their sum is the last layer's output."""
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary(meta.positions, h.dtype)
        residual = None
        wide = self._wide(input_ids.numel())
        for layer in self.layers:
            h, residual = layer(h, residual, cos, sin, meta, kv_cache, wide)
        return h, residual

    def forward_residual(self, input_ids: torch.Tensor, meta: AttentionMetadata, kv_cache: torch.Tensor) -> torch.Tensor:
        """Last layer's output before the final norm (what a fused norm+router kernel reads)."""
        h, residual = self._layers(input_ids, meta, kv_cache)
        return residual + h

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, kv_cache: torch.Tensor) -> torch.Tensor:
        h, residual = self._layers(input_ids, meta, kv_cache)
        return self.norm(h, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.dense_head is not None and self._wide(hidden.numel() // hidden.shape[-1]):
            return self.dense_head(hidden).float()
        return self.lm_head(hidden).float()
