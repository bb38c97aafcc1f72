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
    assert main(["calibrate", *BASE, "--policies", "rsd,rsd:likelihood,arbitrage,spec_thinking", "--grid-points", "3",
                 "--out", str(out)]) == 0
    return out, json.loads(out.read_text())


def test_calibrate_sweeps_an_even_grid_on_dev_and_records_why(calibration):
    _, cal = calibration
    grid = [0.0, 0.5, 1.0]
    assert cal["split"] == "dev" and cal["n"] == 4
    assert cal["grid"] == {"rsd": grid, "rsd:likelihood": grid, "arbitrage": grid}
    assert cal["untuned"] == ["spec_thinking"]
    assert [(p["policy"], p["threshold"]) for p in cal["points"]] == [
        ("target_only", None), *((p, t) for p in ("rsd", "rsd:likelihood", "arbitrage") for t in grid),
        ("spec_thinking", None)]
    assert len(cal["choices"]) == 18 and {c["policy"] for c in cal["choices"]} == {"rsd", "rsd:likelihood", "arbitrage"}
    for choice in cal["choices"]:
        assert choice["threshold"] is None or choice["threshold"] in grid
        if choice["threshold"] is not None:
            dev = next(p for p in cal["points"] if (p["policy"], p["threshold"]) == (choice["policy"], choice["threshold"]))
            assert choice["dev"]["accuracy"] == dev["accuracy"]
    # rsd at 1.0 escalates every step the PRM scores below 1, so it matches target_only on dev.
    zero = next(c for c in cal["choices"] if c["target"] == "accuracy -0 pt" and c["policy"] == "rsd")
    assert zero["threshold"] is not None and zero["dev"]["accuracy"] >= cal["target_only"]["accuracy"]


def test_sweep_runs_exactly_the_calibrated_thresholds_on_test(calibration, tmp_path, capsys):
    path, cal = calibration
    report, records = tmp_path / "test.json", tmp_path / "test.jsonl"
    assert main(["sweep", *BASE, "--thresholds-from", str(path), "--json", str(report),
                 "--records", str(records)]) == 0
    result = json.loads(report.read_text())
    chosen = {p: sorted({c["threshold"] for c in cal["choices"] if c["policy"] == p and c["threshold"] is not None})
              for p in ("rsd", "rsd:likelihood", "arbitrage")}
    assert result["split"] == "test" and result["settings"]["split"] == "test"
    assert [(p["policy"], p["threshold"]) for p in result["points"]] == [
        ("target_only", None), ("spec_thinking", None), *((p, t) for p, ts in chosen.items() for t in ts)]
    assert len(result["protocol"]) == len(cal["choices"]) + 1  # and spec_thinking's row, untuned
    assert all(r["test"]["threshold"] == r["threshold"] for r in result["protocol"] if r["test"] is not None)
    out = capsys.readouterr().out
    assert render_protocol_table(result) in out

    # Head to head: arbitrage against each rival at the threshold dev chose for the same target,
    # its speed-up the rival's summed latency over arbitrage's, from the same test records.
    records_by = {}
    for line in records.read_text().splitlines()[1:]:
        r = json.loads(line)
        records_by.setdefault((r["policy"], r["threshold"]), []).append(r)
    # (every dev target where arbitrage has a threshold: accuracy floors and escalation rates)
    targets = {c["target"] for c in cal["choices"] if c["policy"] == "arbitrage" and c["threshold"] is not None}
    rows = result["head_to_head"]
    assert {(r["target"], r["versus"]) for r in rows} == {(c["target"], c["policy"]) for c in cal["choices"]
                                                          if c["target"] in targets and c["threshold"] is not None
                                                          and c["policy"] in ("rsd", "rsd:likelihood")}
    for r in rows:
        ours, theirs = records_by[("arbitrage", r["threshold"])], records_by[(r["versus"], r["versus_threshold"])]
        expected = sum(x["latency_s"] for x in theirs) / sum(x["latency_s"] for x in ours)
        assert r["speedup"] == pytest.approx(expected)
        assert r["speedup_ci"][0] <= r["speedup"] <= r["speedup_ci"][1]
        choice = next(c for c in cal["choices"] if (c["policy"], c["target"]) == (r["versus"], r["target"]))
        assert choice["threshold"] == r["versus_threshold"]
    if rows:
        assert "Head to head" in out

    header = json.loads(records.read_text().splitlines()[0])["run"]
    assert header["split"] == "test" and header["plan"][0] == ["target_only", None] and "code" in header
    assert header["max_new_tokens"] == 96 and header["draft"] and header["inference_prm"]


def test_a_quantile_grid_is_placed_on_train_problems_and_said_so(tmp_path, capsys):
    from arbitrage_fast.eval.report import render_calibration

    out, records = tmp_path / "quantile.json", tmp_path / "dev.jsonl"
    args = ["calibrate", "--preset", "testbed", "--n", "3", "--max-new-tokens", "64", "--policies", "rsd,arbitrage",
            "--grid", "quantile", "--grid-points", "4", "--grid-pilot", "3", "--batch", "3", "--records", str(records),
            "--out", str(out)]
    assert main(args) == 0
    cal = json.loads(out.read_text())
    # a resumed calibration reads its grids back rather than piloting again
    kept = tmp_path / "dev.jsonl.grid.json"
    assert json.loads(kept.read_text())["grids"] == cal["grid"]
    assert main(args) == 0 and json.loads(out.read_text()) == cal
    assert main([*args[:-4], "--grid-points", "5", "--records", str(records), "--out", str(out)]) == 2
    assert "holds quantile grids made for" in capsys.readouterr().err
    assert cal["grid_kind"] == "quantile"
    assert cal["grid_pilot"]["split"] == "train" and cal["grid_pilot"]["n"] == 3
    assert all(cal["grid_pilot"]["steps"][p] > 0 for p in ("rsd", "arbitrage"))
    for policy, grid in cal["grid"].items():
        assert grid == sorted(grid) and 2 <= len(grid) <= 4 and (grid[0], grid[-1]) == (0.0, 1.0)
        assert {p["threshold"] for p in cal["points"] if p["policy"] == policy} == set(grid)
    assert len(cal["grid"]["arbitrage"]) == 4  # router scores are continuous: no ties merge its quantiles
    assert "quantiles of its scores of draft steps on 3 train problems" in render_calibration(cal)


def test_a_calibration_is_refused_on_its_own_split_with_other_settings_or_beside_thresholds(calibration, capsys):
    path, _ = calibration
    assert main(["sweep", *BASE, "--thresholds-from", str(path), "--split", "dev"]) == 2
    assert "made on the 'dev' split" in capsys.readouterr().err
    assert main(["sweep", "--preset", "testbed", "--n", "4", "--max-new-tokens", "64",
                 "--thresholds-from", str(path)]) == 2
    assert "max_new_tokens: calibration has 96, this sweep has 64" in capsys.readouterr().err
    assert main(["sweep", *BASE, "--thresholds-from", str(path), "--thresholds", "rsd=0.5"]) == 2
    assert "pass one" in capsys.readouterr().err


def test_a_router_head_retrained_in_place_after_calibration_is_refused(tmp_path, capsys):
    import shutil

    from arbitrage_fast.presets import resolve

    preset = resolve("testbed")
    head = tmp_path / "head"
    shutil.copytree(preset.router, head)
    cal = tmp_path / "cal.json"
    small = ["--preset", "testbed", "--n", "2", "--max-new-tokens", "48", "--router", str(head)]
    assert main(["calibrate", *small, "--policies", "arbitrage", "--grid-points", "2", "--out", str(cal)]) == 0
    assert set(json.loads(cal.read_text())["settings"]["router_heads"]) == {"arbitrage", "arbitrage:exact"}
    # the same weights in another folder (another checkout): the digest names the head, not the path
    moved = tmp_path / "moved"
    shutil.copytree(head, moved)
    elsewhere = [*small[:-1], str(moved)]
    assert main(["sweep", *elsewhere, "--thresholds-from", str(cal), "--json", str(tmp_path / "t.json")]) == 0
    # the same folder, other weights: the path alone would not tell
    shutil.copy(preset.routers["exact"] + "/router.safetensors", head / "router.safetensors")
    assert main(["sweep", *small, "--thresholds-from", str(cal), "--json", str(tmp_path / "t.json")]) == 2
    assert "router_heads" in capsys.readouterr().err


def test_a_named_router_replaces_the_presets_head_of_that_name(tmp_path, capsys):
    """`--named-router exact=DIR` (a head relabelled for a swapped target) is what the
    `arbitrage:exact` rows read: the records name its digest, not the shipped exact head's, and
    a sweep naming the shipped head again is refused against that calibration."""
    import shutil

    from arbitrage_fast.presets import resolve
    from arbitrage_fast.router.head import RouterHead

    preset = resolve("testbed")
    relabelled = tmp_path / "relabelled"
    shutil.copytree(preset.router, relabelled)  # any head the draft fits; its weights differ from the exact head's
    assert resolve("testbed", routers={"exact": str(relabelled)}).routers == {"exact": str(relabelled)}
    cal = tmp_path / "cal.json"
    small = ["--preset", "testbed", "--n", "2", "--max-new-tokens", "48"]
    assert main(["calibrate", *small, "--policies", "arbitrage:exact", "--grid-points", "2",
                 "--named-router", f"exact={relabelled}", "--out", str(cal)]) == 0
    heads = json.loads(cal.read_text())["settings"]["router_heads"]
    assert heads["arbitrage:exact"] == RouterHead.digest(relabelled) != RouterHead.digest(preset.routers["exact"])
    assert main(["sweep", *small, "--thresholds-from", str(cal), "--json", str(tmp_path / "t.json")]) == 2
    assert "router_heads" in capsys.readouterr().err
    for bad in ("exact", "=dir", "a:b=dir"):
        with pytest.raises(SystemExit):
            main(["calibrate", *small, "--named-router", bad, "--out", str(cal)])
        assert "NAME=DIR" in capsys.readouterr().err


def test_a_batched_calibration_chooses_what_one_at_a_time_chose(calibration, tmp_path):
    """`calibrate --batch 4` keeps four runs in flight in one engine: every dev point's accuracy,
    escalations and tokens equal the one-at-a-time calibration's (fp32 testbed: a row's answer
    does not depend on its batch), so the chosen thresholds are the same; its latencies are
    times in a shared batch, it records no per-run CPU time, and its records file says so."""
    _, alone = calibration
    out, records = tmp_path / "batched.json", tmp_path / "batched.jsonl"
    assert main(["calibrate", *BASE, "--policies", "rsd,rsd:likelihood,arbitrage,spec_thinking", "--grid-points", "3",
                 "--out", str(out), "--records", str(records), "--batch", "4"]) == 0
    batched = json.loads(out.read_text())
    fields = ("policy", "threshold", "n", "accuracy", "escalation_rate", "draft_tokens", "target_tokens", "steps")
    assert [{k: p[k] for k in fields} for p in batched["points"]] == [{k: p[k] for k in fields} for p in alone["points"]]
    assert [(c["policy"], c["target"], c["threshold"]) for c in batched["choices"]] == [
        (c["policy"], c["target"], c["threshold"]) for c in alone["choices"]]
    assert all(p["cpu_s"] is None and p["latency_s"] > 0 for p in batched["points"])
    assert all(p["vs_target_only"]["cpu_speedup"] is None for p in batched["points"] if "vs_target_only" in p)
    header = json.loads(records.read_text().splitlines()[0])["run"]
    assert header["batch"] == 4 and batched["batch"] == 4 and alone["batch"] == 1
    # the same records file under one-at-a-time runs is another sweep: refused, naming the batch
    assert main(["calibrate", *BASE, "--policies", "rsd,rsd:likelihood,arbitrage,spec_thinking", "--grid-points", "3",
                 "--out", str(tmp_path / "again.json"), "--records", str(records)]) == 2
    assert main(["calibrate", *BASE, "--out", str(tmp_path / "bad.json"), "--batch", "0"]) == 2


def test_a_block_sweep_gives_each_problem_its_answer_alone_and_says_what_it_timed(tmp_path, capsys):
    """`sweep --block 2` on the fp32 testbed: every problem's answer equals the one-at-a-time
    sweep's under every policy (a row's tokens do not depend on its batch), the latencies are
    block shares with CPU times, and the report's caption says they measure throughput."""
    common = [*BASE, "--policies", "target_only,rsd,arbitrage", "--thresholds", "rsd=0.9;arbitrage=0.5"]
    alone_records, block_records = tmp_path / "alone.jsonl", tmp_path / "block.jsonl"
    assert main(["sweep", *common, "--records", str(alone_records)]) == 0
    capsys.readouterr()
    out = tmp_path / "block.json"
    assert main(["sweep", *common, "--records", str(block_records), "--block", "2", "--json", str(out)]) == 0
    assert "blocks of 2" in capsys.readouterr().out
    read = lambda path: {(r["item"], r["policy"], r["threshold"]): r  # noqa: E731
                         for r in map(json.loads, path.read_text().splitlines()[1:])}
    alone, block = read(alone_records), read(block_records)
    assert alone.keys() == block.keys() and len(block) == 4 * 3
    assert all(block[k]["text"] == alone[k]["text"] and block[k]["escalations"] == alone[k]["escalations"]
               for k in alone)
    assert all(len(r["block"]) == 2 and r["cpu_s"] == r["block_cpu_s"] / 2 for r in block.values())
    result = json.loads(out.read_text())
    assert result["block"] == 2 and result["settings"]["split"] == "test"
    assert all(p["vs_target_only"]["speedup_ci"] is not None for p in result["points"] if "vs_target_only" in p)
    assert main(["sweep", *common, "--block", "2", "--batch", "2"]) == 2


def test_a_head_that_does_not_fit_the_draft_stops_only_the_policies_that_read_it(tmp_path, capsys):
    """A sweep of policies that never consult the router runs beside a head trained for another
    draft (as when a preset's draft is swapped); arbitrage and every_step, which read it, are
    refused at load, naming both hidden sizes."""
    import shutil

    from arbitrage_fast.presets import resolve

    head = tmp_path / "other_draft_head"
    shutil.copytree(resolve("testbed").router, head)
    config = json.loads((head / "router_config.json").read_text())
    config["hidden_size"] += 1
    (head / "router_config.json").write_text(json.dumps(config))
    small = ["--preset", "testbed", "--n", "2", "--max-new-tokens", "48", "--router", str(head)]
    out = tmp_path / "s.json"
    assert main(["sweep", *small, "--policies", "target_only,draft_only,rsd,spec_thinking",
                 "--thresholds", "rsd=0.5", "--json", str(out)]) == 0
    assert {p["policy"] for p in json.loads(out.read_text())["points"]} == {"target_only", "draft_only", "rsd",
                                                                              "spec_thinking"}
    for policy in ("arbitrage", "every_step"):
        capsys.readouterr()
        assert main(["sweep", *small, "--policies", policy, "--json", str(out)]) == 2
        assert f"hidden size {config['hidden_size']}" in capsys.readouterr().err
