"""Measure a testbed model the way the manifest reports it: greedy accuracy, per-step error
rate, and per-token decode latency, all through transformers so the numbers do not depend on
the engine being measured later against them.
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from .checker import CORRECT, is_correct, score_solution
from .task import Problem

# Four operations, each a plan step and an equation of at most ~12 tokens, plus the answer
# line fit with room to spare; a model that rambles past this is wrong anyway.
MAX_NEW_TOKENS = 160


@torch.no_grad()
def generate_solutions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    problems: list[Problem],
    batch_size: int = 50,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> list[str]:
    """Greedy solutions, batched with left padding (the model sees no pad: the mask hides it)."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    texts: list[str] = []
    try:
        for i in range(0, len(problems), batch_size):
            prompts = [p.prompt for p in problems[i : i + batch_size]]
            batch = tokenizer(prompts, return_tensors="pt", padding=True)
            out = model.generate(
                **batch,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new = out[:, batch["input_ids"].shape[1] :]
            texts.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return texts


def evaluate_accuracy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, problems: list[Problem]
) -> dict[str, float]:
    """Share of problems answered right, and share of generated steps the checker faults."""
    texts = generate_solutions(model, tokenizer, problems)
    scores = [score_solution(p, t) for p, t in zip(problems, texts)]
    steps = sum(len(s) for s in scores)
    wrong = sum(1 for s in scores for v in s if v < CORRECT)
    first_error = sum(1 for s in scores if any(v < CORRECT for v in s))
    return {
        "problems": len(problems),
        "accuracy": round(sum(is_correct(p, t) for p, t in zip(problems, texts)) / len(problems), 4),
        "step_error_rate": round(wrong / max(1, steps), 4),
        "problems_with_a_step_error": round(first_error / len(problems), 4),
        "steps": steps,
    }


@torch.no_grad()
def _generate_seconds(model: PreTrainedModel, ids: torch.Tensor, n: int) -> float:
    began = time.perf_counter()
    model.generate(ids, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    return time.perf_counter() - began


def compare_latency(
    models: dict[str, PreTrainedModel],
    tokenizer: PreTrainedTokenizerFast,
    prompt: str,
    n_tokens: int = 64,
    rounds: int = 7,
) -> dict[str, float]:
    """Median seconds per decoded token, batch 1, greedy, for each model.

    Decode cost is isolated as (T(1 + n) - T(1)) / n so the prompt's prefill is not charged to
    the tokens; models are timed in alternation so a neighbour's load on the shared CPU hits
    all of them alike.
    """
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    samples: dict[str, list[float]] = {name: [] for name in models}
    for name, model in models.items():  # warm-up: allocator, kernels, caches
        _generate_seconds(model, ids, 4)
    for _ in range(rounds):
        for name, model in models.items():
            full = _generate_seconds(model, ids, 1 + n_tokens)
            prefill = _generate_seconds(model, ids, 1)
            samples[name].append((full - prefill) / n_tokens)
    return {name: statistics.median(v) for name, v in samples.items()}
