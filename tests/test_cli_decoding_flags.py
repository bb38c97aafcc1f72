"""`--decode-chunk` and `--spec-k` on generate, demo, sweep and serve: parsed, validated, and
handed to the engine (the chunk chosen by device when absent: adaptive chunks on CUDA,
per-token decoding elsewhere; speculation off when absent)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

import arbitrage_fast
from arbitrage_fast import cli
from arbitrage_fast.commands import common, demo, serve, sweep

PRESET = SimpleNamespace(name="custom", draft="d", target="t", prm=None, label_prm=None, router=None, routers={},
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
        seen["spec_k"] = args.spec_k
        return 0

    monkeypatch.setattr(cli, "_preset", lambda args: PRESET)
    monkeypatch.setattr(arbitrage_fast, "Engine", FakeEngine)
    monkeypatch.setattr(demo, "run", record)
    monkeypatch.setattr(sweep, "run", record)
    monkeypatch.setattr(serve, "run", record)
    return seen


@pytest.mark.parametrize("command", [["demo"], ["sweep"], ["serve"]])
def test_demo_sweep_and_serve_take_the_flags(captured, command):
    assert cli.main(command + ["--decode-chunk", "8", "--spec-k", "3"]) == 0
    assert (captured["decode_chunk"], captured["spec_k"]) == (8, 3)
    assert cli.main(command) == 0
    assert captured["decode_chunk"] is None  # chosen by device when the engine is built
    assert captured["spec_k"] == 0


@pytest.mark.parametrize("flag, expected", [(["--spec-k", "4"], 4), ([], 0)])
def test_generate_passes_spec_k_to_the_engine(captured, capsys, flag, expected):
    assert cli.main(["generate", "--draft", "d", "--target", "t", "a prompt", *flag]) == 0
    assert captured["config"].spec_k == expected


@pytest.mark.parametrize("flag, expected", [(["--decode-chunk", "0"], 0), (["--decode-chunk", "5"], 5), ([], 1)])
def test_generate_passes_the_chunk_to_the_engine(captured, capsys, flag, expected):
    assert cli.main(["generate", "--draft", "d", "--target", "t", "a prompt", *flag]) == 0
    assert captured["config"].decode_chunk == expected  # [] on the CPU: the per-token decoder


@pytest.mark.parametrize("flag", ["--decode-chunk", "--spec-k"])
@pytest.mark.parametrize("bad", ["-1", "two", "1.5"])
def test_bad_values_are_refused_by_the_parser(captured, capsys, flag, bad):
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "--draft", "d", "--target", "t", "p", flag, bad])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


def test_default_chunk_by_device(monkeypatch):
    assert common.default_decode_chunk("cpu") == 1
    assert common.default_decode_chunk("cuda") == 0
    assert common.default_decode_chunk("cuda:1") == 0
    built = []
    monkeypatch.setattr(arbitrage_fast, "Engine", lambda config: built.append(config))
    common.build_engine(PRESET, "cuda")
    common.build_engine(PRESET, "cuda", decode_chunk=4, spec_k=2)
    assert [(c.decode_chunk, c.spec_k) for c in built] == [(0, 0), (4, 2)]


@pytest.mark.parametrize("flag, expected", [(["--dequantize"], True), ([], False)])
def test_generate_passes_dequantize_to_the_engine(captured, capsys, flag, expected):
    assert cli.main(["generate", "--draft", "d", "--target", "t", "a prompt", *flag]) == 0
    assert captured["config"].dequantize is expected  # [] keeps a GGUF packed


@pytest.mark.parametrize("flag, expected", [(["--dense-rows", "6"], 6), ([], None)])
def test_generate_passes_dense_rows_to_the_engine(captured, capsys, flag, expected):
    assert cli.main(["generate", "--draft", "d", "--target", "t", "a prompt", *flag]) == 0
    assert captured["config"].dense_rows == expected


def test_dense_rows_must_be_positive_on_the_command_line(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--draft", "d", "--target", "t", "a prompt", "--dense-rows", "0"])
    assert "--dense-rows" in capsys.readouterr().err


def test_dequantize_must_be_a_bool():
    with pytest.raises(ValueError, match="dequantize must be True or False"):
        arbitrage_fast.EngineConfig(draft="d", target="t", dequantize="yes")


@pytest.mark.parametrize("flag, expected", [(["--batch-invariant"], True), ([], False)])
def test_generate_passes_batch_invariant_to_the_engine(captured, capsys, flag, expected):
    assert cli.main(["generate", "--draft", "d", "--target", "t", "a prompt", *flag]) == 0
    assert captured["config"].batch_invariant is expected


def test_batch_invariant_picks_the_per_token_decoder_on_cuda(monkeypatch):
    """The chunked decoder (CUDA's default) cannot serve the mode, so it is not chosen for it;
    asking for both at once is refused by the config."""
    built = []
    monkeypatch.setattr(arbitrage_fast, "Engine", lambda config: built.append(config))
    common.build_engine(PRESET, "cuda", batch_invariant=True)
    assert (built[0].decode_chunk, built[0].batch_invariant) == (1, True)
    with pytest.raises(ValueError, match="needs decode_chunk=1"):
        common.build_engine(PRESET, "cuda", decode_chunk=0, batch_invariant=True)


@pytest.mark.parametrize("command", [["demo"], ["sweep"], ["serve"]])
def test_demo_sweep_and_serve_take_batch_invariant(monkeypatch, command):
    seen = {}
    monkeypatch.setattr(cli, "_preset", lambda args: PRESET)
    for module in (demo, sweep, serve):
        monkeypatch.setattr(module, "run", lambda preset, args: seen.update(common.decoding_options(args)) or 0)
    assert cli.main(command + ["--batch-invariant"]) == 0
    assert seen["batch_invariant"] is True


@pytest.mark.parametrize("flag, expected", [(["--lookahead-k", "5"], 5), ([], 3)])
def test_generate_passes_lookahead_k_to_the_engine(captured, capsys, flag, expected):
    assert cli.main(["generate", "--draft", "d", "--target", "t", "a prompt", *flag]) == 0
    assert captured["config"].lookahead_k == expected  # [] keeps the engine's default


@pytest.mark.parametrize("bad", ["0", "-2"])
def test_a_lookahead_k_below_one_is_refused_by_the_parser(captured, capsys, bad):
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "--draft", "d", "--target", "t", "p", "--lookahead-k", bad])
    assert exc.value.code == 2
    assert "--lookahead-k" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["demo"], ["sweep"], ["serve"]])
def test_demo_sweep_and_serve_take_lookahead_k(monkeypatch, command):
    seen = {}
    monkeypatch.setattr(cli, "_preset", lambda args: PRESET)
    for module in (demo, sweep, serve):
        monkeypatch.setattr(module, "run", lambda preset, args: seen.update(common.decoding_options(args)) or 0)
    assert cli.main(command + ["--lookahead-k", "2"]) == 0
    assert seen["lookahead_k"] == 2


def test_stored_results_are_keyed_by_the_arithmetic_the_load_flags_choose():
    """Label caches and sweep records key on `quant_info`: dequantised GGUF weights, a quantized
    copy and the compiled kernels each change the answers, so each appears in the key; the
    defaults add nothing, so files written before a flag existed still match."""
    def info(**flags):
        base = {"dequantize": False, "draft_quant": None, "target_quant": None, "quant_group": 64,
                "exact_arithmetic": None}
        return common.quant_info(SimpleNamespace(**{**base, **flags}))

    assert info() == {}
    assert info(dequantize=True) == {"dequantize": True}
    assert info(draft_quant="int4", quant_group=32) == {"draft_quant": "int4", "quant_group": 32}
    assert info(target_quant="int8") == {"target_quant": "int8"}  # per channel: no group
    assert info(exact_arithmetic=False) == {"exact_arithmetic": False}
    assert info(dense_rows=6) == {"dense_rows": 6}
