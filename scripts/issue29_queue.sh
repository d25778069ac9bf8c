#!/usr/bin/env bash
# Issue 29, second round (after scripts/issue29_eval.sh's LDS over 40 subsets): one process at a time, one torch
# thread, resumable (each step skipped when its result exists).
#   1. the remedies on the sentence LDS (same folder, the 40 cached retrains reused; the variants' full-model scores
#      computed once and cached in scores-variants.json);
#   2. identification on math at the reduced size (10 classes x 10 / 3, 6 epochs), final / step 0 / run + control.
# Usage: scripts/issue29_queue.sh [OUT]  (default /work/runs/eval)
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-/work/runs/eval}
PY=${PY:-$REPO/.venv/bin/python}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
say() { echo "[$(date -u +%FT%TZ)] $* (load: $(cut -d' ' -f1-3 /proc/loadavg))"; }
VARIANTS=(--variant ekfac:damping_scale=0.1 --variant ekfac:damping_scale=10 --variant ekfac:normalize
          --variant datainf:damping_scale=10 --variant datainf:normalize --variant identity:normalize
          --variant datainf:remove_top=1 --variant identity:remove_top=1 --variant lissa:damping_scale=10)
LDS="$OUT/lds-sentences"
if [ -f "$LDS/lds-40-variants.json" ]; then say "LDS variants: done already"; else
    say "LDS variants over 40 subsets: start"
    "$PY" -m datainf experiment lds --task sentences --classes 10 --n-train 100 --n-query 30 --epochs 6 \
        --lr 1e-3 --checkpoints 4 --control --subsets 40 --loo-examples 0 --loo-seeds 1 \
        --methods datainf,identity,exact,lissa,kfac,ekfac --seed 0 --device cpu --out "$LDS" "${VARIANTS[@]}"
    rc=$?; say "LDS variants: exit $rc"; [ "$rc" -eq 0 ] || exit "$rc"
    cp "$LDS/lds.json" "$LDS/lds-40-variants.json"
fi
IDENT="$OUT/ident-math"
if [ -f "$IDENT/results.json" ]; then say "math identification: done already"; else
    rm -rf "$IDENT"
    say "math identification: start"
    "$PY" -m datainf experiment llm-identification --task math --protocol response --classes 10 \
        --train-per-class 10 --test-per-class 3 --epochs 6 --lr 1e-3 --batch-size 8 --checkpoints 4 --control \
        --methods datainf,identity,ekfac --variant ekfac:normalize --seed 0 --no-keep-store --device cpu --out "$IDENT"
    rc=$?; say "math identification: exit $rc"; [ "$rc" -eq 0 ] || exit "$rc"
fi
