"""Named draft/target/PRM/router bundles, so a command line needs one flag, not four."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class Preset:
    name: str
    draft: str
    target: str
    prm: str | None  # None = target likelihood
    router: str | None
    dataset: str
    chat: bool = False
    dtype: str = "float32"


def testbed_router_dir() -> Path:
    from arbitrage_fast.testbed import shipped_checkpoint

    return shipped_checkpoint("draft").parent / "router"


def resolve(name: str | None, *, draft=None, target=None, prm=None, router=None) -> Preset:
    """A preset with any explicitly given path overriding it; no preset needs draft and target."""
    if name is None:
        if not draft or not target:
            raise ValueError("give --preset or both --draft and --target")
        base = Preset("custom", draft, target, None, None, dataset="gsm8k")
    elif name == "testbed":
        from arbitrage_fast.testbed import shipped_checkpoint

        r = testbed_router_dir()
        base = Preset("testbed", str(shipped_checkpoint("draft")), str(shipped_checkpoint("target")), "exact",
                      str(r) if (r / "router_config.json").is_file() else None, dataset="testbed")
    else:
        raise ValueError(f"unknown preset {name!r}; expected one of: testbed")
    overrides = {k: v for k, v in dict(draft=draft, target=target, prm=prm, router=router).items() if v}
    return replace(base, **overrides)
