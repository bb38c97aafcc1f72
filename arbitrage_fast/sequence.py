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
    ended_by: str  # "boundary" | "eos" | "step_cap" | "length" | "stop" (a user stop string)
    draft_prm: float | None = None
    target_prm: float | None = None
    router_score: float | None = None
    judge_score: float | None = None  # specreason: the target's 0-9 score of the draft step
    features: torch.Tensor | None = field(default=None, repr=False)  # router input of the draft step
    rejected_draft: str | None = field(default=None, repr=False)  # text of the draft step an escalation replaced
    matched_stop: str | None = None  # the user stop string that ended the answer in this step

    @property
    def escalated(self) -> bool:
        return self.source == "target"


@dataclass
class GenerationResult:
    # Generated tokens (EOS included when it was generated), in the target's vocabulary: with a
    # mixed-tokenizer pair, draft-written steps appear re-tokenized; Step.token_ids keep the writer's.
    token_ids: list[int]
    text: str
    steps: list[Step]
    stats: dict
    finish_reason: str  # "eos" | "length" | "stop" (a user stop string: `stop_reason` names it)
    # Set where the ids stay elsewhere (remote servers): how many tokens the answer took.
    num_completion_tokens: int | None = None
    stop_reason: str | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids) if self.num_completion_tokens is None else self.num_completion_tokens


class Sequence:
    """One request's committed context, in each model's own token ids.

    When draft and target share a vocabulary both views are the same list, so a committed
    step is appended once. Otherwise each committed step's *text* is tokenized for the model
    that did not write it (only the new step, never the whole context again). Each model's KV
    length lives in the pool, so a rollback is a truncate there, never a copy here.
    """

    def __init__(self, prompt_ids: dict[int, list[int]], prompt_text: str, shared_vocab: bool) -> None:
        self.seq_id = next(_ids)
        self.prompt_text = prompt_text
        self.shared_vocab = shared_vocab
        self.prompt_len = {m: len(ids) for m, ids in prompt_ids.items()}
        if shared_vocab:
            common = list(prompt_ids[0])
            self._tokens = {m: common for m in prompt_ids}
        else:
            self._tokens = {m: list(ids) for m, ids in prompt_ids.items()}
        self.steps: list[Step] = []
        self.num_generated = 0  # tokens written so far, each counted in its writer's vocabulary

    def tokens(self, model: int) -> list[int]:
        """Prompt + committed output in `model`'s token ids (do not mutate)."""
        return self._tokens[model]

    def output_ids(self, model: int) -> list[int]:
        return self._tokens[model][self.prompt_len[model]:]

    def commit(self, step: Step, writer: int, other_ids: list[int] | None = None) -> None:
        """Append a step written by model `writer`; other_ids is its text in the other model's ids."""
        self._tokens[writer].extend(step.token_ids)
        if not self.shared_vocab:
            for m in self._tokens:
                if m != writer:
                    self._tokens[m].extend(other_ids)
        self.num_generated += len(step.token_ids)
        self.steps.append(step)

    def step_texts(self) -> list[str]:
        return [s.text for s in self.steps]
