"""A deterministic PRM and the small random pair that policy and labelling tests run on."""
from __future__ import annotations

import math
from pathlib import Path

from arbitrage_fast.prm.base import ProcessRewardModel

from .tiny_models import build_tiny_lm


class LengthPRM(ProcessRewardModel):
    """Prefers longer steps, deterministic: lets oracle tests know which step must win."""

    def score(self, prompt, previous_steps, step):
        return 1.0 - math.exp(-len(step) / 10)


def build_policy_pair(root: Path) -> tuple[Path, Path]:
    """A 1-layer draft that ends steps eagerly and a 2-layer target, different widths."""
    draft = build_tiny_lm(root / "draft", "llama", hidden=32, layers=1, seed=1, boundary_bias=15.0)
    target = build_tiny_lm(root / "target", "llama", hidden=48, layers=2, seed=2, boundary_bias=5.0)
    return draft, target
