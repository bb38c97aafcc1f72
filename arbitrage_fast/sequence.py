"""One request's state and what it returns: committed tokens, steps, and accounting."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

_ids = itertools.count()


@dataclass
class Step:
    text: str
    token_ids: list[int]
    source: str  # "draft" or "target"
    ended_by: str  # "boundary" | "eos" | "step_cap" | "length"
    draft_prm: float | None = None
    target_prm: float | None = None
    router_score: float | None = None
    features: torch.Tensor | None = field(default=None, repr=False)  # router input of the draft step
    rejected_draft: list[int] | None = field(default=None, repr=False)  # the draft step an escalation replaced

    @property
    def escalated(self) -> bool:
        return self.source == "target"


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated tokens (EOS included when it was generated)
    text: str
    steps: list[Step]
    stats: dict
    finish_reason: str  # "eos" | "length"


@dataclass
class Sequence:
    """Committed tokens are shared by both models (same tokenizer); each model's KV length
    lives in the pool, so a rollback is a truncate there, never a copy here."""

    prompt_ids: list[int]
    prompt_text: str
    seq_id: int = field(default_factory=lambda: next(_ids))
    tokens: list[int] = field(default_factory=list)  # prompt + committed output
    steps: list[Step] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tokens = list(self.prompt_ids)

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[len(self.prompt_ids):]

    def commit(self, step: Step) -> None:
        self.tokens.extend(step.token_ids)
        self.steps.append(step)

    def step_texts(self) -> list[str]:
        return [s.text for s in self.steps]
