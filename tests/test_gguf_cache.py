"""The dequantised-GGUF cache: a GGUF is parsed once, later loads read the saved folder and
build the very same model and tokenizer; keys separate dtypes and file versions; the folder is
a plain checkpoint other engines load.

transformers' GGUF parser is replaced by a stub that serves a tiny random model, so this runs
without real weights (tests/test_real_qwen.py covers the real file).
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from arbitrage_fast.models import gguf_assets, gguf_cache, loader
from helpers.tiny_models import build_tiny_lm


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A .gguf path whose 'parse' returns a tiny HF model's config, tokenizer and tensors,
    counting the parses."""
    monkeypatch.setenv(gguf_assets.CACHE_ENV, str(tmp_path / "cache"))
    parses = []

    def make(tie: bool):
        folder = build_tiny_lm(tmp_path / f"hf-{tie}", "qwen2", tie=tie, seed=3)
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        path = tmp_path / f"model-{tie}.gguf"
        path.write_bytes(b"GGUF stub")

        def parse(p, dtype):
            assert p == path
            parses.append(dtype)
            # What transformers' GGUF parse leaves on the config: the source's quantization
            # and the folder it was read from.
            config = copy.deepcopy(hf.config)
            config.quantization_config = {"quant_method": "gguf"}
            config._name_or_path = str(path.parent)
            return config, tokenizer, {k: v.to(dtype) for k, v in hf.state_dict().items()}

        monkeypatch.setattr(loader, "_read_gguf", parse)
        return path

    return make, parses


@pytest.mark.parametrize("tie", [True, False])
def test_second_load_reads_the_cache_and_builds_the_same_model(fake_gguf, tie):
    make, parses = fake_gguf
    path = make(tie)
    first = loader.load_model(path, "float32", dequantize=True)
    second = loader.load_model(path, "float32", dequantize=True)
    assert parses == [torch.float32]  # parsed once
    a, b = first.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if tie:
        assert second.model.lm_head.weight is second.model.embed_tokens.weight
    text = "We compute 12 + 30 = 42.\n\nThen"
    assert first.tokenizer(text).input_ids == second.tokenizer(text).input_ids
    spec_a, spec_b = dict(vars(first.spec)), dict(vars(second.spec))
    assert torch.equal(spec_a.pop("inv_freq"), spec_b.pop("inv_freq")) and spec_a == spec_b


def test_keys_separate_dtypes_and_file_versions(fake_gguf):
    make, parses = fake_gguf
    path = make(True)
    loader.load_model(path, "float32", dequantize=True)
    loader.load_model(path, "bfloat16", dequantize=True)
    assert parses == [torch.float32, torch.bfloat16]
    before = gguf_cache.folder_for(path, torch.float32)
    path.write_bytes(b"GGUF stub, another version")  # size and mtime change
    assert gguf_cache.folder_for(path, torch.float32) != before
    loader.load_model(path, "float32", dequantize=True)
    assert len(parses) == 3


def test_cache_can_be_turned_off(fake_gguf, monkeypatch):
    make, parses = fake_gguf
    path = make(True)
    monkeypatch.setenv(gguf_cache.ENV, "0")
    loader.load_model(path, "float32", dequantize=True)
    loader.load_model(path, "float32", dequantize=True)
    assert len(parses) == 2
    assert not gguf_cache.is_complete(gguf_cache.folder_for(path, torch.float32))


def test_a_failed_write_still_loads_and_leaves_no_partial_folder(fake_gguf, monkeypatch):
    make, parses = fake_gguf
    path = make(True)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", full_disk)
    loaded = loader.load_model(path, "float32", dequantize=True)
    assert loaded.model is not None and len(parses) == 1
    folder = gguf_cache.folder_for(path, torch.float32)
    assert not folder.exists() and not list(folder.parent.glob(folder.name + ".*"))


def test_cached_folder_is_a_plain_checkpoint_transformers_loads(fake_gguf):
    make, _ = fake_gguf
    path = make(False)
    loaded = loader.load_model(path, "float32", dequantize=True)
    folder = gguf_cache.folder_for(path, torch.float32)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and "_name_or_path" not in config
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert getattr(hf.config, "quantization_config", None) is None
    assert torch.equal(hf.lm_head.weight, loaded.model.lm_head.weight)


def test_packed_loads_parse_the_config_and_tokenizer_once(tmp_path, monkeypatch):
    """The packed path needs only a GGUF's config and tokenizer: they are parsed once and kept
    as a weightless folder keyed like the dequantised ones."""
    import transformers

    monkeypatch.setenv(gguf_assets.CACHE_ENV, str(tmp_path / "cache"))
    folder = build_tiny_lm(tmp_path / "hf", "qwen2", seed=3)
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF stub")
    parses = []
    real_config, real_tokenizer = transformers.AutoConfig.from_pretrained, transformers.AutoTokenizer.from_pretrained

    def parse(real):
        def from_pretrained(where, *args, gguf_file=None, **kwargs):
            if gguf_file is None:
                return real(where, *args, **kwargs)
            parses.append(gguf_file)
            return real(folder)
        return from_pretrained

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", parse(real_config))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", parse(real_tokenizer))
    first = loader._read_gguf_metadata(path)
    second = loader._read_gguf_metadata(path)
    assert parses == ["model.gguf", "model.gguf"]  # config and tokenizer, once
    assert gguf_cache.metadata_complete(gguf_cache.metadata_folder_for(path))
    assert not gguf_cache.is_complete(gguf_cache.metadata_folder_for(path))  # no weights written
    assert first[0].to_dict()["vocab_size"] == second[0].to_dict()["vocab_size"]
    text = "We compute 12 + 30 = 42.\n\nThen"
    assert first[1](text).input_ids == second[1](text).input_ids
