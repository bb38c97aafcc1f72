"""Final-answer extraction and equivalence grading.

Extraction takes what a solution commits to, in order of how deliberate the
commitment is: the last ``\\boxed{...}``, else a closing phrase ("The answer
is X", "Answer: X", "#### X"), else the last number written. Equivalence is
decided by math-verify (symbolic and numeric comparison, so 2/4 == 0.5), with a
normalised string comparison as a fallback for answers it cannot parse
(names, multiple-choice letters).

math-verify times out by ``signal.alarm``, which only works on the main thread;
elsewhere (a server's worker threads) grading runs without its timeout.
"""

from __future__ import annotations

import re
import threading

from math_verify import parse, verify

_BOX_OPENERS = ("\\boxed{", "\\fbox{")
_PHRASE = re.compile(r"(?:the\s+(?:final\s+)?answer\s+is|answer\s*:|####)\s*:?\s*([^\n]+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_NUMBER_THEN_WORDS = re.compile(r"^(-?[\d,]*\d(?:\.\d+)?)\s+[A-Za-z][A-Za-z\s]*$")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")


def extract_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (nested braces allowed), or None."""
    best: tuple[int, str] | None = None
    for opener in _BOX_OPENERS:
        start = text.find(opener)
        while start != -1:
            content = _balanced(text, start + len(opener))
            if content is not None and (best is None or start > best[0]):
                best = (start, content)
            start = text.find(opener, start + 1)
    return None if best is None else best[1].strip()


def _balanced(text: str, pos: int) -> str | None:
    depth = 1
    for i in range(pos, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[pos:i]
    return None  # truncated generation: the box never closed


def extract_answer(text: str) -> str | None:
    """The final answer a solution commits to, cleaned for comparison; None when there is none."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return _clean(boxed)
    phrases = _PHRASE.findall(text)
    if phrases:
        inner = extract_boxed(phrases[-1])
        answer = _clean(inner if inner is not None else phrases[-1])
        if answer:
            return answer
    numbers = _NUMBER.findall(text)
    return _clean(numbers[-1]) if numbers else None


def _clean(answer: str) -> str:
    answer = answer.strip().strip("*").strip()
    answer = answer.replace("\\$", "").replace("$", "").replace("\\(", "").replace("\\)", "")
    answer = answer.strip().rstrip(".,;").strip()
    words = _NUMBER_THEN_WORDS.match(answer)  # "18 dollars" -> "18"
    if words:
        answer = words.group(1)
    if _THOUSANDS.match(answer):  # "1,234" -> "1234"; "3,5" stays a pair
        answer = answer.replace(",", "")
    return answer


def _normalise(answer: str) -> str:
    answer = _TEXT_WRAPPER.sub(r"\1", answer)
    return re.sub(r"\s+", "", answer).lower().strip("().")


def answers_match(prediction: str, gold: str) -> bool:
    """Whether an extracted answer equals the gold answer (both as LaTeX-ish strings)."""
    on_main = threading.current_thread() is threading.main_thread()
    timeout = 5 if on_main else None
    try:
        gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout)
        pred_parsed = parse(f"\\boxed{{{prediction}}}", parsing_timeout=timeout)
        if gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=timeout):
            return True
    except Exception:  # math-verify raises on pathological LaTeX; fall back to strings
        pass
    return _normalise(prediction) == _normalise(gold)


def grade(prediction_text: str, gold_answer: str) -> bool:
    """Whether a full solution text reaches the gold answer."""
    prediction = extract_answer(prediction_text)
    return prediction is not None and answers_match(prediction, str(gold_answer))
