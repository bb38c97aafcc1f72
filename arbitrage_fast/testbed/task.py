"""The synthetic task: a start number pushed through a chain of arithmetic operations.

Why this task: every step of its chain of thought ("47 + 38 = 85") can be checked exactly, so
a process reward is known rather than estimated, and carries and borrows make a small model
err the way a real draft does — locally, on one step, while the rest of the chain stays sane.

A solution is written one operation per step, each step ending in a blank line, then a final
"Answer: N" step that the tokenizer's EOS closes:

    Q: Start with 47. Add 38. Multiply by 3. Subtract 59. What is the result?
    A: 47 + 38 = 85\n\n85 * 3 = 255\n\n255 - 59 = 196\n\nAnswer: 196</s>

With `TaskConfig(plan_steps=True)` (the shipped pair's task) each equation is preceded by a
plan step that says in words which operation comes next, in one of 27 equally likely
phrasings ("Next, let us take away 59.\n\n"). Real chains of thought interleave such
narration with computation; it is always easy to get right, yet a likelihood-based PRM scores
it low, because no model can predict which of the equivalent phrasings was chosen. That is the
gap between "uncertain" and "wrong" that the Arbitrage paper measures RSD wasting target work on.
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

# A plan step is "<opener>, <subject> <verb phrase> N." with one free choice in each slot.
PLAN_OPENERS = ("Now", "Next", "Then")
PLAN_SUBJECTS = ("we", "let us", "I will")
PLAN_VERBS = {
    "+": ("add", "add on", "increase it by"),
    "-": ("subtract", "take away", "decrease it by"),
    "*": ("multiply by", "multiply it by", "scale it by"),
}
_VERB_CHOICES = len(PLAN_VERBS["+"])
assert all(len(phrases) == _VERB_CHOICES for phrases in PLAN_VERBS.values())
PLAN_PHRASINGS = len(PLAN_OPENERS) * len(PLAN_SUBJECTS) * _VERB_CHOICES

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
    """Difficulty knobs. The shipped pair learns the defaults with plan steps on
    (`train.SHIPPED_TASK`): its 2-layer draft slips on about one step in twenty (four answers
    in five right), its 16-layer target almost never.

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
    # Narrate each operation in a plan step before its equation (see the module docstring).
    plan_steps: bool = False

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
    `plan_phrasings` (one index < PLAN_PHRASINGS per operation, or empty for no plan steps)
    picks the wording of the plan step written before each equation. It is how this copy of
    the solution is worded, not part of the problem: it takes no part in equality, and the
    prompt does not reveal it.
    """

    start: int
    operations: tuple[Operation, ...]
    plan_phrasings: tuple[int, ...] = field(default=(), compare=False)
    prompt: str = field(init=False)
    steps: tuple[str, ...] = field(init=False, compare=False)
    answer: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt", format_prompt(self.start, self.operations))
        if self.plan_phrasings and len(self.plan_phrasings) != len(self.operations):
            raise ValueError(f"{len(self.plan_phrasings)} plan phrasings for {len(self.operations)} operations")
        steps, value = [], self.start
        for i, operation in enumerate(self.operations):
            result = operation.apply(value)
            if self.plan_phrasings:
                steps.append(format_plan(operation, self.plan_phrasings[i]))
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


def format_plan(operation: Operation, phrasing: int) -> str:
    """The plan step announcing `operation`, worded by `phrasing` in [0, PLAN_PHRASINGS)."""
    if not 0 <= phrasing < PLAN_PHRASINGS:
        raise ValueError(f"plan phrasing must be in [0, {PLAN_PHRASINGS}), got {phrasing}")
    opener, rest = divmod(phrasing, len(PLAN_SUBJECTS) * _VERB_CHOICES)
    subject, verb = divmod(rest, _VERB_CHOICES)
    return (f"{PLAN_OPENERS[opener]}, {PLAN_SUBJECTS[subject]} {PLAN_VERBS[operation.op][verb]} "
            f"{operation.operand}.{STEP_SEPARATOR}")


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
    if not config.plan_steps:
        return Problem(start, tuple(operations))
    # Worded from a hash of the problem, not from `rng`: switching plans on words the same
    # problems rather than drawing new ones.
    prompt = format_prompt(start, operations)
    wording = random.Random(hashlib.sha256(b"plan:" + prompt.encode()).digest())
    return Problem(start, tuple(operations), tuple(wording.randrange(PLAN_PHRASINGS) for _ in operations))


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
