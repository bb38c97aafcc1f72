"""Answer extraction, math-verify grading, and the shipped datasets graded against themselves."""

import sys
import threading
import types

import pytest

from arbitrage_fast.eval import EvalItem, extract_answer, extract_boxed, grade, load_dataset


@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("\\boxed{1} then \\boxed{\\sqrt{\\frac{a}{b}}}", "\\sqrt{\\frac{a}{b}}"),  # last box, nested braces
    ("\\boxed{5} and a truncated \\boxed{6", "5"),  # an unclosed box is not an answer
    ("no box here", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("Steps with 3 and 4.\n\nThe answer is \\boxed{7}.", "7"),
    ("Adding 2 and 3.\n\nThe answer is 5.", "5"),
    ("The final answer is $\\frac{3}{4}$.", "\\frac{3}{4}"),
    ("**Answer:** 42", "42"),
    ("She makes $18 a day.\n#### 18", "18"),
    ("The answer is 18 dollars.", "18"),
    ("The answer is $1,234.", "1234"),
    ("First 12 eggs, then 30 more, so 42 in all", "42"),  # last number fallback
    ("I am not sure.", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("prediction, gold", [
    ("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}"),  # equivalent fractions
    ("The answer is 0.5.", "\\frac12"),
    ("\\boxed{\\dfrac{3}{56}}", "\\frac{3}{56}"),
    ("The answer is 1,234.", "1234"),  # commas in numbers
    ("\\boxed{1,000,000}", "1000000"),
    ("#### 18", "18"),
    ("\\boxed{18.00}", "18"),
    ("\\boxed{(3, \\pi/2)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("\\boxed{\\sqrt{117}}", "3\\sqrt{13}"),
    ("\\boxed{p - q}", "-q + p"),
    ("\\boxed{Evelyn}", "\\text{Evelyn}"),  # string fallback
    ("\\boxed{90}", "90^\\circ"),
])
def test_equivalent_answers_are_correct(prediction, gold):
    assert grade(prediction, gold)


@pytest.mark.parametrize("prediction, gold", [
    ("The answer is 19.", "18"),
    ("\\boxed{-18}", "18"),
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}"),
    ("\\boxed{(3, \\pi)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("\\boxed{q - p}", "p - q"),
    ("\\boxed{Bob}", "\\text{Evelyn}"),
    ("\\boxed{18} was wrong, the answer is \\boxed{17}", "18"),  # the last box counts
    ("I give up.", "18"),
])
def test_wrong_answers_are_incorrect(prediction, gold):
    assert not grade(prediction, gold)


def test_grading_works_off_the_main_thread():
    # math-verify's signal-based timeout refuses to run in threads; grading must not.
    results = []
    worker = threading.Thread(target=lambda: results.append(grade("\\boxed{\\frac{2}{4}}", "0.5")))
    worker.start()
    worker.join()
    assert results == [True]


# --- datasets -----------------------------------------------------------------------


@pytest.mark.parametrize("name, size", [("gsm8k", 1319), ("math500", 500)])
def test_every_gold_answer_grades_against_itself(name, size):
    items = [i for split in ("train", "dev", "test") for i in load_dataset(name, split=split)]
    assert len(items) == size and len({i.id for i in items}) == size
    assert all(grade(f"So the answer is \\boxed{{{i.answer}}}.", i.answer) for i in items)


@pytest.mark.parametrize("name", ["gsm8k", "math500"])
def test_train_dev_test_splits_are_disjoint_sized_and_fixed_by_problem_id(name):
    from arbitrage_fast.eval.datasets import split_of

    splits = {s: load_dataset(name, split=s) for s in ("train", "dev", "test")}
    ids = {s: {i.id for i in items} for s, items in splits.items()}
    assert not ids["train"] & ids["dev"] and not ids["train"] & ids["test"] and not ids["dev"] & ids["test"]
    total = sum(map(len, ids.values()))
    for split, share in (("train", 0.25), ("dev", 0.15), ("test", 0.60)):
        assert abs(len(ids[split]) / total - share) < 0.04, (split, len(ids[split]), total)
    # The split depends on the id alone: an id keeps its split whatever else the file holds.
    assert all(split_of(name, i) == s for s, members in ids.items() for i in members)
    subset = load_dataset(name, n=30, split="train", seed=1)
    assert {i.id for i in subset} <= {i.id for i in splits["train"]}
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        load_dataset(name, split="validation")


def test_both_datasets_give_the_router_at_least_300_training_problems():
    assert len(load_dataset("gsm8k", split="train")) + len(load_dataset("math500", split="train")) >= 300


def test_the_testbed_has_a_dev_split_of_its_own():
    dev, test = load_dataset("testbed", n=20, split="dev"), load_dataset("testbed", n=20, split="test")
    assert not {i.prompt for i in dev} & {i.prompt for i in test}


def test_gsm8k_fields():
    from arbitrage_fast.eval.datasets import split_of

    first = load_dataset("gsm8k", split=split_of("gsm8k", "gsm8k-0"))[0]
    assert load_dataset("gsm8k", split="train")[0].id == "gsm8k-8"  # the first id hashed into train
    assert first.id == "gsm8k-0" and first.answer == "18"
    assert first.question.startswith("Janet") and first.prompt == first.question
    assert all("," not in i.answer for i in load_dataset("gsm8k"))  # "2,125" -> "2125"


def test_math500_fields():
    first = load_dataset("math500")[0]
    assert first.id == "test/precalculus/807.json"
    assert first.answer == "\\left( 3, \\frac{\\pi}{2} \\right)"


def test_subsets_are_seeded_and_in_file_order():
    a = load_dataset("math500", n=20, seed=3)
    assert a == load_dataset("math500", n=20, seed=3)
    assert a != load_dataset("math500", n=20, seed=4)
    order = [i.id for i in load_dataset("math500")]
    assert [order.index(i.id) for i in a] == sorted(order.index(i.id) for i in a)


def test_instruction_goes_into_the_prompt_only():
    item = load_dataset("gsm8k", n=1, instruction="Put the answer in \\boxed{}.")[0]
    assert item.prompt == item.question + "\n\nPut the answer in \\boxed{}."


def test_testbed_uses_generate_problems(monkeypatch):
    calls = []

    def generate_problems(n, seed, split):
        calls.append((n, seed, split))
        return [types.SimpleNamespace(prompt=f"Q{i}:", steps=[], answer=i * 7) for i in range(n)]

    fake = types.ModuleType("arbitrage_fast.testbed.task")
    fake.generate_problems = generate_problems
    monkeypatch.setitem(sys.modules, "arbitrage_fast.testbed.task", fake)
    items = load_dataset("testbed", n=3, seed=5, split="train")
    assert calls == [(3, 5, "train")]
    assert items[2] == EvalItem("testbed-train-5-2", "Q2:", "14", "Q2:")


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="aime"), "unknown dataset"),
    (dict(name="gsm8k", split="val"), "unknown split 'val'"),
    (dict(name="testbed", n=2, split="val"), "unknown split 'val'"),
    (dict(name="testbed"), "pass n"),
])
def test_bad_dataset_requests(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_dataset(**kwargs)
