"""The PRM a spec names: None (no standalone PRM: the engine scores with the target's own
likelihood), a ProcessRewardModel object, "exact" (the testbed checker), or an HF PRM folder.

A policy may name its own PRM (`rsd:likelihood`, `rsd:exact`), so one engine compares RSD
under several scorers on the same models and clock; `PolicyPRMs` hands each policy its own."""
from __future__ import annotations

from .base import ProcessRewardModel

# The PRMs a policy name may ask for after ":": the target's likelihood (no standalone PRM),
# and the testbed's exact checker (an oracle: the upper bound a perfect PRM would reach).
PRM_VARIANTS = ("likelihood", "exact")


def build_prm(spec, device="cpu") -> ProcessRewardModel | None:
    if spec is None or isinstance(spec, ProcessRewardModel):
        return spec
    if spec == "exact":
        from .exact import ExactCheckerPRM

        return ExactCheckerPRM()
    from .hf_prm import load_prm

    return load_prm(spec, device=device)


class PolicyPRMs:
    """The engine's PRM, and the variants policies ask for by name, each built once."""

    def __init__(self, default: ProcessRewardModel | None, device="cpu") -> None:
        self.default = default
        self.device = device
        self._variants: dict[str, ProcessRewardModel | None] = {"likelihood": None}

    def for_policy(self, variant: str | None) -> ProcessRewardModel | None:
        """None means the target's likelihood scores the step."""
        if variant is None:
            return self.default
        if variant not in PRM_VARIANTS:
            raise ValueError(f"unknown PRM variant {variant!r}; expected one of {', '.join(PRM_VARIANTS)}")
        if variant not in self._variants:
            self._variants[variant] = build_prm(variant, self.device)
        return self._variants[variant]
