"""The one interface every process reward model (PRM) in the project speaks.

A PRM judges a single reasoning *step* given the problem and the steps already
committed before it. The router's training labels and the RSD policy both
compare such judgements, so every scorer must return a probability-like value
in [0, 1] on the same scale; how it gets there (a value head, a classifier
token, an exact checker) is the implementation's business.

Steps are texts that end with "\\n\\n" (the step boundary), except possibly the
last step of a solution, which may end at EOS instead.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

# (prompt, previous_steps, step): the unit a PRM scores.
ScoreItem = tuple[str, list[str], str]


class ProcessRewardModel(ABC):
    """Scores how likely a step is to be a correct continuation of the solution."""

    @abstractmethod
    def score(self, prompt: str, previous_steps: list[str], step: str) -> float:
        """Return the quality of `step` after `previous_steps`, in [0, 1]."""

    def score_batch(self, items: list[ScoreItem]) -> list[float]:
        """Score many steps at once.

        The default loops over `score`; model-backed PRMs override it because one
        padded forward over many steps is far cheaper than many small ones.
        """
        return [self.score(prompt, previous, step) for prompt, previous, step in items]
