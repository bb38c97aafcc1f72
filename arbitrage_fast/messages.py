"""Chat prompts: a conversation given as {"role", "content"} messages, checked once for every
engine (native or remote) so a malformed one is named the same way everywhere."""
from __future__ import annotations

ROLES = ("system", "user", "assistant")


def is_conversation(prompt) -> bool:
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(m, dict) for m in prompt)


def checked_messages(messages: list[dict]) -> list[dict]:
    """Messages as {"role", "content"} string pairs, or a ValueError naming the bad one."""
    for i, m in enumerate(messages):
        if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must have a role in {ROLES} and a string content, got {m!r}")
    if not any(m["content"].strip() for m in messages):
        raise ValueError("prompt is empty: every message's content is blank")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def problem_text(messages: list[dict]) -> str:
    """What a PRM reads as the problem: the last user message (the last message if none)."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])
