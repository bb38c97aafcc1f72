"""The console commands on the shipped testbed pair: JSON schemas, the saved router, the demo.

Small problem counts keep this to seconds; the full-size runs are benchmarks.
"""
from __future__ import annotations

import json

import pytest
import torch

from arbitrage_fast.cli import main
from arbitrage_fast.router.head import RouterHead
from arbitrage_fast.testbed import CHECKPOINTS, shipped_checkpoint

pytestmark = pytest.mark.skipif(not (CHECKPOINTS / "draft" / "config.json").is_file(),
                                reason="testbed checkpoints not built")

SMALL = ["--preset", "testbed", "--n", "4", "--max-new-tokens", "96"]


@pytest.fixture(scope="module")
def trained_router(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "router"
    report = out.parent / "train.json"
    assert main(["train-router", *SMALL, "--n", "6", "--head", "mlp", "--epochs", "30", "--width", "16", "--batch", "3",
                 "--out", str(out),
                 "--json", str(report)]) == 0
    return out, json.loads(report.read_text())


def test_train_router_saves_a_loadable_head(trained_router):
    out, report = trained_router
    head = RouterHead.load(out)
    assert head.config.width == 16
    assert report["n_steps"] > 6 and 0.0 <= report["positive_rate"] <= 1.0
    assert report["label_prm"] == str(shipped_checkpoint("prm"))  # the PRM RSD decides with
    assert report["target"] == str(shipped_checkpoint("target"))  # which target wrote the target steps


def test_train_router_label_cache_is_reused_by_a_rerun_and_by_eval(tmp_path, capsys, monkeypatch):
    from arbitrage_fast.commands import router as router_command

    cache, runs = tmp_path / "labels", []
    monkeypatch.setenv("HOME", str(tmp_path))  # a quoted "~/" reaches the command unexpanded
    for attempt, named in enumerate(["~/labels", str(cache)]):
        report = tmp_path / f"train{attempt}.json"
        assert main(["train-router", *SMALL, "--n", "3", "--epochs", "5", "--width", "8", "--out", str(tmp_path / "r"),
                     "--label-cache", named, "--json", str(report)]) == 0
        runs.append(json.loads(report.read_text()))
    assert [r["problems_labelled_this_run"] for r in runs] == [3, 0]
    assert runs[0]["n_steps"] == runs[1]["n_steps"] and runs[0]["label_seconds"] == runs[1]["label_seconds"] > 0
    shards = sorted(cache.glob("*.safetensors"))
    assert len(shards) == 3
    # an interim router from what the cache holds: of 6 problems asked, the 3 labelled, none
    # labelled now, and no model loaded for it
    def no_models(*args, **kwargs):
        raise AssertionError("models loaded although the label cache holds every problem")

    build_engine = router_command.build_engine
    monkeypatch.setattr(router_command, "build_engine", no_models)
    interim = tmp_path / "interim.json"
    assert main(["train-router", *SMALL, "--n", "6", "--epochs", "5", "--width", "8", "--out", str(tmp_path / "r2"),
                 "--label-cache", str(cache), "--cached-only", "--json", str(interim)]) == 0
    got = json.loads(interim.read_text())
    assert (got["n_problems"], got["problems_labelled_this_run"], got["n_steps"]) == (3, 0, runs[0]["n_steps"])
    # the default head is the linear one, its penalty one of the cross-validated grid's
    from arbitrage_fast.router.train import PENALTIES
    assert got["head"] == "linear" and got["penalty"] in PENALTIES
    assert RouterHead.load(tmp_path / "r2").config.width == 2
    # --label-margin trains on advantage > D: at the smallest positive advantage of the cached
    # steps, that step (and any tied with it) turns negative
    from arbitrage_fast.router.data import RouterDataset

    adv = torch.cat([RouterDataset.load(f).advantage for f in cache.glob("*.safetensors")])
    d = float(adv[adv > 0].min())
    margin = tmp_path / "margin.json"
    assert main(["train-router", *SMALL, "--n", "6", "--out", str(tmp_path / "r3"), "--label-cache", str(cache),
                 "--cached-only", "--label-margin", repr(d), "--json", str(margin)]) == 0
    got_margin = json.loads(margin.read_text())
    assert got_margin["label_margin"] == d and got["label_margin"] == 0.0

    def positives(r):
        return round(r["positive_rate"] * r["n_train_steps"]) + r["val_positives"]

    assert got_margin["n_steps"] == got["n_steps"] and 0 < positives(got_margin) < positives(got)
    assert len(list(cache.glob("*.safetensors"))) == 3
    monkeypatch.setattr(router_command, "build_engine", build_engine)
    assert main(["eval-router", *SMALL, "--n", "2", "--router", str(tmp_path / "r"), "--label-cache", str(cache)]) == 0
    assert len(list(cache.glob("*.safetensors"))) == 5  # held-out problems join the same cache
    assert main(["train-router", "--preset", "testbed", "--n", "3", "--max-new-tokens", "64", "--out", str(tmp_path / "r"),
                 "--label-cache", str(cache)]) == 2
    assert "differs in ['max_new_tokens']" in capsys.readouterr().err


def test_eval_router_json_schema(trained_router, tmp_path):
    out, _ = trained_router
    path = tmp_path / "eval.json"
    assert main(["eval-router", *SMALL, "--router", str(out), "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert isinstance(result["spearman"], float) and -1.0 <= result["spearman"] <= 1.0
    assert result["auroc"] is None or 0.0 <= result["auroc"] <= 1.0
    assert isinstance(result["n_steps"], int) and result["n_steps"] >= 4
    low, high = result["spearman_ci"]  # resampling the 4 problems
    assert low <= high and -1.0 <= low and high <= 1.0
    for point in result["deferral_curve"]:  # the router's rule beside RSD's at the same rate
        for key in ("router_gain_ci", "prm_gain_ci", "router_minus_prm_ci"):
            low, high = point[key]
            assert low <= high


def test_eval_router_label_margin_judges_the_auroc_against_that_margin(trained_router, tmp_path, monkeypatch, capsys):
    """`eval-router --label-margin D` scores the held-out steps against advantage > D (the label
    a margin-trained head learned); Spearman ρ and the escalation table read the advantage itself,
    so they do not move. Labels are given, so no model runs."""
    from arbitrage_fast.commands import router as router_command
    from arbitrage_fast.router.data import LabelRun, RouterDataset
    from arbitrage_fast.router.metrics import auroc

    out, _ = trained_router
    g = torch.Generator().manual_seed(0)
    n, dim = 60, RouterHead.load(out).config.in_features
    advantage = torch.linspace(-0.2, 0.4, n)[torch.randperm(n, generator=g)]
    data = RouterDataset(torch.randn(n, dim, generator=g), advantage, torch.rand(n, generator=g),
                         torch.rand(n, generator=g), torch.arange(n) // 6)
    monkeypatch.setattr(router_command, "_labels", lambda *a: LabelRun(data, [1.0] * 10, 0))
    results = []
    for margin in ("0", "0.1"):
        path = tmp_path / f"eval{margin}.json"
        assert main(["eval-router", *SMALL, "--router", str(out), "--json", str(path), "--label-margin", margin]) == 0
        results.append(json.loads(path.read_text()))
    with torch.no_grad():
        scores = RouterHead.load(out)(data.features).numpy()
    for result, margin in zip(results, (0.0, 0.1)):
        labels = (advantage > margin).numpy()
        assert result["label_margin"] == margin and result["positive_rate"] == pytest.approx(labels.mean())
        assert result["auroc"] == pytest.approx(auroc(labels, scores))
    assert results[0]["auroc"] != results[1]["auroc"]
    unmoved = [(r["spearman"], r["deferral_curve"]) for r in results]
    assert unmoved[0] == unmoved[1]
    assert main(["eval-router", *SMALL, "--router", str(out), "--label-margin", "-0.1"]) == 2
    assert "label margin must be >= 0, got -0.1" in capsys.readouterr().err


def test_sweep_json_schema_and_plot(trained_router, tmp_path):
    out, _ = trained_router
    path, plot = tmp_path / "sweep.json", tmp_path / "pareto.png"
    assert main(["sweep", *SMALL, "--router", str(out), "--policies", "target_only,rsd,arbitrage",
                 "--thresholds", "rsd=0.5;arbitrage=0.2,0.8", "--json", str(path), "--plot", str(plot)]) == 0
    result = json.loads(path.read_text())
    points = result["points"]
    assert [(p["policy"], p["threshold"]) for p in points] == [
        ("target_only", None), ("rsd", 0.5), ("arbitrage", 0.2), ("arbitrage", 0.8)]
    keys = {"policy", "threshold", "accuracy", "latency_s", "escalation_rate", "draft_tokens", "target_tokens"}
    for p in points:
        assert keys <= set(p)
        assert 0.0 <= p["accuracy"] <= 1.0 and p["latency_s"] > 0 and 0.0 <= p["escalation_rate"] <= 1.0
    assert points[0]["draft_tokens"] == 0 and points[0]["target_tokens"] > 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_report_only_summarises_the_records_without_running(tmp_path, capsys, monkeypatch):
    records, report = tmp_path / "runs.jsonl", tmp_path / "report.json"
    base = ["sweep", "--preset", "testbed", "--max-new-tokens", "96", "--policies", "target_only,rsd",
            "--thresholds", "rsd=0.5", "--records", str(records)]
    assert main([*base, "--n", "2", "--json", str(tmp_path / "two.json")]) == 0
    two = json.loads((tmp_path / "two.json").read_text())

    from arbitrage_fast.commands import sweep
    monkeypatch.setattr(sweep, "build_engine", lambda *a, **k: pytest.fail("a report must not load models"))
    assert main([*base, "--n", "3", "--report-only", "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["n"] == 2 and result["n_planned"] == 3 and result["points"] == two["points"]
    assert "report of the 2 of 3 problems" in capsys.readouterr().out
    assert main(["sweep", "--preset", "testbed", "--report-only"]) == 2
    assert "pass --records too" in capsys.readouterr().err


def test_demo_marks_steps_and_prints_the_table(trained_router, capsys):
    out, _ = trained_router
    assert main(["demo", "--n", "2", "--max-new-tokens", "96", "--quiet", "--router", str(out)]) == 0
    text = capsys.readouterr().out
    assert "[draft" in text or "[target" in text
    for policy in ("target_only", "rsd", "arbitrage"):
        assert f"\n{policy}" in text


def test_generate_json_and_bad_threshold(capsys):
    assert main(["generate", "--preset", "testbed", "--policy", "target_only", "--json", "--max-new-tokens", "64",
                 "Q: Start with 12. Add 30. What is the result?\nA: "]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] and all(s["source"] == "target" for s in out["steps"])
    assert out["stats"]["draft_tokens"] == 0
    assert main(["generate", "--preset", "testbed", "--policy", "rsd", "--threshold", "nan", "x"]) == 2
    assert "threshold" in capsys.readouterr().err
    # --stop: the same answer, ended before the first stop string
    stop = out["steps"][1]["text"][:4]
    assert main(["generate", "--preset", "testbed", "--policy", "target_only", "--json", "--max-new-tokens", "64",
                 "--stop", stop, "Q: Start with 12. Add 30. What is the result?\nA: "]) == 0
    cut = json.loads(capsys.readouterr().out)
    assert cut["finish_reason"] == "stop" and cut["stop_reason"] == stop
    assert cut["text"] == out["text"][:out["text"].find(stop)]


def test_serve_builds_the_preset_app_with_its_router_policy(monkeypatch, capsys):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from arbitrage_fast import serve
    from arbitrage_fast.commands.thresholds import PRESET_THRESHOLDS
    from fastapi.testclient import TestClient

    served = {}
    monkeypatch.setattr(serve, "run_server", lambda app, host, port: served.update(app=app, port=port) or 0)
    assert main(["serve", "--preset", "testbed", "--port", "8123", "--max-tokens", "64"]) == 0
    recommended = PRESET_THRESHOLDS["testbed"]
    assert served["port"] == 8123 and "http://127.0.0.1:8123/v1" in (out := capsys.readouterr().out)
    assert f"get arbitrage at threshold {recommended['arbitrage']:g}" in out
    prompt = "Q: Start with 12. Add 30. What is the result?\nA: "
    with TestClient(served["app"]) as client:
        body = client.post("/v1/completions", json={"model": "testbed", "prompt": prompt}).json()
        rsd = client.post("/v1/completions", json={"prompt": prompt, "policy": "rsd", "max_tokens": 8}).json()
    # the testbed ships a router head; its dev-calibrated thresholds are the server's defaults
    assert body["arbitrage"] == {"policy": "arbitrage", "threshold": recommended["arbitrage"]}
    assert rsd["arbitrage"] == {"policy": "rsd", "threshold": recommended["rsd"]}
    assert body["usage"]["completion_tokens"] <= 64
    steps = body["choices"][0]["arbitrage"]["steps"]
    assert all(s["router_score"] is not None for s in steps)
    assert body["choices"][0]["text"] == "".join(s["text"] for s in steps)


def test_generate_spec_k_speculates_escalations_without_changing_greedy_tokens(capsys):
    """rsd at 1.01 escalates every step; with --spec-k the draft proposes the target's tokens."""
    prompt = "Q: Start with 12. Add 30. Multiply by 4. Subtract 7. What is the result?\nA: "
    runs = {}
    for flag in ([], ["--spec-k", "3"]):
        assert main(["generate", "--preset", "testbed", "--policy", "rsd", "--threshold", "1.01", "--json",
                     "--max-new-tokens", "96", *flag, prompt]) == 0
        runs[bool(flag)] = json.loads(capsys.readouterr().out)
    plain, speculated = runs[False], runs[True]
    assert speculated["token_ids"] == plain["token_ids"]
    assert all(s["source"] == "target" for s in speculated["steps"])
    assert "spec_proposed" not in plain["stats"]
    assert speculated["stats"]["spec_proposed"] > 0
    assert 0 <= speculated["stats"]["spec_accepted"] <= speculated["stats"]["spec_proposed"]


def test_serve_given_models_starts_without_any_presets_router(monkeypatch, tmp_path):
    """`serve --draft D --target T` serves those models with no router (the testbed's head has
    another hidden size and used to stop the server); --max-batch reaches the engine."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from arbitrage_fast import serve
    from fastapi.testclient import TestClient

    from helpers.tiny_models import build_tiny_lm

    draft = build_tiny_lm(tmp_path / "d", "llama", hidden=32, layers=1, seed=1)
    target = build_tiny_lm(tmp_path / "t", "llama", hidden=48, layers=1, seed=2)
    served = {}
    monkeypatch.setattr(serve, "run_server", lambda app, host, port: served.update(app=app, host=host) or 0)
    assert main(["serve", "--draft", str(draft), "--target", str(target), "--max-batch", "3",
                 "--max-tokens", "8", "--no-exact-arithmetic"]) == 0
    app = served["app"]
    assert served["host"] == "127.0.0.1"
    assert app.state.worker.engine.router is None and app.state.worker.engine.config.max_batch == 3
    assert app.state.worker.engine.config.exact_arithmetic is False
    with TestClient(app) as client:
        body = client.post("/v1/completions", json={"model": "", "prompt": "hello there"}).json()
    assert body["arbitrage"]["policy"] == "rsd" and body["usage"]["completion_tokens"] <= 8


def test_serve_enable_prefix_caching_reuses_a_previous_turn(monkeypatch, tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from arbitrage_fast import serve
    from fastapi.testclient import TestClient

    from helpers.tiny_models import build_tiny_lm

    draft = build_tiny_lm(tmp_path / "d", "llama", hidden=32, layers=1, seed=1)
    target = build_tiny_lm(tmp_path / "t", "llama", hidden=48, layers=1, seed=2)
    served = {}
    monkeypatch.setattr(serve, "run_server", lambda app, host, port: served.update(app=app) or 0)
    assert main(["serve", "--draft", str(draft), "--target", str(target), "--max-tokens", "8",
                 "--enable-prefix-caching"]) == 0
    prompt = "the same long system prompt, word after word after word, " * 4
    with TestClient(served["app"]) as client:
        first, again = (client.post("/v1/completions", json={"prompt": prompt, "policy": "rsd"}).json()
                        for _ in range(2))
        metrics = client.get("/metrics").text
    assert "arbitrage_prefix_cache_entries 1.0" in metrics
    cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert f"arbitrage_cached_prompt_tokens_total {float(cached)}" in metrics
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16  # at least a page of 16 tokens
    assert again["choices"][0]["text"] == first["choices"][0]["text"]
    assert main(["serve", "--draft-url", "http://d:1", "--target-url", "http://t:2", "--enable-prefix-caching"]) == 2


def test_train_router_labels_several_datasets_each_in_its_own_cache(tmp_path, capsys):
    args = ["train-router", "--preset", "testbed", "--dataset", "testbed,gsm8k", "--n", "2", "--max-new-tokens", "32",
            "--epochs", "3", "--width", "8", "--out", str(tmp_path / "r")]
    assert main([*args, "--label-cache", str(tmp_path / "one")]) == 2
    assert "'{dataset}'" in capsys.readouterr().err
    report = tmp_path / "train.json"
    assert main([*args, "--label-cache", str(tmp_path / "labels-{dataset}"), "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["datasets"] == ["testbed", "gsm8k"] and result["n_problems"] == 4
    for name in ("testbed", "gsm8k"):
        manifest = json.loads((tmp_path / f"labels-{name}" / "labels.json").read_text())
        assert manifest["run"]["dataset"] == name
        assert len(list((tmp_path / f"labels-{name}").glob(f"{name}-*.safetensors"))) == 2
    from arbitrage_fast.router.data import RouterDataset

    problems = RouterDataset.load(tmp_path / "r" / "labels.safetensors").problem
    # the second dataset's problems are numbered on, so grouped splits never join two problems
    assert problems.unique().tolist() == [0, 1, 2, 3] and bool((problems[1:] >= problems[:-1]).all())
