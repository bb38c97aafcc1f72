"""A world where the truth is known: synthetic multi-step arithmetic with an exact checker,
and a tiny trained draft/target pair shipped in the package.

Why it ships trained models: the engine, router training and threshold sweeps must run end to
end on a fresh machine, in CI, without downloads or a GPU. `train.py` rebuilds the shipped
folders (`python -m arbitrage_fast.testbed.train --out DIR`); `checkpoints/manifest.json`
records how they were made and what they measure.
"""

from __future__ import annotations

from pathlib import Path

from .checker import check_step, extract_answer, is_correct
from .task import Operation, Problem, TaskConfig, generate_problems, parse_prompt

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
ROLES = ("draft", "target", "prm")


def shipped_checkpoint(role: str) -> Path:
    """Folder of the shipped `draft`, `target` or `prm` model (HF layout: config, safetensors,
    tokenizer; the PRM adds its value head)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    path = CHECKPOINTS / role
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no shipped {role} checkpoint at {path}; rebuild with "
            f"`python -m arbitrage_fast.testbed.{'prm_train' if role == 'prm' else 'train'} --out {CHECKPOINTS}`"
        )
    return path


__all__ = [
    "CHECKPOINTS",
    "Operation",
    "Problem",
    "TaskConfig",
    "check_step",
    "extract_answer",
    "generate_problems",
    "is_correct",
    "parse_prompt",
    "shipped_checkpoint",
]
