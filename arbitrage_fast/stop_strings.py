"""User stop strings (OpenAI's `stop`): where an answer must end, checked as each step commits.

A step is decided whole (the policy keeps the draft's or takes the target's), so a stop string
is looked for in the committed step's text rather than token by token inside the decode: the
model may write past it to the step's end, and that text is cut. The answer ends before the
earliest stop string, as in vLLM and OpenAI's API. The tail of the answer so far is searched
with the step, so a stop string begun at the end of the previous step and completed in this
one ends the answer where this step starts (the previous step, already sent, keeps its text).
The local engine (request_flow.py) and the remote backend share this rule.
"""
from __future__ import annotations

from typing import Callable

MAX_STOP_STRINGS = 16


def check_stop_strings(stop) -> tuple[str, ...]:
    """The stop strings as a tuple; a clear error for anything else."""
    if isinstance(stop, str):
        stop = (stop,)
    stop = tuple(stop)
    if len(stop) > MAX_STOP_STRINGS:
        raise ValueError(f"stop holds {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
    for s in stop:
        if not isinstance(s, str) or not s:
            raise ValueError(f"each stop string must be a non-empty string, got {s!r}")
    return stop


def find_stop(before: str, text: str, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """(cut, stop string): the answer ends at `text[:cut]`, before the earliest stop string in
    the tail of `before` (the answer so far) followed by `text`; None when there is none."""
    if not stops:
        return None
    keep = max(map(len, stops)) - 1  # a stop string begun before the step ends at most this far back
    tail = before[max(0, len(before) - keep):]
    joined = tail + text
    hits = [(i, s) for s in stops if (i := joined.find(s)) >= 0]
    if not hits:
        return None
    at, stop = min(hits)
    return max(0, at - len(tail)), stop


def end_at_stop(step, before: str, stops: tuple[str, ...]) -> bool:
    """Cut a committed step's text at the earliest stop string and mark it as the answer's
    last (`ended_by` "stop", `matched_stop`); False, and the step untouched, when there is none."""
    hit = find_stop(before, step.text, stops)
    if hit is None:
        return False
    step.text, step.ended_by, step.matched_stop = step.text[:hit[0]], "stop", hit[1]
    return True


def tokens_through_stop(token_ids: list[int], decode: Callable[[list[int]], str], before: str,
                        stops: tuple[str, ...]) -> int:
    """How many of a step's tokens it takes to write its first stop string (vLLM keeps the ids
    up to the one that completes it while the text ends before it)."""
    for k in range(1, len(token_ids) + 1):
        if find_stop(before, decode(token_ids[:k]), stops) is not None:
            return k
    return len(token_ids)
