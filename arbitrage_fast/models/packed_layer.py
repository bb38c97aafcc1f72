"""A whole decoder layer as one compiled CPU op.

With exact arithmetic off (LlamaDecoder.set_exact_arithmetic), a layer's modules run nothing
but compiled kernels, yet a decode token still pays ten module calls, their Python and a
dozen dispatches per layer: on two cores about a sixth of a 0.5B model's token, time that
llama.cpp, running its graph in C++, does not spend. `PackedLayer` hands the layer's weights
(GGUF blocks, the int3 blocks of a quantized-on-load model, or a 16/32-bit layer's weights:
oneDNN-packed, for the engine's bf16 kernel, or plain) to
`torch.ops.arbitrage_fast.decoder_layer` (csrc/decoder_layer_cpu.cpp), which calls the same
kernels in the same order, so the outputs are the modules' bit for bit.

It serves host-form batches on the CPU outside batch-invariant mode, in the model's dtype; any
other forward takes the modules. Built once at load from the layer's modules: packed models
are not modified afterwards.
"""
from __future__ import annotations

import torch
from torch import nn

from arbitrage_fast.kv.ops import native_available
from arbitrage_fast.runtime.attention_metadata import AttentionMetadata

from .cpu_linear import Bf16Linear, PackedLinear
from .quantize_on_load import Int3Linear
from .quantized_linear import QuantizedLinear

# The op's tags of the parts that are not a QuantizedLinear's (a ggml type, or DENSE):
INT3, ONEDNN, BF16, LINEAR = -2, -3, -4, -5
SINGLE_WEIGHT = {PackedLinear: ("packed", ONEDNN), Bf16Linear: ("weight", BF16), nn.Linear: ("weight", LINEAR)}
LAYER_LINEARS = (QuantizedLinear, Int3Linear, *SINGLE_WEIGHT)


def _parts(linear: nn.Module) -> tuple[list[torch.Tensor], list[int], torch.Tensor | None]:
    if isinstance(linear, Int3Linear):
        return [linear.blocks], [INT3], linear.bias
    if isinstance(linear, QuantizedLinear):
        weights = linear.weights()
        return [w for w, _ in weights], [q for _, q in weights], linear.bias
    attr, tag = SINGLE_WEIGHT[type(linear)]
    return [getattr(linear, attr)], [tag], linear.bias


def projections_of(layer: nn.Module) -> tuple[nn.Module, ...]:
    return layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj


class PackedLayer:
    def __init__(self, layer: nn.Module, projections: tuple[nn.Module, ...] | None = None) -> None:
        """projections: the layer's qkv, o, gate/up and down linears by default; another set
        of the same shapes (a 16-bit copy of them, dense_copy.py) runs the same layer."""
        attn = layer.self_attn
        self.norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
        self.eps = layer.input_layernorm.eps
        self.layer_idx, self.heads, self.kv_heads, self.scale = (attn.layer_idx, attn.num_heads, attn.num_kv_heads,
                                                                 attn.scale)
        projections = projections or projections_of(layer)
        self.projections = tuple(part for p in projections for part in _parts(p))
        groups = {p.group for p in projections if isinstance(p, Int3Linear)}
        self.int3_group = groups.pop() if groups else 0
        self.dtype = self.norms[0].dtype

    @staticmethod
    def eligible(layer: nn.Module) -> bool:
        """Every projection a kind the op computes (int3 ones in one group size), full attention,
        the extension built."""
        projections = projections_of(layer)
        return (all(type(p) in LAYER_LINEARS for p in projections)
                and len({p.group for p in projections if isinstance(p, Int3Linear)}) <= 1
                and layer.self_attn.sliding_window is None
                and layer.input_layernorm.weight.dtype == layer.post_attention_layernorm.weight.dtype
                and native_available("cpu"))

    def serves(self, h: torch.Tensor, meta: AttentionMetadata, kv_cache: torch.Tensor) -> bool:
        return (not meta.batch_invariant and not meta.on_device_only and h.device.type == "cpu"
                and h.dtype == self.dtype == kv_cache.dtype)

    def __call__(self, h, residual, cos, sin, meta: AttentionMetadata, kv_cache):
        return torch.ops.arbitrage_fast.decoder_layer(
            h, residual, *self.norms, self.eps, *self.projections, cos, sin, kv_cache, self.layer_idx,
            meta.slot_mapping, meta.block_tables, meta.cu_query_lens, meta.seq_lens_tensor, self.heads,
            self.kv_heads, self.scale, self.int3_group)
