"""The synthetic task: a start number pushed through a chain of arithmetic operations.

Why this task: every step of its chain of thought ("47 + 38 = 85") can be checked exactly, so
a process reward is known rather than estimated, and carries and borrows make a small model
err the way a real draft does — locally, on one step, while the rest of the chain stays sane.

A solution is written one operation per step, each step ending in a blank line, then a final
"Answer: N" step that the tokenizer's EOS closes:

    Q: Start with 47. Add 38. Multiply by 3. Subtract 59. What is the result?
    A: 47 + 38 = 85\n\n85 * 3 = 255\n\n255 - 59 = 196\n\nAnswer: 196</s>
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field

STEP_SEPARATOR = "\n\n"
ANSWER_PREFIX = "Answer: "

# The prompt's verb for each operator, and back again (the PRM parses prompts).
VERBS = {"+": "Add", "-": "Subtract", "*": "Multiply by"}
OPERATORS = {verb: op for op, verb in VERBS.items()}

# Splits are buckets of a hash of the problem itself, so a problem lands in exactly one split
# whatever seed or count produced it: train and test can never share a problem.
SPLIT_BUCKETS = {"train": range(2, 10), "val": range(1, 2), "test": range(0, 1)}


@dataclass(frozen=True)
class Operation:
    """One link of the chain: apply `op` with `operand` to the running value."""

    op: str
    operand: int

    def __post_init__(self) -> None:
        if self.op not in VERBS:
            raise ValueError(f"operator must be one of {sorted(VERBS)}, got {self.op!r}")
        if self.operand < 0:
            raise ValueError(f"operands are non-negative, got {self.operand}")

    def apply(self, value: int) -> int:
        if self.op == "+":
            return value + self.operand
        if self.op == "-":
            return value - self.operand
        return value * self.operand

    @property
    def instruction(self) -> str:
        return f"{VERBS[self.op]} {self.operand}."


@dataclass(frozen=True)
class TaskConfig:
    """Difficulty knobs. With the defaults, the shipped 2-layer draft errs on about one step in
    six (half its answers right) while the 8-layer target almost never does.

    Values stay in [0, max_value] so every number has at most `len(str(max_value))` digits;
    an operation that would leave that range is never drawn.
    """

    min_ops: int = 2
    max_ops: int = 4
    start_range: tuple[int, int] = (10, 99)
    add_range: tuple[int, int] = (10, 99)
    sub_range: tuple[int, int] = (10, 99)
    mul_range: tuple[int, int] = (2, 9)
    # Small values and no multiplication by default: a model trained for minutes on two CPU
    # cores must learn the chain's bookkeeping (which operation is next, which value carries)
    # before it can err only on the arithmetic, as real drafts do.
    max_value: int = 199
    op_weights: tuple[float, float, float] = (0.5, 0.5, 0.0)  # +, -, *

    def __post_init__(self) -> None:
        if not 1 <= self.min_ops <= self.max_ops:
            raise ValueError(f"need 1 <= min_ops <= max_ops, got {self.min_ops}, {self.max_ops}")
        for name in ("start_range", "add_range", "sub_range", "mul_range"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must be an ordered non-negative pair, got {(lo, hi)}")
        if self.start_range[1] > self.max_value:
            raise ValueError("start_range exceeds max_value")


@dataclass(frozen=True)
class Problem:
    """A problem and its gold solution.

    `steps` are the gold step texts: one per operation, each ending in STEP_SEPARATOR, then the
    final "Answer: N" step (no separator: EOS ends it). `"".join(steps)` is the gold solution.
    """

    start: int
    operations: tuple[Operation, ...]
    prompt: str = field(init=False)
    steps: tuple[str, ...] = field(init=False)
    answer: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt", format_prompt(self.start, self.operations))
        steps, value = [], self.start
        for operation in self.operations:
            result = operation.apply(value)
            steps.append(format_step(value, operation, result))
            value = result
        steps.append(format_answer(value))
        object.__setattr__(self, "steps", tuple(steps))
        object.__setattr__(self, "answer", value)

    @property
    def solution(self) -> str:
        return "".join(self.steps)

    def values(self) -> list[int]:
        """The running value before each operation, then the final value."""
        out = [self.start]
        for operation in self.operations:
            out.append(operation.apply(out[-1]))
        return out


def format_prompt(start: int, operations: tuple[Operation, ...] | list[Operation]) -> str:
    body = " ".join(op.instruction for op in operations)
    return f"Q: Start with {start}. {body} What is the result?\nA: "


def format_step(left: int, operation: Operation, result: int) -> str:
    return f"{left} {operation.op} {operation.operand} = {result}{STEP_SEPARATOR}"


def format_answer(value: int) -> str:
    return f"{ANSWER_PREFIX}{value}"


_PROMPT_RE = re.compile(r"Q: Start with (\d+)\. (.*?) ?What is the result\?")
_INSTRUCTION_RE = re.compile(r"(Add|Subtract|Multiply by) (\d+)\.")


def parse_prompt(prompt: str) -> Problem:
    """Rebuild the Problem from its prompt text (what a PRM sees). Raises ValueError if the
    text is not a prompt of this task."""
    match = _PROMPT_RE.search(prompt)
    if match is None:
        raise ValueError(f"not a testbed prompt: {prompt[:80]!r}")
    body = match.group(2)
    operations = tuple(
        Operation(OPERATORS[verb], int(num)) for verb, num in _INSTRUCTION_RE.findall(body)
    )
    if not operations or _INSTRUCTION_RE.sub("", body).strip():
        raise ValueError(f"could not read the operations of: {prompt[:80]!r}")
    return Problem(int(match.group(1)), operations)


def split_of(problem: Problem) -> str:
    """The split a problem belongs to, from a stable hash of its prompt."""
    bucket = int(hashlib.sha256(problem.prompt.encode()).hexdigest()[:8], 16) % 10
    for split, buckets in SPLIT_BUCKETS.items():
        if bucket in buckets:
            return split
    raise AssertionError("SPLIT_BUCKETS must cover 0..9")


def _draw_operation(rng: random.Random, value: int, config: TaskConfig) -> Operation:
    choices = []
    if value + config.add_range[0] <= config.max_value:
        hi = min(config.add_range[1], config.max_value - value)
        choices.append(("+", config.add_range[0], hi, config.op_weights[0]))
    if value >= config.sub_range[0]:
        # Subtrahend never exceeds the running value: results stay non-negative.
        choices.append(("-", config.sub_range[0], min(config.sub_range[1], value), config.op_weights[1]))
    if value * config.mul_range[0] <= config.max_value:
        hi = min(config.mul_range[1], config.max_value // max(value, 1))
        choices.append(("*", config.mul_range[0], hi, config.op_weights[2]))
    choices = [c for c in choices if c[3] > 0]  # a zero weight switches an operator off
    if not choices:
        raise ValueError(f"no operation keeps {value} within the task's bounds; check TaskConfig")
    op, lo, hi, _ = rng.choices(choices, weights=[c[3] for c in choices])[0]
    return Operation(op, rng.randint(lo, hi))


def random_problem(rng: random.Random, config: TaskConfig = TaskConfig()) -> Problem:
    value = rng.randint(*config.start_range)
    start, operations = value, []
    for _ in range(rng.randint(config.min_ops, config.max_ops)):
        operation = _draw_operation(rng, value, config)
        operations.append(operation)
        value = operation.apply(value)
    return Problem(start, tuple(operations))


def generate_problems(
    n: int, seed: int = 0, split: str = "train", config: TaskConfig = TaskConfig()
) -> list[Problem]:
    """`n` distinct problems of `split`, the same list for the same arguments on any machine."""
    if split not in SPLIT_BUCKETS:
        raise ValueError(f"split must be one of {sorted(SPLIT_BUCKETS)}, got {split!r}")
    # The split name is part of the seed so splits are not filtered views of one stream.
    rng = random.Random(f"{seed}:{split}")
    seen: set[str] = set()
    problems: list[Problem] = []
    attempts = 0
    while len(problems) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"could not draw {n} distinct {split} problems under {config}")
        problem = random_problem(rng, config)
        if problem.prompt in seen or split_of(problem) != split:
            continue
        seen.add(problem.prompt)
        problems.append(problem)
    return problems
