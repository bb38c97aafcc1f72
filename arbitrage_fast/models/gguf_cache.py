"""Dequantised GGUF checkpoints kept as Hugging Face folders, so each GGUF is parsed once.

Why: transformers parses and dequantises a GGUF file on every load (a minute or two for a
1.5B model on two cores, and reading the tokenizer parses the file again), while a
safetensors folder of the same dequantised tensors loads in seconds. A folder is keyed by the
file's name, size and modification time and by the dtype it was dequantised to (a Q4 weight
dequantised to bf16 is not the fp32 dequantisation rounded later), and it is written to a
temporary folder and renamed into place, so a folder that exists is complete.

A folder is a plain Hugging Face checkpoint that transformers and vLLM load as is: its
config.json drops the `quantization_config` (quant_method gguf) that describes the source file,
not these tensors (vLLM refuses the folder over it), and the `_name_or_path` of the parse.

The packed loader needs only the config and the tokenizer (parsing them from a GGUF takes about
a minute as well): `metadata_folder_for` keys a folder of just those, one per file.

`ARBITRAGE_FAST_GGUF_CACHE=0` turns the cache off; the folders live beside the joined GGUF
files in `$ARBITRAGE_FAST_CACHE` (default ~/.cache/arbitrage_fast), under `dequantised/` and
`metadata/`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ENV = "ARBITRAGE_FAST_GGUF_CACHE"
WEIGHTS = "model.safetensors"


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


# config.json keys that describe the GGUF source, not the folder's tensors.
SOURCE_KEYS = ("quantization_config", "_name_or_path")


def _key(gguf: Path) -> str:
    stat = gguf.stat()
    return f"{gguf.stem}-{stat.st_size}-{stat.st_mtime_ns}"


def folder_for(gguf: Path, dtype: torch.dtype) -> Path:
    from .gguf_assets import cache_dir

    return cache_dir() / "dequantised" / f"{_key(gguf)}-{str(dtype).removeprefix('torch.')}"


def metadata_folder_for(gguf: Path) -> Path:
    from .gguf_assets import cache_dir

    return cache_dir() / "metadata" / _key(gguf)


def is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / WEIGHTS).is_file()


def metadata_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file()


def store(folder: Path, config, tokenizer, tensors: dict[str, torch.Tensor] | None) -> None:
    """Write config, tokenizer and weights (none for a metadata folder) as an HF folder,
    atomically. A tied LM head is not written twice (safetensors refuses shared storage; the
    loader ties it again)."""
    from safetensors.torch import save_file

    tied = bool(getattr(config, "tie_word_embeddings", False))
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        config.save_pretrained(tmp)
        _drop_source_keys(tmp / "config.json")
        tokenizer.save_pretrained(tmp)
        if tensors is not None:
            weights = {k: v.contiguous() for k, v in tensors.items() if not (tied and k == "lm_head.weight")}
            save_file(weights, str(tmp / WEIGHTS))
        os.replace(tmp, folder)
    except Exception as e:  # noqa: BLE001 - OSError, or safetensors' own error on a full disk
        # Another process may have finished the same folder first, or the disk is full:
        # the cache is an optimisation, never a reason to fail a load.
        shutil.rmtree(tmp, ignore_errors=True)
        if not (is_complete(folder) if tensors is not None else metadata_complete(folder)):
            log.warning("could not cache the GGUF's checkpoint folder in %s: %s", folder, e)


def _drop_source_keys(config_json: Path) -> None:
    config = json.loads(config_json.read_text())
    for key in SOURCE_KEYS:
        config.pop(key, None)
    config_json.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
