"""A deterministic PRM and the small random pair that policy and labelling tests run on."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from arbitrage_fast import Engine, EngineConfig
from arbitrage_fast.prm.base import ProcessRewardModel
from arbitrage_fast.router.head import RouterConfig, RouterHead

from .tiny_models import build_tiny_lm


# Prompts of very different lengths (1 to 17 words), for batches whose rows differ.
MIXED_PROMPTS = [
    "We compute 12 + 30 = 42",
    "Let x be the number",
    "A",
    "Ann has 7 apples and buys 5 more apples at the shop, then gives 3 to Bob",
    "Q: 3 * 4 = ?",
    "Start with 12. Add 30. What is the result? Think step by step about it",
    "x",
    "Tom reads 20 pages a day for a week and then 35 pages on Sunday",
]


class LengthPRM(ProcessRewardModel):
    """Prefers longer steps, deterministic: lets oracle tests know which step must win."""

    def score(self, prompt, previous_steps, step):
        return 1.0 - math.exp(-len(step) / 10)


def build_policy_pair(root: Path) -> tuple[Path, Path]:
    """A 1-layer draft that ends steps eagerly and a 2-layer target, different widths."""
    draft = build_tiny_lm(root / "draft", "llama", hidden=32, layers=1, seed=1, boundary_bias=15.0)
    target = build_tiny_lm(root / "target", "llama", hidden=48, layers=2, seed=2, boundary_bias=5.0)
    return draft, target


def build_policy_folders(root: Path, router_seed: int) -> tuple[Path, Path, Path]:
    """The policy pair and a random router head on the draft's hidden states: (draft, target, router)."""
    draft, target = build_policy_pair(root)
    torch.manual_seed(router_seed)
    RouterHead(RouterConfig(hidden_size=32, width=8)).save(root / "router")
    return draft, target, root / "router"


def policy_engine(folders: tuple[Path, Path, Path], prm=None, **extra) -> Engine:
    """An engine over `build_policy_folders`' models, small pages so prompts span several."""
    draft, target, router = folders
    extra.setdefault("kv_pages", 256)
    return Engine(EngineConfig(draft=str(draft), target=str(target), router=str(router), prm=prm,
                               min_block_size=4, **extra))
