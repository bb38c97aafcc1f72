"""Tiny GGUF files written on the spot, dequantised twins of packed models, and a plain
greedy loop over the native decoder (one sequence, its own KV pages, no engine).

`write_tiny_gguf` writes the tensors of a tiny Llama/Qwen2 checkpoint (shapes from its HF
config) as random quantized blocks of chosen types, so the packed loader can be compared with
the dequantised model of the very same file without a real checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from arbitrage_fast.models import gguf_ops, loader
from arbitrage_fast.models.architecture import DecoderSpec
from arbitrage_fast.models.gguf_random import random_blocks
from arbitrage_fast.runtime.attention_metadata import AttentionMetadata

HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}

QT = gguf.GGMLQuantizationType
# Block scales that give weights of a trained model's size (|w| up to ~0.1): d times the
# format's largest integer (and times Q4_K's 6-bit and Q6_K's 8-bit sub-block scales).
REALISTIC_D = {QT.Q4_0: 0.1 / 8, QT.Q4_1: 0.1 / 15, QT.Q5_0: 0.1 / 16, QT.Q5_1: 0.1 / 31, QT.Q8_0: 0.1 / 127,
               QT.Q4_K: 0.1 / 15 / 63, QT.Q6_K: 0.1 / 32 / 127}


def _tensor(qtype: QT, rows: int, cols: int, gen: torch.Generator) -> np.ndarray:
    if qtype in (QT.F32, QT.F16):
        dense = torch.randn(rows, cols, generator=gen) * 0.05
        return dense.numpy().astype(np.float16 if qtype == QT.F16 else np.float32)
    if int(qtype) in gguf_ops.PACKED_TYPES:
        return random_blocks(int(qtype), rows, cols, gen, REALISTIC_D[qtype]).numpy()
    # A type without a kernel (Q5_K): random bytes with finite d and dmin at offsets 0 and 2.
    elems, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = torch.randint(0, 256, (rows, cols // elems, size), dtype=torch.uint8, generator=gen)
    scales = (torch.rand(rows, cols // elems, 2, generator=gen) * 2e-4 + 1e-5).to(torch.float16)
    blocks[:, :, :4] = scales.view(torch.uint8).reshape(rows, cols // elems, 4)
    return blocks.reshape(rows, -1).numpy()


def write_tiny_gguf(path: Path, config, arch: str, types: dict[str, QT], seed: int = 0) -> Path:
    """types maps a GGUF tensor-name suffix (attn_q, ffn_down, token_embd, output, ...) to its
    type; a suffix prefixed with `blk.N.` overrides it for one layer. Missing: Q8_0."""
    gen = torch.Generator().manual_seed(seed)
    head_dim = config.hidden_size // config.num_attention_heads
    H, I = config.hidden_size, config.intermediate_size
    q_rows, kv_rows = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    writer = gguf.GGUFWriter(str(path), arch)

    def add(name: str, short: str, rows: int, cols: int) -> None:
        qtype = types.get(name.removesuffix(".weight"), types.get(short, QT.Q8_0))
        data = _tensor(qtype, rows, cols, gen)
        writer.add_tensor(name, data, raw_dtype=None if qtype in (QT.F32, QT.F16) else qtype)

    def add_vector(name: str, n: int, base: float) -> None:
        writer.add_tensor(name, (base + 0.1 * torch.randn(n, generator=gen)).numpy())

    add("token_embd.weight", "token_embd", config.vocab_size, H)
    if not config.tie_word_embeddings:
        add("output.weight", "output", config.vocab_size, H)
    add_vector("output_norm.weight", H, 1.0)
    for i in range(config.num_hidden_layers):
        p = f"blk.{i}."
        for short, rows, cols in (("attn_q", q_rows, H), ("attn_k", kv_rows, H), ("attn_v", kv_rows, H),
                                  ("attn_output", H, q_rows), ("ffn_gate", I, H), ("ffn_up", I, H),
                                  ("ffn_down", H, I)):
            add(p + short + ".weight", short, rows, cols)
        if arch == "qwen2":
            for short, n in (("attn_q", q_rows), ("attn_k", kv_rows), ("attn_v", kv_rows)):
                add_vector(p + short + ".bias", n, 0.0)
        add_vector(p + "attn_norm.weight", H, 1.0)
        add_vector(p + "ffn_norm.weight", H, 1.0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def dequantised_reference(path, config, arch: str):
    """The dequantised model of a GGUF file, built without the packed loader's code: the
    `gguf` package dequantises every tensor, transformers' own tensor processor undoes llama's
    q/k permutation, and the dequantising loader's `_build` fuses and loads it (fp32)."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    processor = LlamaTensorProcessor(config={"num_attention_heads": config.num_attention_heads,
                                             "num_key_value_heads": config.num_key_value_heads})
    tensors = {}
    for t in gguf.GGUFReader(path).tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        if arch == "llama":
            w = processor.process(weights=w, name=t.name).weights
        if t.name.startswith("blk."):
            _, i, short, kind = t.name.split(".")
            name = f"model.layers.{i}.{HF_NAMES[short]}.{kind}"
        else:
            name = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
                    "output_norm.weight": "model.norm.weight"}[t.name]
        tensors[name] = torch.from_numpy(w.copy()).float()
    return loader._build(DecoderSpec.from_hf_config(config), tensors, torch.float32, "cpu", path)


def dequantised_copy(model):
    """The packed model with every packed layer replaced by its dequantised dense twin (the
    compiled dequantiser equals the `gguf` package's bit for bit; test_gguf_kernels.py)."""
    import copy

    from torch import nn

    from arbitrage_fast.models.quantized_linear import QuantizedEmbedding, QuantizedLinear

    dense = copy.deepcopy(model)
    for name, module in list(dense.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, QuantizedLinear):
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                linear.weight = nn.Parameter(child.dequantized_weight(), requires_grad=False)
                if child.bias is not None:
                    linear.bias = nn.Parameter(child.bias.float(), requires_grad=False)
                setattr(module, child_name, linear)
            elif isinstance(child, QuantizedEmbedding):
                table = gguf_ops.gguf_dequantize(child.blocks, child.qtype, child.embedding_dim)
                setattr(module, child_name, nn.Embedding.from_pretrained(table, freeze=True))
    return dense


class Session:
    """One sequence over its own KV pages: `feed` runs a forward over new tokens (a prefill,
    or a one-token decode) and returns the fp32 logits after the last of them."""

    def __init__(self, model, spec, max_tokens: int, dtype, block: int = 16) -> None:
        pages = max_tokens // block + 1
        self.model, self.block, self.length = model, block, 0
        self.device = model.norm.weight.device
        self.kv = torch.zeros(pages, spec.num_layers, 2, block, spec.num_kv_heads, spec.head_dim, dtype=dtype,
                              device=self.device)
        self.table = torch.arange(pages, dtype=torch.int32, device=self.device)[None]

    @torch.inference_mode()
    def feed(self, tokens: list[int]) -> torch.Tensor:
        positions = torch.arange(self.length, self.length + len(tokens), device=self.device)
        meta = AttentionMetadata(positions=positions, slot_mapping=positions.clone(), block_tables=self.table,
                                 query_lens=[len(tokens)], seq_lens=[self.length + len(tokens)],
                                 block_size=self.block)
        hidden = self.model(torch.tensor(tokens, device=self.device), meta, self.kv)
        self.length += len(tokens)
        return self.model.compute_logits(hidden[-1:])[0]


def greedy(model, spec, prompt: list[int], n: int, dtype) -> tuple[list[int], torch.Tensor]:
    """n greedy tokens and the logits each was chosen from."""
    session = Session(model, spec, len(prompt) + n, dtype)
    logits = [session.feed(prompt)]
    tokens = [int(logits[-1].argmax())]
    while len(tokens) < n:
        logits.append(session.feed(tokens[-1:]))
        tokens.append(int(logits[-1].argmax()))
    return tokens, torch.stack(logits)


def teacher_forced(model, spec, prompt: list[int], tokens: list[int], dtype) -> torch.Tensor:
    """The logits each of `tokens` was chosen from, with the model fed those tokens (so two
    models are compared on identical inputs): one prefill, then one decode per token."""
    session = Session(model, spec, len(prompt) + len(tokens), dtype)
    logits = [session.feed(prompt)]
    for t in tokens[:-1]:
        logits.append(session.feed([t]))
    return torch.stack(logits)
