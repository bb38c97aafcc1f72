"""Process reward models: the interface, Hugging Face checkpoints, and the exact checker.

`ExactCheckerPRM` lives in `exact.py` and is imported only when asked for, so the
HF scorers stay usable (and importable) wherever that module is absent.
"""

from .base import ProcessRewardModel, ScoreItem
from .hf_prm import (
    HFProcessRewardModel,
    TokenClassificationPRM,
    ValueHeadPRM,
    detect_prm_kind,
    load_prm,
)

__all__ = [
    "ExactCheckerPRM",
    "HFProcessRewardModel",
    "ProcessRewardModel",
    "ScoreItem",
    "TokenClassificationPRM",
    "ValueHeadPRM",
    "detect_prm_kind",
    "load_prm",
]


def __getattr__(name: str):
    if name == "ExactCheckerPRM":
        from .exact import ExactCheckerPRM

        return ExactCheckerPRM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
