"""Bad input fails early with a message naming the problem, and no request ever leaks KV pages."""
from __future__ import annotations

import json
import math

import pytest
from transformers import LlamaConfig, LlamaForTokenClassification

from arbitrage_fast import Engine, EngineConfig, KVCacheExhausted, SamplingParams
from arbitrage_fast.engine import ModelMismatchError
from arbitrage_fast.models import CheckpointError, UnsupportedArchitectureError
from helpers.tiny_models import build_tiny_lm
from helpers.tiny_prm import build_tokenizer


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    draft = build_tiny_lm(root / "draft", "llama", hidden=32, layers=1, seed=1, max_positions=64)
    target = build_tiny_lm(root / "target", "llama", hidden=48, layers=2, seed=2, max_positions=64)
    return root, draft, target


@pytest.fixture(scope="module")
def engine(folders):
    _, draft, target = folders
    return Engine(EngineConfig(draft=str(draft), target=str(target), kv_pages=32, min_block_size=4))


def assert_no_leak(engine):
    assert engine.kv_stats()["used_pages"] == 0


@pytest.mark.parametrize("prompt, match", [("", "empty"), ("   ", "empty"), ([], "empty"),
                                           ([10**9], "out of range"), ("word " * 200, "context")])
def test_bad_prompts(engine, prompt, match):
    with pytest.raises(ValueError, match=match):
        engine.generate(prompt, policy="draft_only")
    assert_no_leak(engine)


@pytest.mark.parametrize("policy, threshold, match", [
    ("rsd", math.nan, "NaN"), ("rsd", -0.5, "out of range"), ("arbitrage", 1.5, "out of range"),
    ("oracle", 3.0, "out of range"), ("nonsense", None, "unknown policy"), ("rsd", "high", "number"),
])
def test_bad_policy_or_threshold(engine, policy, threshold, match):
    with pytest.raises(ValueError, match=match):
        engine.generate("Janet has 16 eggs.", policy=policy, threshold=threshold)
    assert_no_leak(engine)


def test_chat_messages_are_checked_and_need_a_chat_template(engine, monkeypatch):
    with pytest.raises(ValueError, match="message 1 must have a role"):
        engine.generate([{"role": "user", "content": "Hi"}, {"role": "robot", "content": "x"}], policy="draft_only")
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.generate([{"role": "user", "content": " "}], policy="draft_only")
    monkeypatch.setattr(engine.tokenizers[1], "chat_template", None)
    with pytest.raises(ValueError, match="has no chat template"):
        engine.generate([{"role": "user", "content": "Hi"}], policy="draft_only")
    assert_no_leak(engine)


def test_arbitrage_without_router_says_so(engine):
    with pytest.raises(ValueError, match="router"):
        engine.generate("Janet has 16 eggs.", policy="arbitrage")


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=-3), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(max_step_tokens=0), "max_step_tokens"),
])
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_kv_exhaustion_is_typed_and_leaks_nothing(folders):
    _, draft, target = folders
    small = Engine(EngineConfig(draft=str(draft), target=str(target), kv_pages=2, min_block_size=4))
    with pytest.raises(KVCacheExhausted):
        small.generate("Janet has 16 eggs. " * 3, policy="rsd", threshold=1.5,
                       sampling=SamplingParams(max_new_tokens=40, ignore_eos=True))
    assert_no_leak(small)
    # The pool is intact afterwards: a request that fits still runs.
    res = small.generate("Hi", policy="draft_only", sampling=SamplingParams(max_new_tokens=2, ignore_eos=True))
    assert len(res.token_ids) == 2
    assert_no_leak(small)


def test_cancelled_stream_returns_its_pages(engine):
    run = engine.stream("Janet has 16 eggs.", policy="rsd", threshold=1.5,
                        sampling=SamplingParams(max_new_tokens=30, max_step_tokens=3, ignore_eos=True))
    first = next(run)
    assert first.source == "target"
    assert engine.kv_stats()["used_pages"] > 0
    run.close()
    assert_no_leak(engine)


def test_stream_yields_the_same_steps_as_generate(engine):
    sp = SamplingParams(max_new_tokens=12, max_step_tokens=4, ignore_eos=True)
    run = engine.stream("We compute 12 + 30", policy="draft_only", sampling=sp)
    steps = list(run)
    assert [s.token_ids for s in steps] == [s.token_ids for s in engine.generate("We compute 12 + 30",
                                                                                 policy="draft_only", sampling=sp).steps]
    assert run.result.token_ids == [t for s in steps for t in s.token_ids]


def test_generation_stops_at_context_limit(engine):
    res = engine.generate("Janet has 16 eggs.", policy="target_only",
                          sampling=SamplingParams(max_new_tokens=500, ignore_eos=True))
    assert res.finish_reason == "length"
    assert len(res.token_ids) + len(engine.tokenizer("Janet has 16 eggs.")["input_ids"]) == 64


def test_missing_and_corrupt_checkpoints(folders, tmp_path):
    _, draft, target = folders
    with pytest.raises(CheckpointError, match="not found"):
        Engine(EngineConfig(draft=str(tmp_path / "nope"), target=str(target)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        Engine(EngineConfig(draft=str(empty), target=str(target)))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in draft.iterdir():
        data = f.read_bytes()
        (corrupt / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    with pytest.raises(CheckpointError, match="corrupt"):
        Engine(EngineConfig(draft=str(corrupt), target=str(target)))


def test_folder_that_is_not_a_causal_lm(folders, tmp_path):
    _, draft, target = folders
    tok = build_tokenizer()
    model = LlamaForTokenClassification(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=1, num_attention_heads=4, num_labels=2))
    model.save_pretrained(tmp_path / "cls")
    tok.save_pretrained(tmp_path / "cls")
    with pytest.raises(UnsupportedArchitectureError, match="LlamaForTokenClassification"):
        Engine(EngineConfig(draft=str(draft), target=str(tmp_path / "cls")))
    cfg = json.loads((tmp_path / "cls" / "config.json").read_text())
    assert isinstance(UnsupportedArchitectureError("x"), ValueError)
    assert cfg["architectures"] == ["LlamaForTokenClassification"]


def test_what_a_mixed_tokenizer_pair_cannot_do(folders, tmp_path):
    _, draft, target = folders
    other = build_tiny_lm(tmp_path / "other", "llama", hidden=32, layers=1, seed=3, vocab_size=280)
    with pytest.raises(ModelMismatchError, match="vocabulary"):
        Engine(EngineConfig(draft=str(other), target=str(target), spec_k=3))
    engine = Engine(EngineConfig(draft=str(other), target=str(target), kv_pages=32, min_block_size=4))
    assert not engine.shared_vocab
    with pytest.raises(ModelMismatchError, match="vocabulary"):
        engine.generate("Janet has 16 eggs.", policy="spec_decode")
    with pytest.raises(ModelMismatchError, match="as text"):
        engine.generate([1, 2, 3], policy="draft_only")
    assert_no_leak(engine)


def test_config_validation():
    with pytest.raises(ValueError, match="draft"):
        EngineConfig(draft="", target="x")
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(draft="a", target="b", dtype="int8")
    with pytest.raises(ValueError, match="kv_pages"):
        EngineConfig(draft="a", target="b", kv_pages=0)
