#!/usr/bin/env bash
# The edge-server compression results at 256 vision tokens, end to end from a clean checkout:
#   1. pretrain the 64 px BLIP (recipes/pretrain-blip-256.yaml: 256 patch tokens + a class token)
#   2. compress sweep: every selector, k-means k in {4, 8, 16, 32}, random at k-means' bytes, 3 edge seeds
#   3. compress eval --finetune-server at k = 8: the decoder trained on restored tokens vs an equal-steps
#      control trained on all tokens, 3 training seeds
# Each step writes a run directory under $ROOT with its summary.md / report.md (tables with intervals).
# Usage: scripts/reproduce-edge.sh [STEPS] [LIMIT]   (defaults 1000 pretraining steps, all 1000 test images)
#        BLIP=<pretrain run dir> skips step 1 and uses that model (e.g. after `dmclip pretrain --resume`).
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-1000}
LIMIT=${2:-0}
DMCLIP=${DMCLIP:-.venv/bin/dmclip}
ROOT=${ROOT:-runs/reproduce-edge}
shift $(( $# < 2 ? $# : 2 ))
EXTRA=("$@")  # more --set overrides for both compress steps (e.g. a smaller sweep)
newest() { ls -d "$ROOT/$1"/*-"$2"-* | tail -1; }

if [ -z "${BLIP:-}" ]; then
    "$DMCLIP" pretrain recipes/pretrain-blip-256.yaml --name blip-256 --steps "$STEPS" --runs-dir "$ROOT"
    BLIP=$(newest pretrain blip-256)
fi
"$DMCLIP" compress sweep recipes/compress-edge.yaml --model "run:$BLIP" --limit "$LIMIT" --name edge-sweep \
    --runs-dir "$ROOT" "${EXTRA[@]}"
"$DMCLIP" compress eval recipes/compress-edge.yaml --model "run:$BLIP" --limit "$LIMIT" --finetune-server \
    --name edge-finetune --runs-dir "$ROOT" "${EXTRA[@]}"
echo "tables: $(newest compress edge-sweep)/summary.md and $(newest compress edge-finetune)/report.md"
