"""What a request asks of a model: the unit the scheduler batches.

A request never calls a model itself. Its step logic is a generator that yields a
`ModelWork` (feed these tokens to this role's model for this sequence) and is sent back the
`ForwardOutput`; the scheduler gathers the works of every running request into one forward
per role. `run_alone` drives such a generator with nothing else in the batch, which is what
a single-request decoder (and its tests) needs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Generator, Literal, TypeVar

from arbitrage_fast.roles import Role

T = TypeVar("T")


@dataclass
class ModelWork:
    role: Role
    seq_id: int
    tokens: list[int]
    rows: Literal["last", "all"] = "last"  # the output rows wanted: the last token's, or every token's

    def __post_init__(self) -> None:
        if not self.tokens:
            raise ValueError("a model work item needs at least one token to feed")


# A step-logic generator: yields ModelWork, receives ForwardOutput, returns its result.
WorkFlow = Generator[ModelWork, object, T]


def run_alone(flow: "WorkFlow[T]", runners) -> T:
    """Run a work-yielding generator to its end, one forward per work item (`runners[role]`)."""
    out = None
    while True:
        try:
            work = flow.send(out)
        except StopIteration as done:
            return done.value
        out = runners[work.role].forward_one(work.seq_id, work.tokens, work.rows)
