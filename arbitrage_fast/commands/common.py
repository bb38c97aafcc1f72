"""Shared pieces of the subcommands: building an engine from a preset, writing JSON."""
from __future__ import annotations

import json
from pathlib import Path


def build_engine(preset, device: str = "cpu", dtype: str | None = None, *, prm="inference", router: bool = True):
    """prm="inference" uses the preset's inference PRM, "label" its labelling PRM."""
    from arbitrage_fast import Engine, EngineConfig

    chosen = preset.prm if prm == "inference" else preset.label_prm
    return Engine(EngineConfig(draft=preset.draft, target=preset.target, device=device,
                               dtype=dtype or preset.dtype, prm=chosen, router=preset.router if router else None))


def write_json(obj, path: str | Path | None) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def build_prm(spec):
    """The PRM object for a spec (None = no standalone PRM: target likelihood lives in the engine)."""
    if spec is None:
        return None
    if spec == "exact":
        from arbitrage_fast.prm.exact import ExactCheckerPRM

        return ExactCheckerPRM()
    from arbitrage_fast.prm.hf_prm import load_prm

    return load_prm(spec)
