"""Load a Llama-family checkpoint into the native decoder.

Two layouts: a Hugging Face folder (config.json + *.safetensors, sharded or not) read with
safetensors (never unpickling), or a GGUF file. A GGUF's quantized weights stay packed
(`gguf_packed`, the default): in their stored blocks on CPU, rewritten value for value in the
Triton kernel's group-wise layout on other devices (`gguf_repack`); `dequantize=True`
dequantises every tensor through transformers' GGUF support instead (the reference path).
`quant` quantizes the decoder's linear layers at load (`quantize_on_load`); a GGUF file is
then dequantised first, so its blocks are requantized from their float values. A model with
packed or quantized linears runs its norms, activation and attention through the compiled CPU
kernels, each packed layer as one op (`LlamaDecoder.set_exact_arithmetic`); a float checkpoint
keeps transformers' arithmetic.
Tokenizer and chat template always come from transformers.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .architecture import DecoderSpec, UnsupportedArchitectureError
from .cpu_linear import pack_linears
from .group_quant import QuantizationError, QuantScheme
from .llama import LlamaDecoder
from .quantize_on_load import quantize_head, quantize_linears


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """The path does not hold a checkpoint this engine can load (missing, corrupt, wrong kind)."""


@dataclass
class LoadedModel:
    model: LlamaDecoder
    spec: DecoderSpec
    tokenizer: object
    hf_config: object
    path: str


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def load_model(path: str | Path, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
               *, dequantize: bool = False, quant: QuantScheme | None = None) -> LoadedModel:
    path = Path(path).expanduser()
    torch_dtype = resolve_dtype(dtype)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    is_gguf = path.is_file() and path.suffix == ".gguf"
    if is_gguf and not dequantize and quant is None:
        return _load_gguf_packed(path, torch_dtype, torch.device(device))
    if is_gguf:
        hf_config, tokenizer, tensors = _read_gguf_cached(path, torch_dtype)
    elif path.is_dir():
        hf_config, tokenizer, tensors = _read_hf_folder(path)
    else:
        raise CheckpointError(f"{path} is neither a Hugging Face model folder nor a .gguf file")
    try:
        spec = DecoderSpec.from_hf_config(hf_config)
    except UnsupportedArchitectureError as e:
        raise UnsupportedArchitectureError(f"{path}: {e}") from None
    model = _build(spec, tensors, torch_dtype, device, path, quant)
    return LoadedModel(model=model, spec=spec, tokenizer=tokenizer, hf_config=hf_config, path=str(path))


def _read_hf_folder(path: Path):
    from transformers import AutoConfig, AutoTokenizer
    from safetensors.torch import load_file

    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json: not a Hugging Face model folder")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # transformers raises many types for a bad config
        raise CheckpointError(f"{path}/config.json could not be read: {e}") from None
    files = _safetensors_files(path)
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except Exception as e:
            raise CheckpointError(f"corrupt weight file {f}: {e}") from None
    tokenizer = AutoTokenizer.from_pretrained(path)
    return config, tokenizer, tensors


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"{path}: shard(s) listed in {index.name} are missing: {missing}")
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        has_pickle = any(path.glob("*.bin")) or any(path.glob("*.pt"))
        hint = " (only pickled *.bin weights found; convert them to safetensors)" if has_pickle else ""
        raise CheckpointError(f"{path} has no *.safetensors weight files{hint}")
    return files


def _load_gguf_packed(path: Path, torch_dtype: torch.dtype, device: torch.device) -> LoadedModel:
    from . import gguf_packed

    hf_config, tokenizer = _read_gguf_metadata(path)
    try:
        spec = DecoderSpec.from_hf_config(hf_config)
    except UnsupportedArchitectureError as e:
        raise UnsupportedArchitectureError(f"{path}: {e}") from None
    try:
        model = gguf_packed.build(path, spec, torch_dtype, device)
    except gguf_packed.CorruptTensorError as e:
        raise CheckpointError(str(e)) from None
    if device.type == "cpu":
        pack_linears(model)  # float layers of the file, if any (bf16 on CPU)
        model.set_exact_arithmetic(False)  # packed weights: compiled CPU norm, activation, attention, layer
    return LoadedModel(model=model, spec=spec, tokenizer=tokenizer, hf_config=hf_config, path=str(path))


def _read_gguf_metadata(path: Path):
    """Config and tokenizer of a GGUF file, through the metadata cache (`gguf_cache`)."""
    from transformers import AutoConfig, AutoTokenizer

    from . import gguf_cache

    folder = gguf_cache.metadata_folder_for(path)
    if gguf_cache.enabled() and gguf_cache.metadata_complete(folder):
        return AutoConfig.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # transformers raises many types for a bad file
        raise CheckpointError(f"could not read the config and tokenizer of GGUF file {path}: {e}") from None
    if gguf_cache.enabled():
        gguf_cache.store(folder, config, tokenizer, None)
    return config, tokenizer


def _read_gguf_cached(path: Path, torch_dtype: torch.dtype):
    """A GGUF file through the dequantised-folder cache (`gguf_cache`): parsed once, then
    read back as safetensors."""
    from . import gguf_cache

    if not gguf_cache.enabled():
        return _read_gguf(path, torch_dtype)
    folder = gguf_cache.folder_for(path, torch_dtype)
    if gguf_cache.is_complete(folder):
        return _read_hf_folder(folder)
    hf_config, tokenizer, tensors = _read_gguf(path, torch_dtype)
    gguf_cache.store(folder, hf_config, tokenizer, tensors)
    return hf_config, tokenizer, tensors


def _read_gguf(path: Path, torch_dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import is_accelerate_available, logging as hf_logging

    if not is_accelerate_available():
        raise CheckpointError(f"{path}: transformers reads GGUF files only with accelerate installed "
                              "(`pip install accelerate`; the qwen-coder extras include it)")
    verbosity = hf_logging.get_verbosity()
    # transformers warns that a bf16 GGUF load is slower than fp32 with its packed-weight
    # kernels; those need the Hub, and every weight is dequantised here anyway.
    hf_logging.set_verbosity_error()
    try:
        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch_dtype)
    except Exception as e:
        raise CheckpointError(f"could not read GGUF file {path}: {e}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tensors = dict(hf.state_dict())
    return hf.config, tokenizer, tensors


def _convert(spec: DecoderSpec, tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Map transformers' parameter names onto ours, fusing q/k/v and gate/up."""

    def take(name: str) -> torch.Tensor:
        for key in (name, name.removeprefix("model.")):
            if key in tensors:
                return tensors[key]
        raise CheckpointError(f"{path}: weight {name!r} is missing from the checkpoint")

    out = {"embed_tokens.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    if spec.tie_word_embeddings:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    else:
        out["lm_head.weight"] = take("lm_head.weight")
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        a = f"layers.{i}.self_attn."
        out[a + "qkv_proj.weight"] = torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
        if spec.qkv_bias:
            out[a + "qkv_proj.bias"] = torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
        out[a + "o_proj.weight"] = take(p + "self_attn.o_proj.weight")
        if spec.o_bias:
            out[a + "o_proj.bias"] = take(p + "self_attn.o_proj.bias")
        m = f"layers.{i}.mlp."
        out[m + "gate_up_proj.weight"] = torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")])
        if spec.mlp_bias:
            out[m + "gate_up_proj.bias"] = torch.cat([take(p + "mlp.gate_proj.bias"), take(p + "mlp.up_proj.bias")])
            out[m + "down_proj.bias"] = take(p + "mlp.down_proj.bias")
        out[m + "down_proj.weight"] = take(p + "mlp.down_proj.weight")
        out[f"layers.{i}.input_layernorm.weight"] = take(p + "input_layernorm.weight")
        out[f"layers.{i}.post_attention_layernorm.weight"] = take(p + "post_attention_layernorm.weight")
    return out


def _build(spec: DecoderSpec, tensors, torch_dtype, device, path: Path,
           quant: QuantScheme | None = None) -> LlamaDecoder:
    weights = _convert(spec, tensors, path)
    with torch.device("meta"):
        model = LlamaDecoder(spec)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise CheckpointError(
                f"{path}: weight {name!r} has shape {tuple(weights[name].shape)}, config implies {shape}"
            )
    weights = {k: v.to(device=device, dtype=torch_dtype).contiguous() for k, v in weights.items()}
    model.load_state_dict(weights, strict=True, assign=True)
    if spec.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary.inv_freq = spec.inv_freq.to(device)
    model = model.eval().requires_grad_(False)
    if quant is not None:
        try:
            quantize_linears(model, quant)  # before packing: it replaces the plain nn.Linear layers
            quantize_head(model)
        except QuantizationError as e:
            raise CheckpointError(f"{path}: cannot quantize to {quant.name}: {e}") from None
    pack_linears(model)  # bf16 on CPU: weights pre-packed for oneDNN, bit-identical output
    if quant is not None:  # after packing: a one-op layer holds the weights its linears hold then
        model.set_exact_arithmetic(False)  # as for packed GGUF weights
    return model
