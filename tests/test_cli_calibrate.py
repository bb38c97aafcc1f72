"""`calibrate` on dev, then `sweep --thresholds-from` on test, on the shipped testbed pair."""
from __future__ import annotations

import json

import pytest

from arbitrage_fast.cli import main
from arbitrage_fast.eval.report import render_protocol_table
from arbitrage_fast.testbed import CHECKPOINTS

pytestmark = pytest.mark.skipif(not (CHECKPOINTS / "draft" / "config.json").is_file(),
                                reason="testbed checkpoints not built")

BASE = ["--preset", "testbed", "--n", "4", "--max-new-tokens", "96"]


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    out = tmp_path_factory.mktemp("calibrate") / "calibration.json"
    assert main(["calibrate", *BASE, "--policies", "rsd", "--grid-points", "3", "--out", str(out)]) == 0
    return out, json.loads(out.read_text())


def test_calibrate_sweeps_an_even_grid_on_dev_and_records_why(calibration):
    _, cal = calibration
    assert cal["split"] == "dev" and cal["n"] == 4 and cal["grid"] == {"rsd": [0.0, 0.5, 1.0]}
    assert [(p["policy"], p["threshold"]) for p in cal["points"]] == [
        ("target_only", None), ("rsd", 0.0), ("rsd", 0.5), ("rsd", 1.0)]
    assert len(cal["choices"]) == 6 and {c["policy"] for c in cal["choices"]} == {"rsd"}
    for choice in cal["choices"]:
        assert choice["threshold"] is None or choice["threshold"] in cal["grid"]["rsd"]
        if choice["threshold"] is not None:
            dev = next(p for p in cal["points"] if p["threshold"] == choice["threshold"])
            assert choice["dev"]["accuracy"] == dev["accuracy"]
    # rsd at 1.0 escalates every step the PRM scores below 1, so it matches target_only on dev.
    zero = next(c for c in cal["choices"] if c["target"] == "accuracy -0 pt")
    assert zero["threshold"] is not None and zero["dev"]["accuracy"] >= cal["target_only"]["accuracy"]


def test_sweep_runs_exactly_the_calibrated_thresholds_on_test(calibration, tmp_path, capsys):
    path, cal = calibration
    report, records = tmp_path / "test.json", tmp_path / "test.jsonl"
    assert main(["sweep", *BASE, "--thresholds-from", str(path), "--json", str(report),
                 "--records", str(records)]) == 0
    result = json.loads(report.read_text())
    chosen = sorted({c["threshold"] for c in cal["choices"] if c["threshold"] is not None})
    assert result["split"] == "test" and result["settings"]["split"] == "test"
    assert [(p["policy"], p["threshold"]) for p in result["points"]] == [
        ("target_only", None), *(("rsd", t) for t in chosen)]
    assert len(result["protocol"]) == len(cal["choices"])
    assert all(r["test"]["threshold"] == r["threshold"] for r in result["protocol"] if r["threshold"] is not None)
    assert render_protocol_table(result) in capsys.readouterr().out

    header = json.loads(records.read_text().splitlines()[0])["run"]
    assert header["split"] == "test" and header["plan"][0] == ["target_only", None] and "code" in header
    assert header["max_new_tokens"] == 96 and header["draft"] and header["inference_prm"]


def test_a_calibration_is_refused_on_its_own_split_with_other_settings_or_beside_thresholds(calibration, capsys):
    path, _ = calibration
    assert main(["sweep", *BASE, "--thresholds-from", str(path), "--split", "dev"]) == 2
    assert "made on the 'dev' split" in capsys.readouterr().err
    assert main(["sweep", "--preset", "testbed", "--n", "4", "--max-new-tokens", "64",
                 "--thresholds-from", str(path)]) == 2
    assert "max_new_tokens: calibration has 96, this sweep has 64" in capsys.readouterr().err
    assert main(["sweep", *BASE, "--thresholds-from", str(path), "--thresholds", "rsd=0.5"]) == 2
    assert "pass one" in capsys.readouterr().err
