"""What a request asks of a model: the unit the scheduler batches.

A request never calls a model itself. Its step logic is a generator that yields a
`ModelWork` (feed these tokens to this role's model for this sequence) and is sent back the
`ForwardOutput`; the scheduler gathers the works of every running request into one forward
per role. Before a catch-up prefill the generator may also yield a `SharePrefix`: the
scheduler then lets the sequence take over KV that another request already computed for the
same leading tokens, and the generator feeds only the rest. `run_alone` drives such a
generator with nothing else in the batch (so nothing to share), which is what a
single-request decoder (and its tests) needs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Generator, Literal, TypeVar

from arbitrage_fast.roles import Role

if TYPE_CHECKING:
    from arbitrage_fast.router.head import RouterHead

    from .model_runner import ForwardOutput
    from .step_decoder import StopRule

T = TypeVar("T")


@dataclass
class ModelWork:
    role: Role
    seq_id: int
    tokens: list[int]
    # The output rows wanted: the last token's, every token's, or those of the last n tokens
    # (a score over a step fed after a long catch-up needs only the step's rows, and logits
    # over a 150k vocabulary cost a large share of a prefill when computed for every row).
    rows: Literal["last", "all"] | int = "last"

    def __post_init__(self) -> None:
        if not self.tokens:
            raise ValueError("a model work item needs at least one token to feed")
        if isinstance(self.rows, bool) or not (self.rows in ("last", "all") or isinstance(self.rows, int)):
            raise ValueError(f"rows must be 'last', 'all' or a row count, got {self.rows!r}")
        if isinstance(self.rows, int) and not 1 <= self.rows <= len(self.tokens):
            raise ValueError(f"rows={self.rows} asks for more rows than the {len(self.tokens)} tokens fed, or none")

    @property
    def wanted(self) -> int:
        """How many trailing rows this work returns."""
        return 1 if self.rows == "last" else len(self.tokens) if self.rows == "all" else self.rows

    def rows_in(self, start: int, end: int) -> int:
        """How many of the wanted rows belong to tokens[start:end] (a chunk of a split prefill)."""
        return max(0, end - max(start, len(self.tokens) - self.wanted))


@dataclass
class SharePrefix:
    """Let sequence `seq_id` take over, in `role`'s model, another request's KV for the longest
    prefix of `context` that request has computed (the same prompt, say), instead of computing
    it. The flow is sent None once the scheduler has done what it can; it then reads its KV
    length and prefills the rest. `context` never holds the flow's last context token: that one
    is always fed, since its logits start the next step."""

    role: Role
    seq_id: int
    context: list[int]


@dataclass
class StepWork:
    """Decode one greedy step of sequence `seq_id` as a row of the scheduler's shared chunked
    loop (chunked_rows.py), from `first` (the forward output whose last row starts the step),
    under `stop`; `router` (a RouterHead, or None) scores the step at its end. The flow is sent
    the `DecodedStep`. Yielded only after the loop reserved the row (`ChunkedRows.reserve`)."""

    role: Role
    seq_id: int
    first: "ForwardOutput"
    stop: "StopRule"
    router: "RouterHead | None" = None
    track_features: bool = False  # the step's router features come back with it


# A step-logic generator: yields ModelWork (receives ForwardOutput), SharePrefix (receives
# None) or StepWork (receives a DecodedStep), and returns its result.
WorkFlow = Generator["ModelWork | SharePrefix | StepWork", object, T]


def share_prefix(cache, seq_id: int, role: Role, context: list[int]) -> "WorkFlow[None]":
    """Ask to share the KV of `context` but its last token, unless this sequence already holds it."""
    if cache.num_tokens(seq_id, role) < len(context) - 1:
        yield SharePrefix(role, seq_id, context[:-1])


def run_alone(flow: "WorkFlow[T]", runners) -> T:
    """Run a work-yielding generator to its end, one forward per work item (`runners[role]`)."""
    out = None
    while True:
        try:
            work = flow.send(out)
        except StopIteration as done:
            return done.value
        out = None if isinstance(work, SharePrefix) else runners[work.role].forward_one(work.seq_id, work.tokens,
                                                                                        work.rows)
