"""Dequantised GGUF checkpoints kept as Hugging Face folders, so each GGUF is parsed once.

Why: transformers parses and dequantises a GGUF file on every load (a minute or two for a
1.5B model on two cores, and reading the tokenizer parses the file again), while a
safetensors folder of the same dequantised tensors loads in seconds. A folder is keyed by the
file's name, size and modification time and by the dtype it was dequantised to (a Q4 weight
dequantised to bf16 is not the fp32 dequantisation rounded later), and it is written to a
temporary folder and renamed into place, so a folder that exists is complete.

`ARBITRAGE_FAST_GGUF_CACHE=0` turns the cache off; the folders live beside the joined GGUF
files in `$ARBITRAGE_FAST_CACHE` (default ~/.cache/arbitrage_fast), under `dequantised/`.
"""
from __future__ import annotations

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


def folder_for(gguf: Path, dtype: torch.dtype) -> Path:
    from .gguf_assets import cache_dir

    stat = gguf.stat()
    key = f"{gguf.stem}-{stat.st_size}-{stat.st_mtime_ns}-{str(dtype).removeprefix('torch.')}"
    return cache_dir() / "dequantised" / key


def is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / WEIGHTS).is_file()


def store(folder: Path, config, tokenizer, tensors: dict[str, torch.Tensor]) -> None:
    """Write config, tokenizer and weights as an HF folder, atomically. A tied LM head is not
    written twice (safetensors refuses shared storage; the loader ties it again)."""
    from safetensors.torch import save_file

    tied = bool(getattr(config, "tie_word_embeddings", False))
    weights = {k: v.contiguous() for k, v in tensors.items() if not (tied and k == "lm_head.weight")}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_file(weights, str(tmp / WEIGHTS))
        os.replace(tmp, folder)
    except Exception as e:  # noqa: BLE001 - OSError, or safetensors' own error on a full disk
        # Another process may have finished the same folder first, or the disk is full:
        # the cache is an optimisation, never a reason to fail a load.
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_complete(folder):
            log.warning("could not cache the dequantised checkpoint in %s: %s", folder, e)
