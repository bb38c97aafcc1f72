#!/usr/bin/env bash
# The testbed evidence recorded in RESULTS.md, under the protocol: choose on dev, report on test.
#
# The testbed's PRM is the shipped neural PRM (testbed/prm_train.py): RSD decides with it and
# the router learns from its advantage, PRM(target step) - PRM(draft step), on train problems.
# The exact checker only audits (wasted escalations) and decides the rows marked as oracles:
# `rsd:exact` (RSD with a perfect, free PRM) and `arbitrage:exact` (a router trained on the
# checker's labels). `rsd:likelihood` is RSD with the target-likelihood PRM of a deployment
# without PRM weights.
#
#   1. router heads: train split, labels from the shipped PRM (-> checkpoints/router) and from
#      the exact checker (-> checkpoints/router_exact)
#   2. held-out router metrics on test problems
#   3. calibrate: every policy over an even grid on dev; thresholds chosen per accuracy target
#   4. sweep --thresholds-from: the chosen thresholds once on test, with a head-to-head table
#
# Labels are cached (LABELS), so a stopped run resumes; the sweeps resume from their records.
# TRAIN_N, DEV_N, TEST_N, GRID and LABELS override the defaults. The shipped PRM itself comes
# from `python -m arbitrage_fast.testbed.prm_train --out "$CKPT"`. One thread per process
# (OMP_NUM_THREADS=1): on a shared 2-core machine two OpenMP threads stall each other.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
TRAIN_N=${TRAIN_N:-600}
DEV_N=${DEV_N:-80}
TEST_N=${TEST_N:-150}
GRID=${GRID:-6}
LABELS=${LABELS:-$HOME/.cache/arbitrage_fast/labels}
OUT=benchmarks/results
CLI=(python -m arbitrage_fast.cli)
CKPT=$(python -c "from arbitrage_fast.testbed import CHECKPOINTS; print(CHECKPOINTS)")
POLICIES=draft_only,rsd,rsd:likelihood,rsd:exact,arbitrage,arbitrage:exact,specreason,spec_thinking,lookahead

"${CLI[@]}" train-router --preset testbed --prm exact --n "$TRAIN_N" --batch 8 --label-cache "$LABELS/testbed_exact" \
  --out "$CKPT/router_exact" --json "$OUT/testbed_router_exact_train.json"
"${CLI[@]}" train-router --preset testbed --n "$TRAIN_N" --batch 8 --label-cache "$LABELS/testbed_prm" \
  --out "$CKPT/router" --json "$OUT/testbed_router_train.json"
# The heads ship in the package; their labels stay in the label cache.
rm -f "$CKPT/router_exact/labels.safetensors" "$CKPT/router/labels.safetensors"
"${CLI[@]}" eval-router --preset testbed --n 200 --batch 8 --label-cache "$LABELS/testbed_prm" \
  --json "$OUT/testbed_router_eval.json"
"${CLI[@]}" calibrate --preset testbed --n "$DEV_N" --policies "$POLICIES" --grid-points "$GRID" \
  --records "$OUT/testbed_calibration_records.jsonl" --out "$OUT/testbed_calibration.json"
"${CLI[@]}" sweep --preset testbed --n "$TEST_N" --thresholds-from "$OUT/testbed_calibration.json" \
  --records "$OUT/testbed_protocol_records.jsonl" --json "$OUT/testbed_protocol.json"
