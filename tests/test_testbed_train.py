"""Tokenizer, training recipe (a smoke run) and the shipped checkpoints of the testbed."""

import json
import time
from dataclasses import asdict

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from arbitrage_fast.testbed import CHECKPOINTS, shipped_checkpoint
from arbitrage_fast.testbed.task import STEP_SEPARATOR, generate_problems
from arbitrage_fast.testbed.tokenizer import boundary_token_ids, save_tokenizer, train_tokenizer
from arbitrage_fast.testbed.train import (
    BENCHMARK_ROLES,
    IGNORE_INDEX,
    ROLES,
    SHIPPED_TASK,
    ModelSpec,
    Role,
    TrainConfig,
    encode,
    load_model,
    lr_at,
    main,
    save_model,
    train_model,
)

TINY = ModelSpec(1, 32, 64, 2, 1, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(n_problems=500)


def test_tokenizer_shape(tokenizer, tmp_path):
    assert 300 <= len(tokenizer) <= 512
    assert [tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token] == ["<s>", "</s>", "<pad>"]
    for d in "0123456789":
        assert tokenizer.convert_ids_to_tokens(tokenizer(d, add_special_tokens=False).input_ids) == [d]
    p = generate_problems(1, seed=0, split="test")[0]
    ids = tokenizer(p.prompt + p.solution).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == p.prompt + p.solution
    # The step boundary is a token of its own, and the only one whose text holds "\n\n".
    boundary = boundary_token_ids(tokenizer)
    assert len(boundary) >= 1 and tokenizer.decode(boundary) == STEP_SEPARATOR * len(boundary)
    assert sum(i in boundary for i in ids) == len(p.operations)
    loaded = AutoTokenizer.from_pretrained(save_tokenizer(tokenizer, tmp_path))
    assert loaded(p.prompt).input_ids == tokenizer(p.prompt).input_ids
    assert loaded.eos_token_id == tokenizer.eos_token_id


def test_steps_tokenize_independently(tokenizer):
    # The engine tokenizes step by step; joining must not change the ids.
    for p in generate_problems(50, seed=1, split="train"):
        joined = tokenizer(p.solution, add_special_tokens=False).input_ids
        parts = [i for s in p.steps for i in tokenizer(s, add_special_tokens=False).input_ids]
        assert parts == joined


def test_encode_masks_the_prompt_and_ends_in_eos(tokenizer):
    p = generate_problems(1, seed=0, split="train")[0]
    ids, labels = encode(tokenizer, p)
    n_prompt = len(tokenizer(p.prompt).input_ids)
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tokenizer.eos_token_id


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] < lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.05)


def test_smoke_training_learns_and_is_reproducible(tokenizer):
    cfg = TrainConfig(steps=40, batch_size=16, lr=3e-3, warmup_steps=5, seed=0)
    began = time.perf_counter()
    model, losses = train_model(TINY, cfg, tokenizer, progress=False)
    _, again = train_model(TINY, cfg, tokenizer, progress=False)
    assert time.perf_counter() - began < 60
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    assert losses == again
    _, other = train_model(TINY, TrainConfig(**{**cfg.__dict__, "seed": 1}), tokenizer, progress=False)
    assert other != losses


def test_bf16_folder_loads_back_in_fp32(tokenizer, tmp_path):
    torch.manual_seed(0)
    model, _ = train_model(TINY, TrainConfig(steps=2, batch_size=4, seed=0), tokenizer, progress=False)
    folder = save_model(model, tokenizer, tmp_path / "m", "bfloat16")
    loaded = load_model(folder)
    assert next(loaded.parameters()).dtype == torch.float32
    assert next(model.parameters()).dtype == torch.float32  # saving does not change the caller's model
    ids = tokenizer("Q: Start with 5.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded(ids).logits, atol=0.1)


def test_benchmark_target_differs_from_the_shipped_one_only_in_depth():
    shipped, deep = ROLES["target"], BENCHMARK_ROLES["target-48l"]
    assert deep.spec.num_hidden_layers == 3 * shipped.spec.num_hidden_layers
    assert asdict(deep.spec) | {"num_hidden_layers": 0} == asdict(shipped.spec) | {"num_hidden_layers": 0}
    assert (deep.train, deep.save_dtype) == (shipped.train, shipped.save_dtype)


def test_a_benchmark_role_trains_into_its_own_folder(tmp_path, monkeypatch):
    # The plumbing, on a tiny stand-in for the 48-layer role (an hour to train): the role is
    # accepted, saved as a loadable HF folder with a manifest, and no shipped role is trained
    # alongside it (so no draft/target latency ratio is claimed for the folder).
    monkeypatch.setitem(BENCHMARK_ROLES, "tiny-target", Role(TINY, TrainConfig(steps=2, batch_size=4)))
    main(["--out", str(tmp_path), "--roles", "tiny-target", "--eval-problems", "1"])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert list(manifest["roles"]) == ["tiny-target"] and "latency_ratio_target_over_draft" not in manifest
    assert manifest["roles"]["tiny-target"]["train"]["steps"] == 2
    assert load_model(tmp_path / "tiny-target").config.num_hidden_layers == TINY.num_hidden_layers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "tiny-target"]


# --- the shipped artefact -------------------------------------------------------------------

def test_shipped_tokenizer_is_rebuilt_by_the_recipe():
    # The manifest's task is the one the recipe trains on, and its tokenizer comes back exactly.
    m = _manifest()
    assert m["task"] == json.loads(json.dumps(asdict(SHIPPED_TASK))) and SHIPPED_TASK.plan_steps
    shipped = AutoTokenizer.from_pretrained(shipped_checkpoint("draft"))
    assert shipped.get_vocab() == train_tokenizer(seed=m["seed"], config=SHIPPED_TASK).get_vocab()

def _manifest():
    return json.loads((CHECKPOINTS / "manifest.json").read_text())


def test_shipped_checkpoints_load_and_share_a_tokenizer():
    draft, target = shipped_checkpoint("draft"), shipped_checkpoint("target")
    tok_d, tok_t = AutoTokenizer.from_pretrained(draft), AutoTokenizer.from_pretrained(target)
    assert tok_d.get_vocab() == tok_t.get_vocab()
    p = generate_problems(1, seed=0, split="test")[0]
    ids = tok_d(p.prompt, return_tensors="pt").input_ids
    for folder in (draft, target):
        model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
        assert model.config.vocab_size == len(tok_d)
        with torch.no_grad():
            assert model(ids).logits.shape == (1, ids.shape[1], len(tok_d))
    with pytest.raises(ValueError, match="role"):
        shipped_checkpoint("oracle")


def test_shipped_manifest_meets_the_testbed_goals():
    m = _manifest()
    draft, target = m["roles"]["draft"], m["roles"]["target"]
    # A draft that slips on some steps and fails a real share of problems; a target that
    # rarely does, at several drafts' cost per token (a 1B/8B pair's ratio).
    assert 0.5 <= draft["eval"]["accuracy"] <= 0.9
    assert 0.02 <= draft["eval"]["step_error_rate"] <= 0.2
    assert target["eval"]["accuracy"] >= 0.95
    assert target["eval"]["step_error_rate"] <= draft["eval"]["step_error_rate"] / 5
    assert m["latency_ratio_target_over_draft"] >= 5.0
    total = sum(f.stat().st_size for f in CHECKPOINTS.rglob("*") if f.is_file())
    assert total <= 25 * 2**20
