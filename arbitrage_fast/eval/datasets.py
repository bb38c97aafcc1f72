"""Evaluation problems: GSM8K and MATH500 shipped as jsonl, and the synthetic testbed.

Every source becomes the same `EvalItem` so the sweep and the grader never care
where a problem came from. Subsets are drawn with a seeded RNG and kept in file
order, so "n=100, seed=0" names the same problems on every machine.

Three disjoint splits, so that nothing is chosen on the problems it is reported on:
`train` (router labels), `dev` (thresholds, picked by `calibrate`) and `test` (the
reported figures). For GSM8K and MATH500 a problem's split is fixed by its id alone:
the first 8 hex digits of SHA-256("<dataset>:<id>") modulo 20 give a bucket, and buckets
0-4 are train (25%), 5-7 dev (15%), 8-19 test (60%), so 454 of the 1,819 problems (333 GSM8K, 121 MATH500) train a
router. The testbed draws its problems per split (`testbed.task.split_of`); its `val`
split serves as dev.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
DATASETS = ("gsm8k", "math500", "testbed")
SPLITS = ("train", "dev", "test")
_FILES = {"gsm8k": "gsm8k_test.jsonl", "math500": "math500.jsonl"}
# GSM8K and MATH500 ship only their test sets, so all three splits are carved out of them.
SPLIT_BUCKETS = {"train": range(0, 5), "dev": range(5, 8), "test": range(8, 20)}
_BUCKETS = 20
_TESTBED_SPLITS = {"train": "train", "dev": "val", "test": "test"}


def split_of(dataset: str, item_id: str) -> str:
    """The split of problem `item_id` of `dataset`: a stable hash, independent of file order."""
    bucket = int(hashlib.sha256(f"{dataset}:{item_id}".encode()).hexdigest()[:8], 16) % _BUCKETS
    return next(split for split, buckets in SPLIT_BUCKETS.items() if bucket in buckets)


@dataclass(frozen=True)
class EvalItem:
    """One problem: what the model is asked (`prompt`) and the gold answer to grade against.

    `prompt_text` is set when the text given to the model differs from the bare
    question (an appended instruction, the testbed's own prompt format).
    """

    id: str
    question: str
    answer: str
    prompt_text: str | None = None

    @property
    def prompt(self) -> str:
        return self.question if self.prompt_text is None else self.prompt_text


def load_dataset(name: str, n: int | None = None, split: str = "test", seed: int = 0,
                 instruction: str | None = None) -> list[EvalItem]:
    """Load `n` problems of `name` (all when n is None).

    `instruction`, when given, is appended to each question after a blank line
    (e.g. "put your final answer within \\\\boxed{}"), which the grader's answer
    extraction relies on for real reasoning models. It is not applied to the
    testbed, whose prompts already follow the format its models were trained on.
    """
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0 or None, got {n}")
    if name not in _FILES and name != "testbed":
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for {name}; expected one of {SPLITS}")
    if name == "testbed":
        return _load_testbed(n, split, seed)
    rows = _read_jsonl(DATA_DIR / _FILES[name])
    items = [_gsm8k_item(r) if name == "gsm8k" else _math500_item(r) for r in rows]
    items = [item for item in items if split_of(name, item.id) == split]
    items = _subset(items, n, seed)
    if instruction is not None:
        items = [EvalItem(i.id, i.question, i.answer, f"{i.question}\n\n{instruction}") for i in items]
    return items


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _subset(items: list, n: int | None, seed: int) -> list:
    if n is None or n >= len(items):
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


def _gsm8k_item(row: dict) -> EvalItem:
    # The solution ends with "#### <answer>"; thousands separators are dropped
    # so the gold is a plain number ("2,125" -> "2125").
    answer = row["answer"].split("####")[-1].strip().replace(",", "")
    return EvalItem(id=f"gsm8k-{row['idx']}", question=row["question"], answer=answer)


def _math500_item(row: dict) -> EvalItem:
    return EvalItem(id=row["unique_id"], question=row["problem"], answer=row["answer"])


def _load_testbed(n: int | None, split: str, seed: int) -> list[EvalItem]:
    # Imported here: the testbed pulls in its own training code, which GSM8K/MATH users never need.
    from arbitrage_fast.testbed.task import generate_problems

    if n is None:
        raise ValueError("the testbed is generated on demand; pass n (the number of problems)")
    split = _TESTBED_SPLITS[split]
    problems = generate_problems(n, seed, split)
    return [
        EvalItem(id=f"testbed-{split}-{seed}-{i}", question=p.prompt, answer=str(p.answer), prompt_text=p.prompt)
        for i, p in enumerate(problems)
    ]
