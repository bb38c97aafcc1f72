#!/usr/bin/env bash
# The number a deployment cares about: the real pair served under Arbitrage against vLLM serving
# the 1.5B target alone, answering the same GSM8K test problems under load (blocks of BLOCK at
# once), every answer graded: answers/s with a paired interval over blocks and the accuracy
# difference with a paired interval over problems, in one run (`bench_serving_answers.py`).
#
#   VLLM_PY=/opt/vllm/bin/python bash benchmarks/serving_answers.sh
#
# Arbitrage runs at the shipped head's thresholds for the escalation rates RATES, read from its
# validation curve (train-split problems), never from the test problems served here. The pair
# loads packed with the bf16 copy for forwards of DENSE_ROWS tokens or more. vLLM serves this
# project's dequantised cache of the target (`--preset qwen2.5-coder --dequantize` makes it).
# Knobs: N (test problems, 48), BLOCK (8), TOKENS (cap per answer, 400), RATES (0.3),
# DENSE_ROWS (4), DATASET (gsm8k), NAME, VLLM_MEM (the share of host memory vLLM's CPU backend
# takes for its weights, activations and KV cache, 0.3; at 0.2 a 24 GB host leaves the 1.5B no KV).
# Each rate adds a pair server with its bf16 copy (5.7 GB): on a 24 GB host one fits beside vLLM,
# two do not (the second is killed while loading).
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_PY=${VLLM_PY:-/opt/vllm/bin/python}
N=${N:-48}
BLOCK=${BLOCK:-8}
TOKENS=${TOKENS:-400}
RATES=${RATES:-0.3}
DENSE_ROWS=${DENSE_ROWS:-4}
DATASET=${DATASET:-gsm8k}
VLLM_MEM=${VLLM_MEM:-0.3}
NAME=${NAME:-qwen_pair_${DATASET}_n${N}}

SERVERS=$(python - "$RATES" "$DENSE_ROWS" <<'EOF'
import json, sys
from pathlib import Path
import arbitrage_fast

config = Path(arbitrage_fast.__file__).parent / "router/heads/qwen2.5-coder/router_config.json"
curve = {round(p["rate"], 3): p["threshold"] for p in json.loads(config.read_text())["training"]["val_deferral_curve"]}
rates = [round(float(r), 3) for r in sys.argv[1].split(",")]
missing = [r for r in rates if r not in curve]
if missing:
    sys.exit(f"the head's validation curve has no threshold for rates {missing} (it has {sorted(curve)})")
print(",".join(["vllm"] + [f"batched:arbitrage@{curve[r]:.4f}+dense-rows={sys.argv[2]}" for r in rates]))
EOF
)
TARGET_DIR=$(python -c "
from arbitrage_fast.models.gguf_assets import cache_dir
dirs = sorted((cache_dir() / 'dequantised').glob('qwen2.5-coder-1.5b-instruct-q4_k_m-*-bfloat16'))
print(dirs[-1] if dirs else '')")
if [[ -z "$TARGET_DIR" ]]; then
  echo "no dequantised 1.5B in the cache: run 'arbitrage-fast generate --preset qwen2.5-coder --dequantize ...' once" >&2
  exit 1
fi
python benchmarks/bench_serving_answers.py --preset qwen2.5-coder --no-exact-arithmetic --dtype bfloat16 \
  --servers "$SERVERS" --reference vllm --vllm-python "$VLLM_PY" --vllm-model "$TARGET_DIR" \
  --vllm-args "--gpu-memory-utilization $VLLM_MEM --max-model-len 4096" \
  --dataset "$DATASET" --n "$N" --block "$BLOCK" --max-tokens "$TOKENS" --max-batch "$BLOCK" --name "$NAME"
