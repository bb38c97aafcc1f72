#!/usr/bin/env bash
# The quantized-draft pair beside the 0.5B pair, on the same GSM8K test problems: the 1.5B target
# in bf16 (its GGUF dequantised) with, as draft, (1) its own int4 copy quantized at load and
# (2) the 0.5B in bf16. Each pair is one resumable sweep of target_only, draft_only and RSD (the
# target-likelihood PRM) over the same threshold grid, fixed before the run (the grid of the
# real-pair sweeps, real_pair.sh); each sweep has its own target_only, so its speed-ups are
# ratios within that sweep. CPU hours on a 2-core machine; N, TOKENS, RSD, FORMAT override.
#
#   bash benchmarks/quant_draft_sweep.sh
#   REPORT_ONLY=1 bash benchmarks/quant_draft_sweep.sh   # the two tables from the records
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-6}
TOKENS=${TOKENS:-320}
RSD=${RSD:-0.9,0.95}
FORMAT=${FORMAT:-int4}
OUT=${OUT:-benchmarks/results}
CLI=(python -m arbitrage_fast.cli)
TARGET=$(python -c "from arbitrage_fast.models import gguf_assets; from arbitrage_fast.presets import QWEN_CODER_TARGET as t; print(gguf_assets.assemble(t))")
DRAFT=$(python -c "from arbitrage_fast.models import gguf_assets; from arbitrage_fast.presets import QWEN_CODER_DRAFT as d; print(gguf_assets.assemble(d))")

sweep() {  # name, then the draft's options
  local name=$1
  shift
  "${CLI[@]}" sweep --preset qwen2.5-coder --target "$TARGET" --dequantize "$@" --dataset gsm8k --split test \
    --n "$N" --max-new-tokens "$TOKENS" --policies target_only,draft_only,rsd --thresholds "rsd=$RSD" \
    --records "$OUT/quant_draft_sweep_${name}_records.jsonl" --json "$OUT/quant_draft_sweep_${name}.json" \
    ${REPORT_ONLY:+--report-only}
}
sweep "1.5b-$FORMAT" --draft "$TARGET" --draft-quant "$FORMAT"
sweep 0.5b --draft "$DRAFT"
