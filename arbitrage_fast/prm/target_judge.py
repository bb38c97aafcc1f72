"""SpecReason's judge: the target reads the draft step, then a short instruction, and answers
with one digit 0-9; the score is the expected digit under its next-token distribution.

The prompt the target reads, after the committed context and the draft step (raw text, no
chat template, so the judgement sits in the same stream the target would continue):

    <context><draft step>
    [Review] How sound is the last step above, from 0 (wrong or useless) to 9 (correct and
    useful)? Answer with one digit.
    Score: <- the target's next token is read here

The instruction is tokenized on its own (no special tokens) and fed after the step's tokens.
It ends in a space so that tokenizers which split digits from the preceding space (Qwen2,
Llama 3, byte-level BPEs) put the answer in a bare digit token; the digits "0".."9" must each
be one token of the target's vocabulary, which `TargetJudge` checks when it is built.
Reading ten logits instead of sampling one digit makes the score continuous, so thresholds
between integers mean something, and costs no extra forward.
"""
from __future__ import annotations

import torch

JUDGE_PROMPT = ("\n[Review] How sound is the last step above, from 0 (wrong or useless) to 9 (correct and "
                "useful)? Answer with one digit.\nScore: ")


class JudgeTokenError(ValueError):
    """The target's tokenizer cannot read the judge's answer as one digit token."""


class TargetJudge:
    """The judge prompt and answer digits in one tokenizer's ids."""

    def __init__(self, tokenizer, name: str = "the target") -> None:
        digits = []
        for d in range(10):
            ids = tokenizer(str(d), add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise JudgeTokenError(f"specreason reads the target's score as one digit token, but the tokenizer of "
                                      f"{name} splits {str(d)!r} into {len(ids)} tokens {ids}; use another policy "
                                      "with this target")
            digits.append(ids[0])
        if len(set(digits)) != 10:
            raise JudgeTokenError(f"the tokenizer of {name} maps two digits to one token: {digits}")
        self.digit_ids = digits
        self.prompt_ids: list[int] = tokenizer(JUDGE_PROMPT, add_special_tokens=False)["input_ids"]

    def score(self, logits: torch.Tensor) -> float:
        """logits [V] of the token after the prompt -> expected digit, the digits' probabilities
        renormalised among themselves (what the target would answer if it must answer a digit)."""
        p = torch.softmax(logits.float()[self.digit_ids], dim=-1)
        return float((p * torch.arange(10, dtype=p.dtype, device=p.device)).sum())
