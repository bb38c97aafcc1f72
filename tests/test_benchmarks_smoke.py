"""The GPU benchmarks run end to end on tiny shapes (--smoke, CPU), so CI executes every line
that the GPU visit (benchmarks/gpu_check.sh) depends on, and their JSON keeps its schema; the
memory benchmark's byte counting and table are checked on a made-up model and record."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"smoke_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run_smoke(tmp_path):
    """main(--smoke) of one benchmark, writing into tmp_path; the thread count it sets is restored."""
    threads = torch.get_num_threads()

    def run(name: str, *extra: str) -> None:
        assert _load(name).main(["--smoke", "--out-dir", str(tmp_path), "--repeats", "1", "--warmup", "0",
                                 *extra]) == 0

    yield run, tmp_path
    torch.set_num_threads(threads)


def test_bench_decode_smoke(run_smoke):
    run, out = run_smoke
    run("bench_decode", "--shapes", "smoke-llama-draft,smoke-qwen2", "--tokens", "4", "--context", "16")
    rows = json.loads((out / "decode_cpu.json").read_text())
    assert {r["shape"] for r in rows} == {"smoke-llama-draft", "smoke-qwen2"}
    assert all({"shape", "graphs", "tok_s"} <= set(r) and r["tok_s"] > 0 and "error" not in r for r in rows)
    assert not any("roofline_fraction" in r for r in rows)  # no peak bandwidth known for a CPU
    engine_rows = [r for r in rows if r["path"].startswith("engine")]
    assert len(engine_rows) == 2 and all(r["loop_vs_runner_same_first_token"] for r in engine_rows)


def test_bench_decode_saves_each_row_and_records_failures(tmp_path, monkeypatch):
    """A failing variant becomes a row with an error string and no speed or roofline fraction;
    the rows measured before it are already on disk when it runs."""
    bench = _load("bench_decode")
    seen_on_disk = []

    def failing_engine_loop(*args, **kwargs):
        seen_on_disk.append(json.loads((tmp_path / "decode_cpu.json").read_text()))
        raise RuntimeError("engine loop broke")

    monkeypatch.setattr(bench, "_engine_loop_row", failing_engine_loop)
    threads = torch.get_num_threads()
    try:
        rc = bench.main(["--smoke", "--out-dir", str(tmp_path), "--repeats", "1", "--warmup", "0",
                         "--shapes", "smoke-llama-draft", "--tokens", "2", "--context", "8"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 1
    assert [r["path"] for r in seen_on_disk[0]] == ["ModelRunner.forward"]
    eager, failed = json.loads((tmp_path / "decode_cpu.json").read_text())
    assert eager["tok_s"] > 0
    assert failed["error"] == "RuntimeError: engine loop broke" and failed["path"] == "engine DecodeLoop"
    assert not {"tok_s", "roofline_fraction"} & set(failed)


def test_bench_router_overhead_smoke(run_smoke):
    run, out = run_smoke
    run("bench_router_overhead", "--tokens", "2", "--context", "16")
    result = json.loads((out / "router_overhead_cpu.json").read_text())
    assert "overhead_pct" in result["eager"] and set(result["kernels"]["us_per_call"]) == {
        "final_norm", "fused_norm_router"}
    assert "graphs" not in result  # CUDA graphs are not attempted on the CPU


def test_bench_step_latency_smoke(run_smoke, capsys):
    run, out = run_smoke
    run("bench_step_latency", "--steps", "3", "--step-tokens", "4", "--prompt-tokens", "8", "--rates", "0.34")
    assert "escalation SIMULATED" in capsys.readouterr().out
    result = json.loads((out / "step_latency_cpu.json").read_text())
    assert result["decode_chunk"] == 0 and "simulated" in result["note"]
    rows = {(r["policy"], r["forced_escalation_rate"]): r for r in result["policies"]}
    rsd, every = rows[("rsd", 0.34)], rows[("every_step", 0.34)]
    assert rsd["stats"]["escalations"] == every["stats"]["escalations"] == 1  # round(0.34 * 3)
    assert rsd["same_decisions_as_every_step"]
    # Adaptive chunks: one read per decoded step here (steps end at the cap, within the first chunk).
    assert rows[("draft_only", None)]["host_syncs_per_step"] == 1


def test_gpu_check_and_profile_scripts_parse():
    for script in ("gpu_check.sh", "profile.sh"):
        subprocess.run(["bash", "-n", str(BENCHMARKS / script)], check=True)


def test_testbed_script_refuses_bad_settings_before_running_anything():
    """A swapped TARGET without a TAG would overwrite the package's heads with heads labelled
    by another target; a misspelt stage would silently run nothing. Both stop at once."""
    for env, message in (({"TARGET": "/elsewhere"}, "TARGET needs a TAG"),
                         ({"STAGES": "router,deV"}, "STAGES holds 'deV'")):
        done = subprocess.run(["bash", str(BENCHMARKS / "testbed.sh")], capture_output=True, text=True,
                              env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **env})
        assert done.returncode == 2 and message in done.stderr, done.stderr
    for script in ("testbed.sh", "testbed_deep.sh"):
        subprocess.run(["bash", "-n", str(BENCHMARKS / script)], check=True)


_FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for python: `-c` answers the checkpoint folder, `-m ... train-router` logs its start,
# waits (10 s at most) for the other labelling to start too, writes its head and labels, logs its
# end, and fails for the exact checker when EXACT_FAILS is set.
if [[ "$1" == -c ]]; then echo "$FAKE_CKPT"; exit 0; fi
args="$*"; kind=prm; [[ "$args" == *"--prm exact"* ]] && kind=exact
out=$(sed -E 's/.* --out ([^ ]+).*/\\1/' <<< "$args")
echo "start $kind" >> "$FAKE_LOG"
for _ in $(seq 100); do (( $(grep -c '^start' "$FAKE_LOG") >= 2 )) && break; sleep 0.1; done
(( $(grep -c '^start' "$FAKE_LOG") >= 2 )) || echo "alone $kind" >> "$FAKE_LOG"
if [[ $kind == exact && -n "${EXACT_FAILS:-}" ]]; then echo "end $kind failed" >> "$FAKE_LOG"; exit 3; fi
mkdir -p "$out" && touch "$out/labels.safetensors" "$out/router.safetensors"
echo "end $kind" >> "$FAKE_LOG"
"""


@pytest.mark.parametrize("exact_fails", [False, True])
def test_testbed_router_stage_runs_both_labellings_side_by_side(tmp_path, exact_fails):
    """The exact checker's labelling runs beside the PRM's; the stage waits for it, keeps both heads
    without their labels, and fails when it fails."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(_FAKE_PYTHON)
    (bin_dir / "python").chmod(0o755)
    log = tmp_path / "log"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), "FAKE_LOG": str(log),
           "FAKE_CKPT": str(tmp_path / "ckpt"), "TAG": "t", "TARGET": str(tmp_path / "target"),
           "STAGES": "router", **({"EXACT_FAILS": "1"} if exact_fails else {})}
    done = subprocess.run(["bash", str(BENCHMARKS / "testbed.sh")], capture_output=True, text=True, env=env)
    events = log.read_text().splitlines()
    # Both started before either ended: side by side, neither waiting alone for the other.
    assert sorted(events[:2]) == ["start exact", "start prm"], events
    assert not any(event.startswith("alone") for event in events), events
    routers = tmp_path / ".cache/arbitrage_fast/routers"
    if exact_fails:
        assert done.returncode == 3 and "end exact failed" in events
        return
    assert done.returncode == 0, done.stderr
    assert sorted(events[2:]) == ["end exact", "end prm"], events
    for head in ("testbed_t", "testbed_t_exact"):
        assert (routers / head / "router.safetensors").is_file()
        assert not (routers / head / "labels.safetensors").exists()


@pytest.mark.skipif(shutil.which("nsys") is not None, reason="nsys present: profile.sh would really profile")
def test_profile_script_without_nsys_says_so():
    out = subprocess.run(["bash", str(BENCHMARKS / "profile.sh"), "decode", "--smoke"], capture_output=True,
                         text=True, check=True).stdout
    assert "nsys" in out and "nothing profiled" in out


def test_gpu_check_runs_every_python_through_py():
    """The GPU image's interpreter with torch is python3, not python: every call goes via $PY."""
    script = (BENCHMARKS / "gpu_check.sh").read_text()
    code = [line for line in script.splitlines() if not line.lstrip().startswith("#")]
    assert 'PY="${PY:-python3}"' in code
    bare = [line for line in code if re.search(r'(^|[\s;(])python3?(\s|$)', line)]
    assert not bare, bare
    for flag in ("HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1", "PIP_NO_INDEX=1", "TORCH_CUDA_ARCH_LIST"):
        assert flag in script


def test_summary_reads_partial_and_failed_results(tmp_path):
    summarize = _load("summarize_results").summarize
    (tmp_path / "decode_x.json").write_text(json.dumps([
        {"shape": "a", "graphs": False, "path": "ModelRunner.forward", "tok_s": 10.0, "roofline_fraction": 0.5},
        {"shape": "a", "graphs": True, "path": "StaticDecode", "error": "RuntimeError: capture failed"},
        {"shape": "a", "graphs": True, "path": "StaticDecode + torch.compile (torch.cuda.CUDAGraph, benchmark-local)",
         "tok_s": 12.5}]))
    (tmp_path / "router_overhead_x.json").write_text(json.dumps({"error": "OutOfMemoryError: no"}))
    (tmp_path / "step_latency_x.json").write_text("{ cut short")
    lines = summarize(tmp_path)
    assert any("10.0 tok/s  roofline 50.0%" in line for line in lines)
    assert any("ERROR RuntimeError: capture failed" in line for line in lines)
    assert any("compiled" in line and "12.5 tok/s" in line for line in lines)
    assert any("router  ERROR OutOfMemoryError: no" in line for line in lines)
    assert any("step_latency_x.json: unreadable" in line for line in lines)


def test_bench_batch_invariant_smoke(run_smoke):
    run, out = run_smoke
    run("bench_batch_invariant")
    (path,) = out.glob("batch_invariant_*.json")
    (row,) = json.loads(path.read_text())
    assert set(row["tokens_per_s"]) == {"off_alone", "off_batch", "on_alone", "on_batch"}
    assert row["on_batch_equals_alone"] is True
    assert row["linear_layers_kept"] + row["linear_layers_rowwise"] > 0


def test_bench_memory_counts_each_storage_once_and_judges_packed_weights_against_the_file():
    from torch import nn

    bench = _load("bench_memory")
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied: one storage
    model = nn.Sequential(emb, head, nn.Linear(4, 3))
    model.register_buffer("blocks", torch.zeros(6, dtype=torch.uint8), persistent=False)
    model[2].weight.data = model[2].weight.data[:, :2]  # a view keeps its whole storage resident
    assert bench.weight_bytes(model) == 4 * (10 * 4 + 3 * 4 + 3) + 6

    MB = 10**6

    def entry(name, packed):
        return {"model": name, "file_bytes": 100 * MB, "loads": [
            {"mode": "packed", "source": "packed blocks", "weight_bytes": packed, "rss_after_load": 300 * MB,
             "peak_rss": 350 * MB, "load_s": 1.0},
            {"mode": "dequantised", "source": "GGUF parse", "weight_bytes": 400 * MB, "rss_after_load": 600 * MB,
             "peak_rss": 900 * MB, "load_s": 2.0}]}
    table = bench.render({"dtype": "bfloat16", "baseline": {"peak_rss": 200 * MB},
                          "models": [entry("small", 99 * MB), entry("big", 120 * MB)]})
    assert "| small | 100 MB | packed | 99 MB | 0.99x | 300 MB | 350 MB | 3.50x | 1.50x | 1.0 |" in table
    assert "| big | 100 MB | dequantised (GGUF parse) | 400 MB | 4.00x | 600 MB | 900 MB | 9.00x | 7.00x | 2.0 |" in table
    assert "small 0.99x (met); big 1.20x (not met)" in table


def test_serving_paired_single_alternates_and_pairs_rounds(monkeypatch):
    """bench_serving --paired-single: each round sends one prompt to both servers, the order
    swaps every round, and the latency ratio (batched over batch 1) and its interval come from
    the paired rounds (here the batched server is made exactly 1.1x slower)."""
    bench = _load("bench_serving")
    sent = []

    class Client:
        def __init__(self, base_url, timeout):
            self.url = base_url

        def close(self):
            pass

    def one_request(client, body):
        sent.append((client.url, body["prompt"]))
        base = 1.0 + len(body["prompt"])
        return {"latency_s": base * (1.1 if client.url == "B" else 1.0), "first_event_s": 0.1, "tokens": 1}

    monkeypatch.setattr(bench.httpx, "Client", Client)
    monkeypatch.setattr(bench, "one_request", one_request)
    servers = {"batched": type("S", (), {"url": "B"})(), "batch1": type("S", (), {"url": "1"})()}
    bodies = [{"prompt": "x" * k} for k in range(1, 4)]
    out = bench.paired_single(servers, bodies, 4)
    assert [u for u, _ in sent] == ["B", "1", "1", "B", "B", "1", "1", "B"]
    assert [p for _, p in sent] == ["x", "x", "xx", "xx", "xxx", "xxx", "x", "x"]
    assert out["latency_vs_batch1"] == pytest.approx(1.1)
    low, high = out["latency_vs_batch1_interval"]
    assert low == pytest.approx(1.1) and high == pytest.approx(1.1)
    assert "1.100x [1.100, 1.100]" in bench.render({"paired_single": out, "rows": []})


def test_serving_repeats_rotate_servers_and_pair_ratios_by_repeat():
    """bench_serving --repeats: ratios pair rows of the same repeat and client count, and the
    summary's interval over repeats brackets the per-repeat throughput ratios (here the batched
    server is 3x, then 2x, then 4x the batch-1 server's tokens/s)."""
    bench = _load("bench_serving")

    def row(server, repeat, wall):
        return {"server": server, "clients": 8, "repeat": repeat, "requests": 8, "wall_s": wall, "tokens": 100,
                "errors": [], "tok_s": 100 / wall, "p50_latency_s": wall, "p99_latency_s": wall,
                "p50_first_event_s": 0.1}

    rows = [row("batched", 0, 1.0), row("batch1", 0, 3.0), row("batch1", 1, 4.0), row("batched", 1, 2.0),
            row("batched", 2, 1.0), row("batch1", 2, 4.0)]
    bench.ratios(rows)
    assert [r.get("tok_s_vs_batch1") for r in rows] == [pytest.approx(3.0), None, None, pytest.approx(2.0),
                                                         pytest.approx(4.0), None]
    (batched, batch1) = bench.repeat_summary(rows)
    assert batched["server"] == "batched" and batched["repeats"] == 3
    assert batched["tok_s_vs_batch1"] == pytest.approx(11 / 4)  # summed seconds per token: 11 vs 4
    low, high = batched["tok_s_vs_batch1_interval"]
    assert 2.0 <= low < 11 / 4 < high <= 4.0
    assert batched["median_p99_latency_vs_batch1"] == pytest.approx(1 / 3)
    assert "tok_s_vs_batch1" not in batch1
    table = bench.render({"repeats": 3, "rows": rows, "summary": [batched, batch1]})
    assert f"| batched | 8 | 3 | 100.0 | 2.75x [{low:.2f}, {high:.2f}] |  | 0.33x |" in table
    assert "| batched (repeat 1) | 8 | 50.0 |" in table

    # Another server as a reference: its ratios and column, beside batch 1's.
    rows = [{**r, "server": {"batch1": "batched+dequantize"}.get(r["server"], r["server"])} for r in rows]
    refs = bench.REFERENCES + ("batched+dequantize",)
    bench.ratios(rows, refs)
    assert rows[0]["tok_s_vs_batched+dequantize"] == pytest.approx(3.0)
    summary = bench.repeat_summary(rows, refs)
    table = bench.render({"repeats": 3, "rows": rows, "summary": summary, "compare": "batched+dequantize"})
    assert "| median p99 latency vs batch 1 | tok/s vs batched+dequantize [95% CI] |" in table
    assert f"| batched | 8 | 3 | 100.0 |  |  |  | 2.75x [{low:.2f}, {high:.2f}] |" in table


def test_serving_server_names_carry_policy_threshold_and_flags():
    bench = _load("bench_serving")
    sizes = {"batched": 8, "batch1": 1}
    assert bench.server_argv(["serve"], "batched", 5, sizes, "rsd", 0.9) == [
        "serve", "--policy", "rsd", "--max-batch", "8", "--port", "5", "--threshold", "0.9"]
    assert bench.server_argv(["serve"], "batch1:arbitrage@0.7+dense-rows=4+dequantize", 6, sizes, "rsd", None) == [
        "serve", "--policy", "arbitrage", "--max-batch", "1", "--port", "6", "--dense-rows", "4", "--dequantize",
        "--threshold", "0.7"]
    assert bench.server_argv(["serve"], "batched:draft_only", 7, sizes, "rsd", 0.9)[-2:] == ["--port", "7"]


def test_serving_request_keeps_the_streamed_text():
    """one_request joins the streamed pieces of a chat completion and of a plain completion into
    the answer's text and keeps the last finish reason and the usage's token count."""
    bench = _load("bench_serving")

    def sse(events):
        return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"

    def handler(request):
        if request.url.path == "/v1/chat/completions":
            events = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Step 1.\n\n"},
                                    "finish_reason": None}]},
                      {"choices": [{"index": 0, "delta": {"content": "\\boxed{7}"}, "finish_reason": "stop"}]},
                      {"choices": [], "usage": {"completion_tokens": 9}}]
        else:
            events = [{"choices": [{"index": 0, "text": "a", "finish_reason": None}]},
                      {"choices": [{"index": 0, "text": "b", "finish_reason": "length"}],
                       "usage": {"completion_tokens": 2}}]
        return bench.httpx.Response(200, text=sse(events), headers={"content-type": "text/event-stream"})

    with bench.httpx.Client(transport=bench.httpx.MockTransport(handler), base_url="http://test") as client:
        chat = bench.one_request(client, {"messages": [{"role": "user", "content": "q"}]})
        plain = bench.one_request(client, {"prompt": "q"})
    assert (chat["text"], chat["finish_reason"], chat["tokens"]) == ("Step 1.\n\n\\boxed{7}", "stop", 9)
    assert (plain["text"], plain["finish_reason"], plain["tokens"]) == ("ab", "length", 2)


def test_serving_answers_grades_blocks_and_pairs_servers(monkeypatch):
    """bench_serving_answers: a block's requests go out at once and come back in the problems'
    order; answers are graded against the gold ones; the answers/s ratio pairs blocks (here the
    engine is exactly 2x faster on every block) and the accuracy difference pairs problems (one
    problem of four lost: -0.25, its interval holds 0 on four problems, so matched)."""
    bench = _load("bench_serving_answers")
    from arbitrage_fast.eval.datasets import EvalItem

    items = [EvalItem(f"p{i}", f"q{i}", str(i)) for i in range(4)]
    seen = []

    def one_request(client, body):
        seen.append(body["messages"][0]["content"])
        k = int(body["messages"][0]["content"][1:])
        wrong = str(client.base_url).endswith("engine") and k == 3
        return {"latency_s": 1.0, "first_event_s": 0.1, "tokens": 10 + k, "finish_reason": "stop",
                "text": f"so \\boxed{{{k + 1 if wrong else k}}}"}

    monkeypatch.setattr(bench, "one_request", one_request)
    blocks = []
    for k, (server, url, wall) in enumerate([("vllm", "http://v", 4.0), ("engine", "http://engine", 2.0),
                                              ("engine", "http://engine", 3.0), ("vllm", "http://v", 6.0)]):
        block = k // 2
        bodies = [{"messages": [{"role": "user", "content": f"q{i}"}]} for i in (2 * block, 2 * block + 1)]
        result = bench.drive_block(url, bodies)
        assert [r["tokens"] for r in result["records"]] == [10 + 2 * block, 11 + 2 * block]
        blocks.append({"server": server, "block": block, "wall_s": wall, "errors": result["errors"],
                       "answers": bench.graded(items[2 * block:2 * block + 2], result["records"])})
    assert sorted(seen) == ["q0", "q0", "q1", "q1", "q2", "q2", "q3", "q3"]
    vllm, engine = bench.summarise(blocks, "vllm")
    assert (vllm["correct"], engine["correct"], engine["problems"]) == (4, 3, 4)
    assert vllm["answers_s"] == pytest.approx(4 / 10) and engine["answers_s"] == pytest.approx(4 / 5)
    assert engine["answers_s_vs_reference"] == pytest.approx(2.0)
    assert engine["answers_s_vs_reference_ci"] == [pytest.approx(2.0), pytest.approx(2.0)]
    assert engine["accuracy_diff"] == pytest.approx(-0.25) and engine["matched"]
    assert "answers_s_vs_reference" not in vllm
    table = bench.render({"reference": "vllm", "summary": [vllm, engine]})
    assert "| engine | 4 | 0.750 [" in table and "| 2.00x [2.00, 2.00] | -0.250 [" in table
    assert table.rstrip().endswith("| yes |")

    # A block not yet run on every server is left out; a failed request refuses the server's figures.
    assert bench.summarise(blocks[:3], "vllm")[1]["problems"] == 2
    broken = [dict(b, errors=["problem 0: ReadTimeout"]) if b["server"] == "engine" and b["block"] == 1 else b
              for b in blocks]
    assert bench.summarise(broken, "vllm")[1]["failed"] == ["problem 0: ReadTimeout"]
    assert "| engine | failed: problem 0: ReadTimeout" in bench.render({"reference": "vllm",
                                                                         "summary": bench.summarise(broken, "vllm")})


def test_serving_answers_refuses_bad_settings():
    bench = _load("bench_serving_answers")
    with pytest.raises(SystemExit, match="multiple of --block"):
        bench.main(["--n", "10", "--block", "8"])
    with pytest.raises(SystemExit, match="--reference 'vllm' is not among"):
        bench.main(["--servers", "batched:target_only", "--n", "8"])
    with pytest.raises(SystemExit, match="needs --vllm-python"):
        bench.main(["--servers", "vllm,batched", "--n", "8"])


def test_bench_layer_op_smoke(tmp_path):
    """Modules against the one-op layer through the engine, on a tiny bf16 model: both variants
    timed every repeat, and their outputs equal."""
    from helpers.tiny_models import build_tiny_lm

    folder = build_tiny_lm(tmp_path / "m", "qwen2", hidden=64, layers=2)
    threads = torch.get_num_threads()
    try:
        assert _load("bench_layer_op").main(["--model", str(folder), "--rows", "1,2", "--tokens", "4",
                                             "--repeats", "2", "--name", "tiny", "--out-dir", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    payload = json.loads((tmp_path / "layer_op_tiny.json").read_text())
    assert [r["rows"] for r in payload["rows"]] == [1, 2]
    for row in payload["rows"]:
        assert len(row["modules_s"]) == len(row["one_op_s"]) == 2 and row["identical"]
        est, lo, hi = row["speedup"]
        assert lo <= est <= hi and est > 0
    assert "| 2 | 4 | 2 |" in _load("bench_layer_op").table(payload)


def test_bench_engine_thread_smoke(tmp_path):
    """The engine on the main thread against a long-lived second thread, on a tiny model: both
    timed every repeat, their outputs equal, the second thread closed afterwards."""
    import threading

    from helpers.tiny_models import build_tiny_lm

    folder = build_tiny_lm(tmp_path / "m", "qwen2", hidden=64, layers=2)
    assert _load("bench_engine_thread").main(["--model", str(folder), "--rows", "1,2", "--tokens", "4",
                                              "--repeats", "2", "--name", "tiny", "--out-dir", str(tmp_path)]) == 0
    assert not any(t.name == "engine" for t in threading.enumerate())  # each second thread ended
    payload = json.loads((tmp_path / "engine_thread_tiny.json").read_text())
    assert [r["rows"] for r in payload["rows"]] == [1, 2]
    for row in payload["rows"]:
        assert len(row["main_thread_s"]) == len(row["own_thread_s"]) == 2 and row["identical"]
        est, lo, hi = row["speedup"]
        assert lo <= est <= hi and est > 0
    assert "| 2 | 4 | 2 |" in _load("bench_engine_thread").table(payload)


def test_bench_policy_batching_smoke(tmp_path):
    """The testbed pair under RSD one at a time, then all at once: both runs logged forward by
    forward, the batched draft forwards carrying more than one row, the table rendered."""
    bench = _load("bench_policy_batching")
    assert bench.main(["--preset", "testbed", "--policy", "rsd", "--threshold", "0.5", "--n", "3", "--batch1-n", "2",
                       "--max-new-tokens", "16", "--name", "tiny", "--out-dir", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "policy_batching_tiny.json").read_text())
    assert payload["batch1"]["requests"] == 2 and payload["batched"]["requests"] == 3
    assert set(payload["batch1"]["forwards"]["draft"]["rows_histogram"]) == {"1"}
    assert max(int(r) for r in payload["batched"]["forwards"]["draft"]["rows_histogram"]) == 3
    assert payload["speedup"] == pytest.approx(payload["batched"]["tok_s"] / payload["batch1"]["tok_s"])
    assert "| batched | 3 |" in bench.table(payload) and "| batch1 | 2 |" in bench.table(payload)


def test_bench_greedy_logprob_smoke(tmp_path):
    module = _load("bench_greedy_logprob")
    assert module.main(["--vocab", "1000", "--rows", "1,3", "--repeats", "2", "--out-dir", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "greedy_logprob.json").read_text())
    assert [(r["rows"], r["entropy"]) for r in payload["rows"]] == [(1, False), (1, True), (3, False), (3, True)]
    assert all(r["same_tokens"] and r["op_us"] > 0 and r["torch_us"] > 0 for r in payload["rows"])
    assert "| 3 | 1000 | yes |" in module.table(payload)


def test_bench_router_heads_scores_every_step_out_of_fold(tmp_path):
    """Both head kinds cross-validated over problems of made-up label files: every step scored,
    the linear head ahead where the label follows a step statistic and the hidden columns are
    noise, the table rendered from the JSON."""
    from arbitrage_fast.router.data import RouterDataset
    from arbitrage_fast.router.features import feature_dim

    labels = tmp_path / "labels"
    labels.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(24):
        feats = torch.randn(5, feature_dim(8), generator=g)
        adv = -feats[:, -2] + 0.3 * torch.randn(5, generator=g)
        RouterDataset(feats, adv, torch.rand(5, generator=g), adv, torch.zeros(5, dtype=torch.long)).save(
            labels / f"p{i}.safetensors")
    bench = _load("bench_router_heads")
    assert bench.main(["--labels", str(labels), "--folds", "3", "--name", "tiny", "--out-dir", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "tiny.json").read_text())
    assert (payload["n_problems"], payload["n_steps"]) == (24, 120)
    rows = {r["kind"]: r for r in payload["rows"]}
    assert rows["linear"]["auroc"] > 0.8 and rows["linear"]["auroc_ci"][0] <= rows["linear"]["auroc"]
    assert payload["linear_minus_mlp_auroc"] == pytest.approx(rows["linear"]["auroc"] - rows["mlp"]["auroc"])
    assert "| linear | " in bench.table(payload) and "linear − mlp AUROC" in bench.table(payload)


def test_bench_router_heads_margin_labels_and_per_folder_auroc(tmp_path):
    """`--margins`: the linear recipe fitted on advantage > D ranks by what clears D. Here a small
    term (+-0.1, from one statistic) decides the sign of the advantage on half the steps and a
    large one (0 or 1, from another) decides whether it clears 0.5: the margin head finds the
    large term better than the plain one. With two label folders each row has each folder's AUROC."""
    from arbitrage_fast.router.data import RouterDataset
    from arbitrage_fast.router.features import feature_dim

    folders = [tmp_path / "a", tmp_path / "b"]
    g = torch.Generator().manual_seed(1)
    for k, folder in enumerate(folders):
        folder.mkdir()
        for i in range(30):
            feats = torch.randn(6, feature_dim(8), generator=g)
            large = (feats[:, -2] > 0).float()
            adv = large + torch.where(feats[:, -1] > 0, 0.1, -0.1)
            RouterDataset(feats, adv, torch.rand(6, generator=g), adv, torch.zeros(6, dtype=torch.long)).save(
                folder / f"p{k}_{i}.safetensors")
    bench = _load("bench_router_heads")
    data, n_problems, folder_of_step = bench.load_labels(folders)
    assert n_problems == 60 and list(np.bincount(folder_of_step)) == [180, 180]
    scores = bench.out_of_fold_scores(data, 8, folds=3, seed=0, margins=(0.5,))
    large = (data.advantage > 0.5).numpy()
    from arbitrage_fast.router.metrics import auroc
    margin_auroc = auroc(large, scores[bench.margin_kind(0.5)])
    assert margin_auroc > 0.95 and margin_auroc > auroc(large, scores["linear"]) + 0.02
    assert bench.main(["--labels", *map(str, folders), "--folds", "3", "--margins", "0.5", "--name", "m",
                       "--out-dir", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "m.json").read_text())
    assert [r["kind"] for r in payload["rows"]] == ["mlp", "linear", "linear, advantage > 0.5"]
    assert all(len(r["auroc_by_labels"]) == 2 for r in payload["rows"])
    assert "AUROC, a | AUROC, b |" in bench.table(payload)
    with pytest.raises(SystemExit):
        bench.main(["--labels", str(folders[0]), "--margins", "0", "--out-dir", str(tmp_path)])
