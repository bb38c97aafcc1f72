"""`--decode-chunk` on generate, demo and sweep: parsed, validated, and chosen by device when
absent (adaptive chunks on CUDA, per-token decoding elsewhere)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

import arbitrage_fast
from arbitrage_fast import cli
from arbitrage_fast.commands import common, demo, sweep

PRESET = SimpleNamespace(name="custom", draft="d", target="t", prm=None, label_prm=None, router=None,
                         dtype="float32", chat=False)


@pytest.fixture
def captured(monkeypatch):
    """Runs the CLI up to the engine: records what each subcommand was asked for."""
    seen = {}

    class FakeEngine:
        def __init__(self, config):
            seen["config"] = config

        def generate(self, *args, **kwargs):
            return SimpleNamespace(steps=[], finish_reason="length", stats={}, text="")

    def record(preset, args):
        seen["decode_chunk"] = args.decode_chunk
        return 0

    monkeypatch.setattr(cli, "_preset", lambda args: PRESET)
    monkeypatch.setattr(arbitrage_fast, "Engine", FakeEngine)
    monkeypatch.setattr(demo, "run", record)
    monkeypatch.setattr(sweep, "run", record)
    return seen


@pytest.mark.parametrize("command", [["demo"], ["sweep"]])
def test_demo_and_sweep_take_the_flag(captured, command):
    assert cli.main(command + ["--decode-chunk", "8"]) == 0
    assert captured["decode_chunk"] == 8
    assert cli.main(command) == 0
    assert captured["decode_chunk"] is None  # chosen by device when the engine is built


@pytest.mark.parametrize("flag, expected", [(["--decode-chunk", "0"], 0), (["--decode-chunk", "5"], 5), ([], 1)])
def test_generate_passes_the_chunk_to_the_engine(captured, capsys, flag, expected):
    assert cli.main(["generate", "--draft", "d", "--target", "t", "a prompt", *flag]) == 0
    assert captured["config"].decode_chunk == expected  # [] on the CPU: the per-token decoder


@pytest.mark.parametrize("bad", ["-1", "two", "1.5"])
def test_bad_values_are_refused_by_the_parser(captured, capsys, bad):
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "--draft", "d", "--target", "t", "p", "--decode-chunk", bad])
    assert exc.value.code == 2
    assert "--decode-chunk" in capsys.readouterr().err


def test_default_chunk_by_device(monkeypatch):
    assert common.default_decode_chunk("cpu") == 1
    assert common.default_decode_chunk("cuda") == 0
    assert common.default_decode_chunk("cuda:1") == 0
    built = []
    monkeypatch.setattr(arbitrage_fast, "Engine", lambda config: built.append(config))
    common.build_engine(PRESET, "cuda")
    common.build_engine(PRESET, "cuda", decode_chunk=4)
    assert [c.decode_chunk for c in built] == [0, 4]
