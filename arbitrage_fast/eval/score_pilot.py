"""Each thresholded policy's scores of draft steps on train problems: where its quantile grid goes.

A policy run at the end of its range where it escalates nothing writes the draft's own answer
and scores every step of it, so its scores there are the population its threshold cuts. The
pilot reads them off the committed steps: a thresholded policy decides every drafted step on
its evidence, and the step carries it.
It runs on train problems, so the grid that dev chooses from is placed without looking at dev
or test.
"""
from __future__ import annotations

from collections.abc import Sequence

from tqdm.auto import tqdm

from arbitrage_fast.policies import StepEvidence

from .calibration import keep_all_threshold
from .datasets import EvalItem


def pilot_scores(engine, items: Sequence[EvalItem], policies: Sequence[str], sampling=None,
                 generate_kwargs: dict | None = None, in_flight: int = 1) -> dict[str, list[float]]:
    """policy -> its scores of every draft step it wrote on `items`, run at its keep-all
    threshold, `in_flight` problems at a time (greedy answers: the batch can flip a near-tie
    token and with it the rest of one answer, which moves a quantile of hundreds of step scores
    by little)."""
    scores: dict[str, list[float]] = {}
    with tqdm(total=len(policies) * len(items), unit="run", desc="grid pilot") as bar:
        for name in policies:
            policy = engine.policy(name)
            threshold = keep_all_threshold(policy)
            requests = ((item.id, {"prompt": item.prompt, "policy": name, "threshold": threshold,
                                   "sampling": sampling, **(generate_kwargs or {})}) for item in items)
            found = scores[name] = []
            for _, result, _ in engine.completions(requests, in_flight):
                for step in result.steps:
                    evidence = StepEvidence(draft_prm=step.draft_prm, target_prm=step.target_prm,
                                            router_score=step.router_score, judge_score=step.judge_score)
                    found.append(float(policy.score(evidence)))
                bar.update(1)
    return scores
