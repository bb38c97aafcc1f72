"""The exact step checker and its PRM face: the documented scale, case by case."""

import pytest

from arbitrage_fast.prm.base import ProcessRewardModel
from arbitrage_fast.prm.exact import ExactCheckerPRM
from arbitrage_fast.testbed.checker import (
    CORRECT,
    MALFORMED,
    OFF_CHAIN,
    WRONG_RESULT,
    check_step,
    extract_answer,
    is_correct,
    score_solution,
    split_steps,
)
from arbitrage_fast.testbed.task import Operation, Problem, TaskConfig, generate_problems

P = Problem(47, (Operation("+", 38), Operation("*", 3), Operation("-", 59)))


def test_gold_solutions_score_one_everywhere():
    for p in generate_problems(200, seed=0, split="test"):
        assert score_solution(p, p.solution) == [CORRECT] * len(p.steps)
        assert is_correct(p, p.solution)


@pytest.mark.parametrize("previous, step, expected", [
    ([], "47 + 38 = 85\n\n", CORRECT),
    ([], "47 + 38 = 85", CORRECT),  # separator optional: a step may end at EOS or a limit
    ([], "47 + 38 = 75\n\n", WRONG_RESULT),  # dropped carry
    ([], "47 + 39 = 86\n\n", OFF_CHAIN),  # wrong operand, right arithmetic
    ([], "47 * 38 = 1786\n\n", OFF_CHAIN),  # wrong operator
    ([], "48 + 38 = 86\n\n", OFF_CHAIN),  # does not start from the start number
    (["47 + 38 = 85\n\n"], "85 * 3 = 255\n\n", CORRECT),
    (["47 + 38 = 85\n\n"], "47 * 3 = 141\n\n", OFF_CHAIN),  # ignores the previous result
    (["47 + 38 = 75\n\n"], "75 * 3 = 225\n\n", CORRECT),  # judged against the chain as written
    (["47 + 38 = 75\n\n"], "85 * 3 = 255\n\n", OFF_CHAIN),
    ([], "47 + 38 = \n\n", MALFORMED),
    ([], "Let me think.\n\n", MALFORMED),
    ([], "47 + 38 = 85\n85 * 3 = 255\n\n", MALFORMED),  # two steps in one
    ([], "Answer: 196", MALFORMED),  # answering before applying the operations
])
def test_operation_steps(previous, step, expected):
    assert check_step(P, previous, step) == expected


GOLD = list(P.steps[:-1])


@pytest.mark.parametrize("previous, step, expected", [
    (GOLD, "Answer: 196", CORRECT),
    (GOLD, "Answer: 196</s>", CORRECT),
    (GOLD, "Answer: 195", WRONG_RESULT),
    (["47 + 38 = 85\n\n", "85 * 3 = 255\n\n", "255 - 59 = 186\n\n"], "Answer: 186", CORRECT),
    (GOLD, "196 + 1 = 197\n\n", MALFORMED),  # the chain is complete: no more operations
    (GOLD, "Answer:", MALFORMED),
])
def test_answer_step(previous, step, expected):
    assert check_step(P, previous, step) == expected


@pytest.mark.parametrize("previous, step, expected", [
    ([], "Now, we add 38.\n\n", CORRECT),
    ([], "Then, I will increase it by 38.\n\n", CORRECT),  # any wording of the right operation
    ([], "Next, let us add 39.\n\n", OFF_CHAIN),  # wrong operand
    ([], "Next, let us subtract 38.\n\n", OFF_CHAIN),  # wrong operator
    (["Now, we add 38.\n\n"], "47 + 38 = 85\n\n", CORRECT),  # a plan is not an operation
    (["Now, we add 38.\n\n", "47 + 38 = 85\n\n"], "Then, we multiply it by 3.\n\n", CORRECT),
    (["Now, we add 38.\n\n", "47 + 38 = 85\n\n"], "Then, we add 38.\n\n", OFF_CHAIN),  # repeats the last
    (GOLD, "Now, we add 1.\n\n", MALFORMED),  # nothing is left to plan
    (["Now, we add 38.\n\n"] + GOLD, "Answer: 196", CORRECT),
    ([], "Soon, we add 38.\n\n", MALFORMED),  # not a plan phrasing
])
def test_plan_steps(previous, step, expected):
    assert check_step(P, previous, step) == expected


def test_planned_gold_solutions_score_one_everywhere():
    for p in generate_problems(200, seed=0, split="test", config=TaskConfig(plan_steps=True)):
        assert score_solution(p, p.solution) == [CORRECT] * len(p.steps)
        assert is_correct(p, p.solution)


def test_scale_is_ordered():
    assert MALFORMED < OFF_CHAIN < WRONG_RESULT < CORRECT
    assert all(0.0 <= s <= 1.0 for s in (MALFORMED, OFF_CHAIN, WRONG_RESULT, CORRECT))


def test_malformed_step_carries_the_value_past_it():
    assert check_step(P, ["hmm\n\n"], "47 * 3 = 141\n\n") == CORRECT  # op index 1, value 47


def test_split_steps_keeps_separators():
    assert split_steps(P.solution) == list(P.steps)
    assert "".join(split_steps("a\n\nb\n\n")) == "a\n\nb\n\n"
    assert split_steps("") == []


@pytest.mark.parametrize("text, expected", [
    (P.solution, 196),
    ("Answer: 12\n\nAnswer: 13", 13),
    ("Answer:7", 7),
    ("47 + 38 = 85", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_is_correct_is_about_the_outcome():
    assert is_correct(P, "nonsense\n\nAnswer: 196")
    assert not is_correct(P, "47 + 38 = 85\n\n")


def test_exact_prm_matches_the_checker():
    prm = ExactCheckerPRM()
    assert isinstance(prm, ProcessRewardModel)
    for p in generate_problems(20, seed=5, split="val"):
        for i, step in enumerate(p.steps):
            assert prm.score(p.prompt, list(p.steps[:i]), step) == CORRECT
        bad = p.steps[0].replace(" = ", " = 1")
        assert prm.score(p.prompt, [], bad) == check_step(p, [], bad) < CORRECT
    items = [(P.prompt, [], "47 + 38 = 75\n\n"), (P.prompt, GOLD, "Answer: 196")]
    assert prm.score_batch(items) == [WRONG_RESULT, CORRECT]


def test_exact_prm_refuses_foreign_prompts():
    with pytest.raises(ValueError, match="testbed prompt"):
        ExactCheckerPRM().score("What is 2 + 2?", [], "4")
