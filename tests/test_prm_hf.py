"""HF PRM loaders against the raw transformers models they wrap, on tiny random checkpoints."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, LlamaForCausalLM, LlamaForTokenClassification

from arbitrage_fast.prm import (
    ProcessRewardModel,
    TokenClassificationPRM,
    ValueHeadPRM,
    detect_prm_kind,
    load_prm,
)
from helpers.tiny_prm import (
    STEP_SEPARATOR,
    build_token_classification_prm,
    build_value_head_prm,
)

PROMPT = "Janet has 16 eggs. She eats 3 and bakes with 4. How much does she make?"
STEPS = [
    "So she sells 16 - 3 - 4 = 9 eggs.\n\n",
    "Each egg costs 2 dollars, so she makes 9 * 2 = 18 dollars.\n\n",
    "The answer is \\boxed{18}.",
]
ITEMS = [(PROMPT, STEPS[:k], STEPS[k]) for k in range(len(STEPS))]


@pytest.fixture(scope="module")
def value_head_dir(tmp_path_factory):
    return build_value_head_prm(tmp_path_factory.mktemp("vh"))


@pytest.fixture(scope="module")
def token_cls_dir(tmp_path_factory):
    return build_token_classification_prm(tmp_path_factory.mktemp("tc"))


def _last_hidden(folder, text):
    tok = AutoTokenizer.from_pretrained(folder)
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([tok(text).input_ids])
    with torch.no_grad():
        return model.model(input_ids=ids).last_hidden_state[0, -1]


def _manual_value_head(folder, text):
    head = load_file(str(folder / "value_head.safetensors"))
    hidden = _last_hidden(folder, text)
    return torch.sigmoid(hidden @ head["v_head.weight"][0] + head["v_head.bias"][0]).item()


def _manual_token_cls(folder, text):
    """Scores of every step from ONE forward over the whole solution, read at each separator."""
    tok = AutoTokenizer.from_pretrained(folder)
    model = LlamaForTokenClassification.from_pretrained(folder).eval()
    ids = tok(text).input_ids
    sep = tok.convert_tokens_to_ids(STEP_SEPARATOR)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return [logits[i].softmax(-1)[1].item() for i, t in enumerate(ids) if t == sep]


def test_detects_both_layouts(value_head_dir, token_cls_dir):
    assert detect_prm_kind(value_head_dir) == "value_head"
    assert detect_prm_kind(token_cls_dir) == "token_classification"
    assert isinstance(load_prm(value_head_dir), ValueHeadPRM)
    assert isinstance(load_prm(str(token_cls_dir)), TokenClassificationPRM)


@pytest.mark.parametrize("kind", ["value_head", "token_cls"])
def test_scores_are_probabilities_and_deterministic(kind, value_head_dir, token_cls_dir):
    folder = value_head_dir if kind == "value_head" else token_cls_dir
    first = load_prm(folder).score_batch(ITEMS)
    again = load_prm(folder).score_batch(ITEMS)
    assert all(0.0 <= s <= 1.0 for s in first)
    assert first == again
    assert len(set(first)) == len(first)  # the steps are told apart


def test_value_head_matches_raw_model(value_head_dir):
    prm = load_prm(value_head_dir)
    for prompt, previous, step in ITEMS:
        text = prompt + "\n" + "".join(previous) + step
        expected = _manual_value_head(value_head_dir, text)
        assert prm.score(prompt, previous, step) == pytest.approx(expected, abs=1e-6)


def test_token_classification_matches_raw_model(token_cls_dir):
    prm = load_prm(token_cls_dir)
    text = PROMPT + "\n" + "".join(s.rstrip() + STEP_SEPARATOR for s in STEPS)
    expected = _manual_token_cls(token_cls_dir, text)
    assert len(expected) == len(STEPS)
    got = [prm.score(*item) for item in ITEMS]
    # Causality: scoring each prefix alone equals reading all separators of the full solution.
    assert got == pytest.approx(expected, abs=1e-6)


def test_qwen2_token_classification_loads(tmp_path):
    folder = build_token_classification_prm(tmp_path / "qwen", arch="qwen2")
    scores = load_prm(folder).score_batch(ITEMS)
    assert all(0.0 <= s <= 1.0 for s in scores)


@pytest.mark.parametrize("kind", ["value_head", "token_cls"])
def test_batch_equals_single(kind, value_head_dir, token_cls_dir):
    folder = value_head_dir if kind == "value_head" else token_cls_dir
    prm = load_prm(folder, batch_size=2)  # 3 items of different lengths: padding and a partial batch
    batch = prm.score_batch(ITEMS)
    single = [prm.score(*item) for item in ITEMS]
    assert batch == pytest.approx(single, abs=1e-5)


def test_chat_template_formatting(value_head_dir):
    prm = load_prm(value_head_dir, use_chat_template=True, system_prompt="Reason step by step.")
    tok = AutoTokenizer.from_pretrained(value_head_dir)
    messages = [{"role": "system", "content": "Reason step by step."}, {"role": "user", "content": PROMPT}]
    prefix = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids, pos = prm.encode(PROMPT, STEPS[:1], STEPS[1])
    assert ids == tok(prefix + STEPS[0] + STEPS[1], add_special_tokens=False).input_ids
    assert pos == len(ids) - 1
    assert 0.0 <= prm.score(PROMPT, STEPS[:1], STEPS[1]) <= 1.0


def test_bf16_is_close_to_fp32(value_head_dir):
    fp32 = load_prm(value_head_dir, dtype="fp32").score_batch(ITEMS)
    bf16 = load_prm(value_head_dir, dtype=torch.bfloat16).score_batch(ITEMS)
    assert bf16 == pytest.approx(fp32, abs=0.05)


def test_default_score_batch_loops_over_score():
    class Length(ProcessRewardModel):
        def score(self, prompt, previous_steps, step):
            return 1 / (1 + len(step))

    assert Length().score_batch([("p", [], "ab"), ("p", ["ab"], "c")]) == [1 / 3, 1 / 2]


# --- clear errors for bad folders --------------------------------------------------


def test_missing_folder_names_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match="nope.*not a local folder"):
        load_prm(missing)


def test_missing_config(tmp_path, value_head_dir):
    folder = tmp_path / "noconfig"
    shutil.copytree(value_head_dir, folder)
    (folder / "config.json").unlink()
    with pytest.raises(ValueError, match="no config.json"):
        load_prm(folder)


def test_missing_weights_mentions_pickle(tmp_path, value_head_dir):
    folder = tmp_path / "noweights"
    shutil.copytree(value_head_dir, folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="no \\*.safetensors model weights.*pytorch_model.bin"):
        load_prm(folder)


def test_unknown_layout(tmp_path, value_head_dir):
    folder = tmp_path / "plain_lm"
    shutil.copytree(value_head_dir, folder)
    (folder / "value_head.safetensors").unlink()
    with pytest.raises(ValueError, match="plain_lm.*value_head.safetensors.*ForTokenClassification"):
        load_prm(folder)


def test_bad_value_head_shape(tmp_path, value_head_dir):
    folder = tmp_path / "badhead"
    shutil.copytree(value_head_dir, folder)
    save_file({"v_head.weight": torch.zeros(1, 7)}, str(folder / "value_head.safetensors"))
    with pytest.raises(ValueError, match="expected \\[1, 32\\]"):
        load_prm(folder)
    save_file({"head": torch.zeros(1, 32)}, str(folder / "value_head.safetensors"))
    with pytest.raises(ValueError, match="no 'v_head.weight'"):
        load_prm(folder)


def test_skywork_head_names_and_no_bias(tmp_path, value_head_dir):
    folder = tmp_path / "skywork_names"
    shutil.copytree(value_head_dir, folder)
    head = load_file(str(value_head_dir / "value_head.safetensors"))
    save_file({"v_head.summary.weight": head["v_head.weight"]}, str(folder / "value_head.safetensors"))
    hidden = _last_hidden(value_head_dir, PROMPT + "\n" + STEPS[0])
    expected = torch.sigmoid(hidden @ head["v_head.weight"][0]).item()
    assert load_prm(folder).score(PROMPT, [], STEPS[0]) == pytest.approx(expected, abs=1e-6)


def test_custom_prm_class_needs_trust(tmp_path, token_cls_dir):
    folder = tmp_path / "custom"
    shutil.copytree(token_cls_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["Qwen2ForProcessRewardModel"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        load_prm(folder)


def test_unknown_separator(token_cls_dir):
    with pytest.raises(ValueError, match="not a single token"):
        load_prm(token_cls_dir, step_separator="<step>")


def test_unknown_dtype(value_head_dir):
    with pytest.raises(ValueError, match="unknown dtype"):
        load_prm(value_head_dir, dtype="int3")
