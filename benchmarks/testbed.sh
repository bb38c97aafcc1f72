#!/usr/bin/env bash
# The testbed run recorded in RESULTS.md: router labels on training problems, the router's
# held-out metrics, one sweep of every policy (RSD with the target-likelihood PRM, as a
# deployment without PRM weights runs it), then RSD with the exact checker as its PRM (a
# perfect, free PRM that exists only on the testbed) against target_only in a second run, then
# rsd and arbitrage with the draft speculating the target's rewrites (--spec-k) in a third,
# and last the protocol run: thresholds chosen on dev by `calibrate`, reported on test once.
# About an hour on a 2-core CPU (the protocol run adds its dev grid); TRAIN_N, N, SPEC_K and the threshold grids override the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
TRAIN_N=${TRAIN_N:-1000}
N=${N:-200}
RSD=${RSD:-0.7,0.8,0.85,0.9,0.95}
ARB=${ARB:-0.05,0.1,0.2,0.3,0.5,0.7,0.8,0.9}
SPEC_K=${SPEC_K:-4}
OUT=benchmarks/results
CLI=(python -m arbitrage_fast.cli)
ROUTER=$(python -c "from arbitrage_fast.presets import testbed_router_dir as d; print(d())")

"${CLI[@]}" train-router --preset testbed --n "$TRAIN_N" --out "$ROUTER" --json "$OUT/testbed_router_train.json"
"${CLI[@]}" eval-router --preset testbed --n "$N" --json "$OUT/testbed_router_eval.json"
"${CLI[@]}" sweep --preset testbed --n "$N" \
  --policies target_only,draft_only,rsd,arbitrage,oracle,every_step \
  --thresholds "rsd=$RSD;arbitrage=$ARB;oracle=0.0;every_step=0.9" \
  --records "$OUT/testbed_sweep_records.jsonl" --json "$OUT/testbed_sweep.json" \
  --plot "$OUT/testbed_pareto.png"
"${CLI[@]}" sweep --preset testbed --prm exact --n "$N" --policies target_only,rsd \
  --thresholds "rsd=0.75" --json "$OUT/testbed_sweep_exact_prm.json"
"${CLI[@]}" sweep --preset testbed --spec-k "$SPEC_K" --n "$N" --policies target_only,rsd,arbitrage \
  --thresholds "rsd=0.7;arbitrage=0.7" --json "$OUT/testbed_sweep_spec_k.json"
"${CLI[@]}" calibrate --preset testbed --n "$N" --policies rsd,arbitrage,lookahead \
  --records "$OUT/testbed_calibration_records.jsonl" --out "$OUT/testbed_calibration.json"
"${CLI[@]}" sweep --preset testbed --n "$N" --thresholds-from "$OUT/testbed_calibration.json" \
  --records "$OUT/testbed_protocol_records.jsonl" --json "$OUT/testbed_protocol.json"
