"""The PRM a spec names: None (no standalone PRM: the engine scores with the target's own
likelihood), a ProcessRewardModel object, "exact" (the testbed checker), or an HF PRM folder."""
from __future__ import annotations

from .base import ProcessRewardModel


def build_prm(spec, device="cpu") -> ProcessRewardModel | None:
    if spec is None or isinstance(spec, ProcessRewardModel):
        return spec
    if spec == "exact":
        from .exact import ExactCheckerPRM

        return ExactCheckerPRM()
    from .hf_prm import load_prm

    return load_prm(spec, device=device)
