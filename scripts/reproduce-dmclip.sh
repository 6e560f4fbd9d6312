#!/usr/bin/env bash
# DM-CLIP's results on the embedded world, end to end from a clean checkout:
#   RQ1: KD (alpha 0.75) against contrastive-only over three seeds, on noisy captions
#        (recipes/distill-alpha-sweep.yaml) and on clean ones (recipes/distill-zeroshot-sweep.yaml);
#   RQ2 as a frontier: Vision-Mamba and ViT students of several
# widths, each distilled from builtin:world-vit with recipes/distill-best.yaml (same data, steps and losses)
# at every seed, then one eval suite that scores them all, times every image encoder against the teacher's
# (batch 1 and 64, interleaved) and writes the accuracy-latency table and plot with intervals over seeds.
# Usage: scripts/reproduce-dmclip.sh [extra distill options...]
#        MAMBA_WIDTHS="48 64 96 128", VIT_WIDTHS="48 64 96 128", SEEDS=0,1,2 (the defaults) pick the grid;
#        SUITE_SETS (default: every registered set) the frontier suite's --zero-shot / --retrieval options.
# Each student trains 2400 steps of 128 (about 35 min at width 128 on 2 CPU cores): hours in all.
set -euo pipefail
cd "$(dirname "$0")/.."
DMCLIP=${DMCLIP:-.venv/bin/dmclip}
ROOT=${ROOT:-runs/reproduce-dmclip}
SEEDS=${SEEDS:-0,1,2}
MAMBA_WIDTHS=${MAMBA_WIDTHS:-"48 64 96 128"}
VIT_WIDTHS=${VIT_WIDTHS:-"48 64 96 128"}
newest() { ls -d "$ROOT/$1"/*-"$2"-* | tail -1; }

"$DMCLIP" distill recipes/distill-alpha-sweep.yaml --name kd-noisy --runs-dir "$ROOT" "$@"
"$DMCLIP" distill recipes/distill-zeroshot-sweep.yaml --name kd-clean --runs-dir "$ROOT" "$@"
arms=()
for spec in $(for w in $MAMBA_WIDTHS; do echo "mamba:mamba-nano:$w"; done; \
              for w in $VIT_WIDTHS; do echo "vit:vit-nano:$w"; done); do
    IFS=: read -r family student width <<< "$spec"
    name="rq2-$family-$width"
    "$DMCLIP" distill recipes/distill-best.yaml --student "$student" --set "student.width=$width" \
        --seeds "$SEEDS" --name "$name" --runs-dir "$ROOT" "$@"
    sweep=$(ls -d "$ROOT/distill"/*-sweep-"$name" | tail -1)
    members=$(find "$sweep" -mindepth 1 -maxdepth 1 -type d -name "*seed*" | sort | sed 's/^/run:/' | paste -sd,)
    arms+=(--arm "$family-$width=$members")
done
# shellcheck disable=SC2086  # SUITE_SETS holds several options
"$DMCLIP" eval suite --models builtin:world-vit "${arms[@]}" --latency ${SUITE_SETS:-} --name rq2-frontier \
    --runs-dir "$ROOT"
echo "tables: $ROOT/distill/*-sweep-kd-noisy/summary.md, $ROOT/distill/*-sweep-kd-clean/summary.md,"
echo "        $(newest eval rq2-frontier)/summary.md (and frontier.png)"
