"""The synthetic task: exact text format, determinism, disjoint splits, bounds, round trips."""

import pytest

from arbitrage_fast.testbed.task import (
    PLAN_PHRASINGS,
    STEP_SEPARATOR,
    Operation,
    Problem,
    TaskConfig,
    format_plan,
    generate_problems,
    parse_prompt,
    split_of,
)


def example() -> Problem:
    return Problem(47, (Operation("+", 38), Operation("*", 3), Operation("-", 59)))


def test_example_text_is_exactly_the_documented_format():
    p = example()
    assert p.prompt == "Q: Start with 47. Add 38. Multiply by 3. Subtract 59. What is the result?\nA: "
    assert p.solution == "47 + 38 = 85\n\n85 * 3 = 255\n\n255 - 59 = 196\n\nAnswer: 196"
    assert p.steps == ("47 + 38 = 85\n\n", "85 * 3 = 255\n\n", "255 - 59 = 196\n\n", "Answer: 196")
    assert p.answer == 196
    assert p.values() == [47, 85, 255, 196]


def test_generation_is_deterministic_and_seed_dependent():
    a = generate_problems(50, seed=3, split="train")
    assert a == generate_problems(50, seed=3, split="train")
    assert a != generate_problems(50, seed=4, split="train")
    assert generate_problems(20, seed=3, split="train") == a[:20]  # a prefix, not a reshuffle


def test_splits_are_disjoint_and_self_consistent():
    prompts = {}
    for split in ("train", "val", "test"):
        problems = generate_problems(300, seed=0, split=split)
        assert len({p.prompt for p in problems}) == 300  # distinct within a split
        assert all(split_of(p) == split for p in problems)
        prompts[split] = {p.prompt for p in problems}
    assert not prompts["train"] & prompts["test"]
    assert not prompts["train"] & prompts["val"]
    assert not prompts["val"] & prompts["test"]


@pytest.mark.parametrize("config", [TaskConfig(), TaskConfig(min_ops=2, max_ops=2, max_value=999)])
def test_problems_respect_the_difficulty_knobs(config):
    for p in generate_problems(500, seed=1, split="train", config=config):
        assert config.min_ops <= len(p.operations) <= config.max_ops
        values = p.values()
        assert all(0 <= v <= config.max_value for v in values)
        for value, op in zip(values, p.operations):
            if op.op == "-":
                assert op.operand <= value  # never below zero
        assert all(s.endswith(STEP_SEPARATOR) for s in p.steps[:-1])
        assert p.steps[-1] == f"Answer: {p.answer}"
        assert len(p.steps) == len(p.operations) + 1


def test_operators_follow_their_weights():
    def drawn(config):
        return {op.op for p in generate_problems(200, seed=0, split="train", config=config) for op in p.operations}

    assert drawn(TaskConfig()) == {"+", "-"}  # the default switches multiplication off
    assert drawn(TaskConfig(op_weights=(0.4, 0.35, 0.25), max_value=9999)) == {"+", "-", "*"}
    assert drawn(TaskConfig(op_weights=(1.0, 0.0, 0.0), max_value=9999)) == {"+"}


def test_parse_prompt_round_trips():
    for p in generate_problems(100, seed=2, split="test"):
        assert parse_prompt(p.prompt) == p
        assert parse_prompt(p.prompt + p.solution) == p  # trailing solution text is ignored


@pytest.mark.parametrize("text", ["", "What is 2 + 2?", "Q: Start with 4. Divide by 2. What is the result?\nA: "])
def test_parse_prompt_rejects_foreign_text(text):
    with pytest.raises(ValueError):
        parse_prompt(text)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="split"):
        generate_problems(1, split="dev")
    with pytest.raises(ValueError, match="min_ops"):
        TaskConfig(min_ops=5, max_ops=3)
    with pytest.raises(ValueError, match="operator"):
        Operation("/", 2)


def test_plan_steps_word_the_same_problems():
    plain = generate_problems(200, seed=0, split="test")
    planned = generate_problems(200, seed=0, split="test", config=TaskConfig(plan_steps=True))
    assert planned == plain  # the wording is not part of the problem
    for p in planned:
        assert len(p.steps) == 2 * len(p.operations) + 1
        assert p.steps[1:-1:2] == Problem(p.start, p.operations).steps[:-1]  # equations unchanged
        assert p.steps[-1] == f"Answer: {p.answer}"
    # Every wording is drawn: a model cannot predict it, only learn the distribution.
    drawn = {i for p in planned for i in p.plan_phrasings}
    assert drawn == set(range(PLAN_PHRASINGS))


def test_plan_wording_is_one_of_27_distinct_phrasings():
    op = Operation("-", 59)
    texts = {format_plan(op, i) for i in range(PLAN_PHRASINGS)}
    assert PLAN_PHRASINGS == 27 and len(texts) == 27
    assert format_plan(op, 0) == "Now, we subtract 59.\n\n"
    assert "Then, I will decrease it by 59.\n\n" in texts
    with pytest.raises(ValueError, match="phrasing"):
        format_plan(op, 27)
    with pytest.raises(ValueError, match="plan phrasings"):
        Problem(47, (op,), (0, 1))
