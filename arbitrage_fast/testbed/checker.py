"""The exact step checker: the testbed's ground truth for every step and every answer.

Why a graded scale rather than pass/fail: a process reward model's job in Arbitrage is to rank
two candidate steps from the same context, and "right operation, slipped on a carry" is closer
to correct than a step that does not continue the chain at all. The scale is monotone in how
much of the step is right:

    0.0   malformed (not "a op b = c", a plan step, nor "Answer: N"), an operation or plan
          step after the chain is complete, or an answer given before every operation was applied
    0.25  a well-formed equation that does not continue the chain: its left operand is not
          the value the previous step stated (or the start number), or its operator/operand is
          not the problem's next operation; a plan step naming another operation than the next
    0.5   continues the chain with the right operation, but the stated result is wrong;
          for the answer step: in the right place, but N is not the chain's value
    1.0   correct

Plan steps ("Next, let us take away 59.") are optional and any of their phrasings is right;
they do not count as operations, so the equation after a plan is judged as the next one.

Steps are judged locally, against the context as written: a step that correctly continues a
chain that already went wrong scores 1.0 (the error was charged to the step that made it), as
a PRM scoring a step given its prefix would.
"""

from __future__ import annotations

import re

from .task import (
    ANSWER_PREFIX,
    PLAN_OPENERS,
    PLAN_SUBJECTS,
    PLAN_VERBS,
    STEP_SEPARATOR,
    VERBS,
    Operation,
    Problem,
)

MALFORMED, OFF_CHAIN, WRONG_RESULT, CORRECT = 0.0, 0.25, 0.5, 1.0

_EQUATION_RE = re.compile(r"(\d+) ([+\-*]) (\d+) = (-?\d+)")
_ANSWER_RE = re.compile(re.escape(ANSWER_PREFIX) + r"(-?\d+)")
_ANSWER_SEARCH_RE = re.compile(re.escape(ANSWER_PREFIX.strip()) + r"\s*(-?\d+)")
_EOS_TEXT = "</s>"
_PLAN_OPERATOR = {phrase: op for op, phrases in PLAN_VERBS.items() for phrase in phrases}
_PLAN_RE = re.compile(
    rf"(?:{'|'.join(PLAN_OPENERS)}), (?:{'|'.join(PLAN_SUBJECTS)}) "
    rf"({'|'.join(sorted(_PLAN_OPERATOR, key=len, reverse=True))}) (\d+)\."
)


def _clean(step: str) -> str:
    # A step may arrive with its separator, with trailing EOS text, or cut short; only its
    # content is judged. Inner newlines stay and make the step malformed.
    return step.replace(_EOS_TEXT, "").strip(" \n")


def parse_equation(step: str) -> tuple[int, Operation, int] | None:
    """(left operand, operation, stated result) of an equation step, or None."""
    match = _EQUATION_RE.fullmatch(_clean(step))
    if match is None or match.group(2) not in VERBS:
        return None
    left, op, operand, result = match.groups()
    return int(left), Operation(op, int(operand)), int(result)


def parse_plan(step: str) -> Operation | None:
    """The operation a plan step announces, or None if `step` is not a plan step."""
    match = _PLAN_RE.fullmatch(_clean(step))
    return None if match is None else Operation(_PLAN_OPERATOR[match.group(1)], int(match.group(2)))


def parse_answer(step: str) -> int | None:
    match = _ANSWER_RE.fullmatch(_clean(step))
    return None if match is None else int(match.group(1))


def carried_value(problem: Problem, previous_steps: list[str]) -> int:
    """The value the context implies: the last stated result, or the start number.

    A malformed earlier step states nothing, so the value carries past it.
    """
    value = problem.start
    for step in previous_steps:
        parsed = parse_equation(step)
        if parsed is not None:
            value = parsed[2]
    return value


def operations_done(previous_steps: list[str]) -> int:
    """How many operations the context has attempted: every step but the plans (a malformed
    step used up its operation's turn)."""
    return sum(1 for step in previous_steps if parse_plan(step) is None)


def check_step(problem: Problem, previous_steps: list[str], step: str) -> float:
    """Score `step` as the next step after `previous_steps`, on the scale in this module's
    docstring."""
    index = operations_done(previous_steps)
    value = carried_value(problem, previous_steps)
    plan = parse_plan(step)
    if plan is not None:
        if index >= len(problem.operations):
            return MALFORMED
        return CORRECT if plan == problem.operations[index] else OFF_CHAIN
    answer = parse_answer(step)
    if answer is not None:
        if index != len(problem.operations):
            return MALFORMED
        return CORRECT if answer == value else WRONG_RESULT
    parsed = parse_equation(step)
    if parsed is None or index >= len(problem.operations):
        return MALFORMED
    left, operation, result = parsed
    if left != value or operation != problem.operations[index]:
        return OFF_CHAIN
    return CORRECT if operation.apply(left) == result else WRONG_RESULT


def split_steps(text: str) -> list[str]:
    """Cut a solution into steps, each keeping its trailing separator (the last may lack one)."""
    parts = text.split(STEP_SEPARATOR)
    steps = [part + STEP_SEPARATOR for part in parts[:-1]]
    if parts[-1]:
        steps.append(parts[-1])
    return steps


def score_solution(problem: Problem, text: str) -> list[float]:
    """Per-step scores of a whole solution, each step judged in the context before it."""
    steps = split_steps(text)
    return [check_step(problem, steps[:i], step) for i, step in enumerate(steps)]


def extract_answer(text: str) -> int | None:
    """The number after the last "Answer:" in `text`, or None if there is none."""
    matches = _ANSWER_SEARCH_RE.findall(text)
    return int(matches[-1]) if matches else None


def is_correct(problem: Problem, text: str) -> bool:
    """Whether the solution's final answer is the problem's true answer (outcome, not process)."""
    return extract_answer(text) == problem.answer
