"""The testbed's exact checker, spoken through the PRM interface.

Why it exists: on the synthetic arithmetic task the truth of every step is known, so router
labels, RSD thresholds and oracle routing can be computed against a perfect PRM — any gap
between the router and the oracle is then the router's, not a noisy PRM's.
"""

from __future__ import annotations

from functools import lru_cache

from ..testbed.checker import check_step
from ..testbed.task import Problem, parse_prompt
from .base import ProcessRewardModel


@lru_cache(maxsize=4096)
def _problem(prompt: str) -> Problem:
    # Label generation scores many steps of one prompt; parse each prompt once.
    return parse_prompt(prompt)


class ExactCheckerPRM(ProcessRewardModel):
    """Scores a step with `testbed.checker.check_step` on the problem read back from the prompt.

    Scores are on the checker's documented scale {0, 0.25, 0.5, 1}. A prompt that is not a
    testbed prompt raises ValueError: silently scoring it would poison router labels.
    """

    def score(self, prompt: str, previous_steps: list[str], step: str) -> float:
        return check_step(_problem(prompt), list(previous_steps), step)
