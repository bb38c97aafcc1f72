"""The testbed's neural PRM: its training recipe (a smoke run), what ships, and the preset that
makes it the one PRM of router labels and of RSD."""
from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoTokenizer

from arbitrage_fast.prm.hf_prm import ValueHeadPRM, load_prm
from arbitrage_fast.presets import resolve
from arbitrage_fast.router.metrics import auroc
from arbitrage_fast.testbed import CHECKPOINTS, shipped_checkpoint
from arbitrage_fast.testbed.checker import CORRECT, check_step
from arbitrage_fast.testbed.prm_train import (
    PRM_SPEC,
    ScoredSolution,
    corrupt_step,
    encode,
    encode_all,
    gold_with_slip,
    save_prm,
    score_steps,
    train_prm,
)
from arbitrage_fast.testbed.task import STEP_SEPARATOR, generate_problems
from arbitrage_fast.testbed.train import SHIPPED_TASK, TrainConfig

pytestmark = pytest.mark.skipif(not (CHECKPOINTS / "prm" / "config.json").is_file(), reason="testbed PRM not built")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(shipped_checkpoint("draft"))


def test_corruptions_are_slips_the_checker_faults():
    rng = random.Random(0)
    problems = generate_problems(60, seed=1, split="train", config=SHIPPED_TASK)
    faulted = 0
    for p in problems:
        slipped = gold_with_slip(p, rng)
        # Every step of the task holds a number, so one always changes.
        i = next(i for i, (a, b) in enumerate(zip(slipped.steps, p.steps)) if a != b)
        assert slipped.scores[:i] == (CORRECT,) * i  # the steps before the slip stay right
        faulted += slipped.scores[i] < CORRECT
        assert slipped.steps[i].endswith(STEP_SEPARATOR) == p.steps[i].endswith(STEP_SEPARATOR)
    assert faulted >= 50
    assert corrupt_step("Answer: 7", random.Random(1)) != "Answer: 7"


def test_one_forward_scores_each_step_as_the_prm_scores_it_alone(tokenizer, tmp_path):
    # Training reads every step's score from one forward over the whole solution; inference
    # (ValueHeadPRM) scores each step on its own prefix. A tiny PRM trained two steps must give
    # the same numbers both ways, or the PRM would learn positions it is never read at.
    problems = generate_problems(4, seed=2, split="train", config=SHIPPED_TASK)
    data = encode_all(tokenizer, [score_steps(p, list(p.steps)) for p in problems])
    assert len(data) == len(problems)  # gold solutions always encode
    model, losses = train_prm(data, tokenizer, TrainConfig(steps=2, batch_size=4, warmup_steps=1), progress=False)
    assert len(losses) == 2 and all(l > 0 for l in losses)
    prm = load_prm(save_prm(model, tokenizer, tmp_path / "prm"))
    s, ids, ends = data[0].solution, data[0].ids, data[0].ends
    assert len(ends) == len(s.steps) and ends[-1] == len(ids) - 1
    with torch.no_grad():
        h = model.lm.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        one_forward = torch.sigmoid(model.v_head(h[ends]).squeeze(-1))
    alone = [prm.score(s.prompt, list(s.steps[:i]), step) for i, step in enumerate(s.steps)]
    assert one_forward.tolist() == pytest.approx(alone, abs=1e-5)
    # The language-model labels cover exactly the correct steps' tokens.
    wrong = ScoredSolution(s.prompt, s.steps[:2], (CORRECT, 0.5))
    _, wrong_ends, wrong_labels = encode(tokenizer, wrong)
    assert all(t == -100 for t in wrong_labels[wrong_ends[0] + 1:])
    assert any(t != -100 for t in wrong_labels[:wrong_ends[0] + 1])


def test_shipped_prm_separates_slips_from_right_steps_and_is_not_an_oracle():
    prm = load_prm(shipped_checkpoint("prm"))
    assert isinstance(prm, ValueHeadPRM)
    rng = random.Random(3)
    items, right = [], []
    for p in generate_problems(40, seed=4, split="test", config=SHIPPED_TASK):
        i = rng.randrange(len(p.steps))
        for step in (p.steps[i], corrupt_step(p.steps[i], rng)):
            items.append((p.prompt, list(p.steps[:i]), step))
            right.append(check_step(p, list(p.steps[:i]), step) == CORRECT)
    scores = prm.score_batch(items)
    # Gold steps against the same steps with one digit changed anywhere (operands too, which
    # drafts rarely get wrong): harder than the draft's own slips, and well above chance (0.5).
    assert auroc(right, scores) >= 0.7
    m = json.loads((CHECKPOINTS / "manifest.json").read_text())["prm"]
    # Measured on the draft's own held-out steps: useful, and wrong sometimes, as a real PRM is.
    assert 0.7 <= m["eval_on_draft_steps"]["auroc"] < 0.999
    # A fifth of the target's cost per token or so: 3 layers of the target's width against 16.
    target = json.loads((CHECKPOINTS / "manifest.json").read_text())["roles"]["target"]["spec"]
    assert PRM_SPEC.hidden_size == target["hidden_size"]
    assert 0.15 <= PRM_SPEC.num_hidden_layers / target["num_hidden_layers"] <= 0.25


def test_testbed_preset_labels_and_decides_with_one_prm_and_audits_with_the_checker():
    preset = resolve("testbed")
    assert preset.prm == preset.label_prm == str(shipped_checkpoint("prm"))
    assert preset.audit_prm == "exact"
    overridden = resolve("testbed", prm="exact")  # an explicit PRM is both, as for any preset
    assert overridden.prm == overridden.label_prm == "exact"
