"""Build the native decoder from a GGUF file with its quantized weights kept as stored.

On the CPU every linear weight of a type in `gguf_ops.PACKED_TYPES` becomes part of a
`QuantizedLinear`, the token embeddings a `QuantizedEmbedding` (a tied LM head shares their
blocks), run by the compiled GGUF kernels. On any other device (layout "group") the same
tensors are rewritten value for value in the engine's group-wise layout (`gguf_repack`) and
become `GroupQuantLinear` / `GroupQuantEmbedding` parts, run by the Triton kernel. The small
float tensors (norms, biases) load in the model's dtype. Quantized types without a kernel are
dequantised at load, and the load says so once. The result is the same `LlamaDecoder` the
dequantising loader builds, so the runner, the arena and the policies see no difference;
resident weight memory is about the file's size (on the CPU; see `gguf_repack` for the GPU's).

Blocks are checked before use: a tensor whose bytes run past the end of the file, or whose
blocks carry non-finite scales, is refused with its name.
"""
from __future__ import annotations

import logging
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from . import gguf_ops
from .architecture import DecoderSpec
from .gguf_directory import GGUFDirectory, GGUFFormatError
from .gguf_repack import repack
from .group_quant_linear import GroupQuantEmbedding, GroupQuantLinear
from .llama import LlamaDecoder
from .quantized_linear import DENSE, QuantizedEmbedding, QuantizedLinear

log = logging.getLogger(__name__)
QT = gguf.GGMLQuantizationType
FLOAT_TYPES = {QT.F32, QT.F16, QT.BF16}
LAYOUTS = ("gguf", "group")  # the CPU kernels' blocks as stored; the Triton kernel's layout


class CorruptTensorError(ValueError):
    """A tensor's stored blocks are truncated or carry invalid scales."""


class _Tensors:
    """The file's tensors by name, each as (packed blocks, qtype) or (dense tensor, DENSE)."""

    def __init__(self, path: Path, dtype: torch.dtype) -> None:
        try:
            self._dir = GGUFDirectory(path)
        except GGUFFormatError as e:
            raise CorruptTensorError(str(e)) from None
        self.path, self.dtype = path, dtype
        self.architecture = self._dir.architecture
        self.dequantised: dict[str, list[str]] = {}

    def get(self, name: str) -> tuple[torch.Tensor, int]:
        t = self._dir.tensors.get(name)
        if t is None:
            raise KeyError(name)
        data = self._dir.array(t)
        if t.qtype == QT.BF16:
            return torch.from_numpy(data.view(np.int16)).view(torch.bfloat16).reshape(t.shape).to(self.dtype), DENSE
        if t.qtype in FLOAT_TYPES:
            return torch.from_numpy(data).to(self.dtype), DENSE
        if int(t.qtype) not in gguf_ops.PACKED_TYPES:
            self.dequantised.setdefault(t.qtype.name, []).append(name)
            dense = gguf.quants.dequantize(data, t.qtype).reshape(t.shape)
            return torch.from_numpy(np.ascontiguousarray(dense)).to(self.dtype), DENSE
        blocks = torch.from_numpy(data)
        bad = gguf_ops.nonfinite_blocks(blocks, int(t.qtype))
        if bad:
            raise CorruptTensorError(f"{self.path}: tensor {name!r} has {bad} {t.qtype.name} block(s) with a "
                                     "NaN or infinite scale; the file is corrupt")
        return blocks, int(t.qtype)


def _permute_back(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's interleaving of q/k rows for its rotary layout (its converter permutes
    them for the `llama` architecture, as transformers undoes): it stores
    w.reshape(n_head, 2, dim).swapaxes(1, 2); rows are whole, so packed blocks move like floats."""
    dim = t.shape[0] // n_head // 2
    return t.reshape(n_head, dim, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def build(path: Path, spec: DecoderSpec, dtype: torch.dtype, device: str | torch.device = "cpu",
          layout: str | None = None) -> LlamaDecoder:
    """The decoder on `device`, its packed weights in `layout`: "gguf" on the CPU and "group"
    elsewhere unless given (the group layout runs on the CPU too, by the kernel's torch twin)."""
    device = torch.device(device)
    layout = layout or ("gguf" if device.type == "cpu" else "group")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown packed layout {layout!r}; expected one of {list(LAYOUTS)}")
    if layout == "gguf" and device.type != "cpu":
        raise ValueError(f"GGUF blocks as stored run on the CPU only, not on {device}; use the group layout")
    tensors = _Tensors(path, dtype)

    def linear(parts: list[tuple[torch.Tensor, int]], bias: torch.Tensor | None) -> nn.Module:
        return _quantized(parts, bias) if layout == "gguf" else _group_quantized(parts, bias, device)

    llama_rows = tensors.architecture == "llama"

    def take(name: str) -> tuple[torch.Tensor, int]:
        try:
            return tensors.get(name)
        except KeyError:
            raise CorruptTensorError(f"{path}: tensor {name!r} is missing from the file") from None

    def take_qk(name: str, n_head: int) -> tuple[torch.Tensor, int]:
        t, q = take(name)
        return (_permute_back(t, n_head), q) if llama_rows else (t, q)

    def bias(*names: str) -> torch.Tensor:
        return torch.cat([take(n)[0] for n in names])

    def place(owner: nn.Module, attr: str, layer: nn.Module, what: str) -> None:
        """Put a loaded layer where the config's (meta) layer is, if their shapes agree."""
        meta = getattr(owner, attr)
        if _shape(layer) != _shape(meta):
            raise CorruptTensorError(f"{path}: {what} is {_shape(layer)} in the file, the config implies {_shape(meta)}")
        setattr(owner, attr, layer)

    with torch.device("meta"):
        model = LlamaDecoder(spec)
    plain: dict[str, torch.Tensor] = {"norm.weight": take("output_norm.weight")[0]}
    embed, embed_type = take("token_embd.weight")
    if embed_type != DENSE and layout == "group":
        # Repacked once and placed on the device now: a tied LM head shares the embedding's packed
        # table, and moving the model later would give each module its own copy of a buffer.
        embed = repack(embed, embed_type, _in_features(embed, embed_type)).to(device)
        table: nn.Module = GroupQuantEmbedding(embed, dtype)
    elif embed_type != DENSE:
        table = QuantizedEmbedding(embed, embed_type, _in_features(embed, embed_type), dtype)
    else:
        table = nn.Embedding.from_pretrained(embed, freeze=True)
    place(model, "embed_tokens", table, "token_embd.weight")
    if spec.tie_word_embeddings and embed_type != DENSE and layout == "group":
        head_layer = GroupQuantLinear([embed])
    else:
        head_layer = linear([(embed, embed_type) if spec.tie_word_embeddings else take("output.weight")], None)
    place(model, "lm_head", head_layer, "the LM head")
    for i, layer in enumerate(model.layers):
        p = f"blk.{i}."
        attn, mlp = layer.self_attn, layer.mlp
        qkv = [take_qk(p + "attn_q.weight", spec.num_heads), take_qk(p + "attn_k.weight", spec.num_kv_heads),
               take(p + "attn_v.weight")]
        qkv_bias = None
        if spec.qkv_bias:
            qkv_bias = torch.cat([take_qk(p + "attn_q.bias", spec.num_heads)[0],
                                  take_qk(p + "attn_k.bias", spec.num_kv_heads)[0], take(p + "attn_v.bias")[0]])
        place(attn, "qkv_proj", linear(qkv, qkv_bias), p + "attn_q/k/v")
        place(attn, "o_proj", linear([take(p + "attn_output.weight")],
                                     bias(p + "attn_output.bias") if spec.o_bias else None), p + "attn_output")
        place(mlp, "gate_up_proj", linear([take(p + "ffn_gate.weight"), take(p + "ffn_up.weight")],
                                          bias(p + "ffn_gate.bias", p + "ffn_up.bias") if spec.mlp_bias else None),
              p + "ffn_gate/up")
        place(mlp, "down_proj", linear([take(p + "ffn_down.weight")],
                                       bias(p + "ffn_down.bias") if spec.mlp_bias else None), p + "ffn_down")
        plain[f"layers.{i}.input_layernorm.weight"] = take(p + "attn_norm.weight")[0]
        plain[f"layers.{i}.post_attention_layernorm.weight"] = take(p + "ffn_norm.weight")[0]
    model.load_state_dict(plain, strict=False, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta and n != "rotary.inv_freq"]
    if left:
        raise CorruptTensorError(f"{path}: no tensor in the file fills {left}")
    model.rotary.inv_freq = spec.inv_freq.to(device)
    for type_name, names in tensors.dequantised.items():
        log.warning("%s: %d %s tensor(s) have no packed kernel and were dequantised at load (e.g. %s)",
                    path.name, len(names), type_name, names[0])
    return model.to(device).eval().requires_grad_(False)


def _quantized(parts: list[tuple[torch.Tensor, int]], bias: torch.Tensor | None) -> nn.Module:
    """A fused projection: packed where any part is packed, a plain nn.Linear otherwise
    (then bf16 packing for oneDNN applies to it as to any checkpoint's linear)."""
    if all(q == DENSE for _, q in parts):
        weight = parts[0][0] if len(parts) == 1 else torch.cat([w for w, _ in parts])
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        layer.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias, requires_grad=False)
        return layer
    w, q = next((w, q) for w, q in parts if q != DENSE)
    return QuantizedLinear(parts, _in_features(w, q), bias)


def _group_quantized(parts: list[tuple[torch.Tensor, int]], bias: torch.Tensor | None,
                     device: torch.device) -> nn.Module:
    """`_quantized` for the Triton kernel: packed parts repacked in the group-wise layout, each
    moved to the device as it is made (a whole model's repacked parts need not sit on the CPU)."""
    if all(q == DENSE for _, q in parts):
        return _quantized(parts, bias)
    return GroupQuantLinear([w if q == DENSE else repack(w, q, _in_features(w, q)).to(device) for w, q in parts],
                            bias)


def _shape(layer: nn.Module) -> tuple[int, int]:
    if hasattr(layer, "out_features"):
        return layer.out_features, layer.in_features
    return layer.num_embeddings, layer.embedding_dim


def _in_features(blocks: torch.Tensor, qtype: int) -> int:
    if qtype == DENSE:
        return blocks.shape[1]
    elems, size = gguf_ops.block_shape(qtype)
    return blocks.shape[1] // size * elems
