"""The result tables in README.md and RESULTS.md equal what the renderer makes of their JSON."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from arbitrage_fast.eval.report import BLOCK, main, protocol_rows, render, rewrite_blocks
from arbitrage_fast.eval.sweep import points_with_comparisons

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("doc", ["README.md", "benchmarks/RESULTS.md"])
def test_every_table_in_the_docs_is_rendered_from_its_json(doc):
    text = (ROOT / doc).read_text()
    blocks = list(BLOCK.finditer(text))
    assert blocks, f"{doc} has no rendered result table"
    assert rewrite_blocks(text, ROOT) == text, (
        f"a table in {doc} differs from its JSON; run: python -m arbitrage_fast.eval.report README.md "
        "benchmarks/RESULTS.md")


def test_the_readme_headline_numbers_are_the_jsons():
    block = next(BLOCK.finditer((ROOT / "README.md").read_text()))
    result = json.loads((ROOT / block["path"]).read_text())
    for point in result["points"]:
        assert f"{point['accuracy']:.3f} [{point['accuracy_ci'][0]:.3f}, {point['accuracy_ci'][1]:.3f}]" in block["body"]
        vs = point.get("vs_target_only")
        if vs is not None:
            assert f"{vs['speedup']:.2f}x [{vs['speedup_ci'][0]:.2f}, {vs['speedup_ci'][1]:.2f}]" in block["body"]


def _records(policy, threshold, correct, latency):
    return [{"item": f"p{i}", "policy": policy, "threshold": threshold, "correct": c, "latency_s": latency,
             "cpu_s": latency, "draft_tokens": 1, "target_tokens": 1, "escalations": 0, "steps": 1, "wall_s": latency,
             "sitting": "s1"} for i, c in enumerate(correct)]


def _result():
    runs = [_records("target_only", None, [True] * 40, 2.0), _records("rsd", 0.5, [True] * 40, 1.0),
            _records("rsd", 0.9, [i >= 20 for i in range(40)], 0.5)]
    runs[2][0]["sitting"] = "s2"
    points = points_with_comparisons(runs)
    choices = [{"policy": "rsd", "target": "accuracy -0 pt", "threshold": 0.5, "dev": {}},
               {"policy": "rsd", "target": "accuracy -1 pt", "threshold": None, "dev": None},
               {"policy": "rsd", "target": "escalation 10%", "threshold": 0.9, "dev": {}}]
    return {"preset": "toy", "dataset": "toy", "split": "test", "n": 40, "points": points,
            "calibration": {"split": "dev", "n": 10, "target_only": {"accuracy": 1.0}},
            "protocol": protocol_rows(choices, points)}


def test_protocol_table_marks_unmatched_rows_mixed_sittings_and_unreached_targets():
    table = render(_result())
    rows = {line.split(" | ")[1]: line for line in table.splitlines() if line.startswith("| rsd")}
    assert "thresholds chosen on the dev split (n = 10" in table
    assert "| yes |" in rows["accuracy -0 pt"] and "2.00x [2.00, 2.00]" in rows["accuracy -0 pt"]
    assert "| **no** |" in rows["escalation 10%"] and "-50.0 pt" in rows["escalation 10%"]
    assert "**mixed**" in rows["escalation 10%"] and "| one |" in rows["accuracy -0 pt"]
    assert "no dev grid point reached the target" in rows["accuracy -1 pt"]


def test_a_protocol_row_without_its_test_point_is_an_error():
    with pytest.raises(ValueError, match="no point for rsd@0.7"):
        protocol_rows([{"policy": "rsd", "target": "t", "threshold": 0.7, "dev": {}}], _result()["points"])


def test_the_script_rewrites_stale_blocks_and_check_reports_them(tmp_path, capsys):
    (tmp_path / "r.json").write_text(json.dumps({k: v for k, v in _result().items()
                                                  if k not in ("protocol", "calibration")}))
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- table: r.json -->\nold numbers\n<!-- /table -->\nend\n")
    assert main([str(doc), "--root", str(tmp_path), "--check"]) == 1
    assert "old numbers" in doc.read_text() and "stale" in capsys.readouterr().out
    assert main([str(doc), "--root", str(tmp_path)]) == 0
    assert "old numbers" not in doc.read_text() and "full threshold grid" in doc.read_text()
    assert main([str(doc), "--root", str(tmp_path), "--check"]) == 0


def test_head_to_head_pairs_each_rival_at_the_same_dev_target_and_marks_oracles():
    from arbitrage_fast.eval.report import head_to_head, render_head_to_head

    runs = {("target_only", None): _records("target_only", None, [True] * 40, 2.0),
            ("arbitrage", 0.5): _records("arbitrage", 0.5, [True] * 40, 0.5),
            ("arbitrage", 0.3): _records("arbitrage", 0.3, [True] * 40, 0.8),
            ("rsd", 0.7): _records("rsd", 0.7, [True] * 40, 1.5),
            ("rsd:exact", 0.2): _records("rsd:exact", 0.2, [i > 0 for i in range(40)], 0.25),
            ("spec_thinking", None): _records("spec_thinking", None, [True] * 40, 1.0)}
    choices = [{"policy": "arbitrage", "target": "accuracy -0 pt", "threshold": 0.5, "dev": {}},
               {"policy": "arbitrage", "target": "accuracy -1 pt", "threshold": 0.3, "dev": {}},
               {"policy": "rsd", "target": "accuracy -0 pt", "threshold": 0.7, "dev": {}},
               {"policy": "rsd", "target": "accuracy -1 pt", "threshold": None, "dev": {}},  # dev reached nothing
               {"policy": "rsd:exact", "target": "accuracy -0 pt", "threshold": 0.2, "dev": {}},
               {"policy": "rsd", "target": "escalation 10%", "threshold": 0.7, "dev": {}},
               {"policy": "rsd", "target": "escalation 20%", "threshold": 0.7, "dev": {}}]  # no arbitrage point there
    choices.insert(3, {"policy": "arbitrage", "target": "escalation 10%", "threshold": 0.3, "dev": {}})
    rows = head_to_head(choices, runs)
    assert [(r["target"], r["versus"]) for r in rows] == [("accuracy -0 pt", "rsd"), ("accuracy -0 pt", "rsd:exact"),
                                                          ("escalation 10%", "rsd")]
    assert rows[2]["speedup"] == pytest.approx(1.5 / 0.8) and rows[2]["threshold"] == 0.3
    assert rows[0]["speedup"] == pytest.approx(3.0) and rows[0]["threshold"] == 0.5
    assert rows[1]["speedup"] == pytest.approx(0.5) and rows[1]["accuracy_diff"] == pytest.approx(1 / 40)
    points = points_with_comparisons(list(runs.values()))
    result = {"split": "test", "n": 40, "head_to_head": rows}
    table = render_head_to_head(result)
    assert "| arbitrage@0.5 | rsd@0.7 |" in table and "rsd:exact (oracle)@0.2" in table
    assert "3.00x [3.00, 3.00]" in table
    # A threshold-free policy keeps its row in the protocol table, measured on test.
    assert "paired by problem" in table and "paired by block" in render_head_to_head({**result, "block": 8})
    protocol = protocol_rows(choices[:3], points, untuned=["spec_thinking"])
    assert protocol[0]["policy"] == "spec_thinking" and protocol[0]["test"]["latency_s"] == 1.0


def test_head_to_head_without_arbitrage_leads_with_the_first_policy_dev_chose_for():
    """A calibration of the peer methods alone still compares them: the first policy with a chosen
    threshold leads, and a calibration that chose nothing has no rows."""
    from arbitrage_fast.eval.report import head_to_head

    runs = {("specreason", 10.0): _records("specreason", 10.0, [True] * 40, 2.0),
            ("specreason", 5.5): _records("specreason", 5.5, [i % 2 == 0 for i in range(40)], 1.0),
            ("lookahead", 0.9): _records("lookahead", 0.9, [True] * 40, 4.0)}
    choices = [{"policy": "specreason", "target": "accuracy -0 pt", "threshold": None, "dev": {}},
               {"policy": "specreason", "target": "escalation 10%", "threshold": 5.5, "dev": {}},
               {"policy": "specreason", "target": "accuracy -1 pt", "threshold": 10.0, "dev": {}},
               {"policy": "lookahead", "target": "accuracy -0 pt", "threshold": 0.9, "dev": {}},
               {"policy": "lookahead", "target": "accuracy -1 pt", "threshold": 0.9, "dev": {}},
               {"policy": "lookahead", "target": "escalation 10%", "threshold": 0.9, "dev": {}}]
    rows = head_to_head(choices, runs)
    assert [(r["target"], r["policy"], r["versus"]) for r in rows] == [
        ("escalation 10%", "specreason", "lookahead"), ("accuracy -1 pt", "specreason", "lookahead")]
    assert rows[0]["speedup"] == pytest.approx(4.0) and rows[0]["accuracy_diff"] == pytest.approx(-0.5)
    assert rows[1]["speedup"] == pytest.approx(2.0) and rows[1]["threshold"] == 10.0
    assert head_to_head([{**c, "threshold": None} for c in choices], runs) == []


def test_router_evaluation_table_sets_the_router_beside_rsds_rule():
    """An `eval-router` JSON renders as its ranking figures and, per escalation rate, the share
    of advantage each rule's escalated steps hold; the PRM columns stay empty for an evaluation
    written before they were recorded."""
    result = {"datasets": ["toy"], "n_problems": 3, "n_steps": 10, "positive_rate": 0.6, "auroc": 0.7,
              "auroc_ci": [0.5, 0.9], "spearman": 0.4, "spearman_ci": None, "router": "r",
              "deferral_curve": [{"rate": 0.3, "threshold": 0.5, "router_gain": 0.5, "oracle_gain": 0.8,
                                  "random_gain": 0.3, "prm_threshold": 0.9, "prm_gain": 0.75,
                                  "router_gain_ci": [0.4, 0.6], "prm_gain_ci": [0.7, 0.8],
                                  "router_minus_prm_ci": [-0.35, -0.15]}]}
    table = render(result)
    assert "3 held-out problems, 10 steps (60 % with a positive advantage)" in table
    assert "AUROC 0.70 [0.50, 0.90], Spearman ρ 0.40;" in table
    assert "| 30 % | 0.50 [0.40, 0.60] | 0.75 [0.70, 0.80] | -0.25 [-0.35, -0.15] | 0.80 | 0.30 |" in table
    for key in ("prm_threshold", "prm_gain", "router_gain_ci", "prm_gain_ci", "router_minus_prm_ci"):
        del result["deferral_curve"][0][key]
    assert "| 30 % | 0.50 | — | — | 0.80 | 0.30 |" in render(result)
    assert "10 steps (60 % with advantage > 0.01, the AUROC's label); AUROC" in render({**result, "label_margin": 0.01})


def test_a_dev_calibration_renders_its_choices_and_its_grid():
    result = json.loads((ROOT / "benchmarks/results/testbed_calibration.json").read_text())
    result["choices"].append({"policy": "rsd", "target": "accuracy -9 pt", "threshold": None, "dev": None})
    text = render(result)
    assert text.startswith("testbed on testbed: the dev calibration (n = 80, target_only 1.000 [")
    for c in result["choices"][:-1]:
        assert (f"| {c['policy']} | {c['target']} | {c['threshold']:g} | {c['dev']['accuracy']:.3f} ["
                f"{c['dev']['accuracy_ci'][0]:.3f}, {c['dev']['accuracy_ci'][1]:.3f}] | "
                f"{c['dev']['escalation_rate']:.2f} |") in text
    assert "| rsd | accuracy -9 pt | none reaches it |" in text
    assert sum(line.startswith("| arbitrage@") for line in text.splitlines()) == len(result["grid"]["arbitrage"])


def test_refresh_rebuilds_points_and_head_to_head_from_the_records_and_refuses_other_figures(tmp_path):
    from arbitrage_fast.eval.report import head_to_head, refresh_points

    runs = {("target_only", None): _records("target_only", None, [True] * 12, 2.0),
            ("arbitrage", 0.5): _records("arbitrage", 0.5, [i % 3 > 0 for i in range(12)], 0.5),
            ("rsd", 0.9): _records("rsd", 0.9, [i % 4 > 0 for i in range(12)], 1.5)}
    records = tmp_path / "records.jsonl"
    records.write_text("\n".join(json.dumps(r) for r in [{"run": {"split": "test"}}, *
                                                        (r for rs in zip(*runs.values()) for r in rs)]) + "\n")
    choices = [{"policy": "arbitrage", "target": "escalation 30%", "threshold": 0.5, "dev": {}},
               {"policy": "rsd", "target": "escalation 30%", "threshold": 0.9, "dev": {}}]
    (tmp_path / "cal.json").write_text(json.dumps({"settings": {}, "choices": choices, "split": "dev"}))
    points = points_with_comparisons(list(runs.values()))
    result = tmp_path / "result.json"
    result.write_text(json.dumps({"points": [{k: v for k, v in p.items() if not k.endswith("_ci")} for p in points],
                                  "calibration": {"file": "cal.json"}, "head_to_head": []}))
    refresh_points(result, records, root=tmp_path)
    refreshed = json.loads(result.read_text())
    assert refreshed["points"] == json.loads(json.dumps(points))  # the intervals an old result lacked are back
    assert refreshed["head_to_head"] == json.loads(json.dumps(head_to_head(choices, runs)))
    assert refreshed["head_to_head"][0]["speedup"] == pytest.approx(3.0)
    stale = json.loads(result.read_text())
    stale["points"][1]["accuracy"] += 0.01
    result.write_text(json.dumps(stale))
    with pytest.raises(ValueError, match="does not reproduce"):
        refresh_points(result, records, root=tmp_path)
