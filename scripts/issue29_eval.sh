#!/usr/bin/env bash
# Issue 29's evaluation on SmolLM2-135M-Instruct (CPU, one torch thread, one process at a time), resumable:
#   1. identification, sentences, response protocol, every method at the final adapter, at step 0 and summed
#      along the run (step 0 + 4 checkpoints, finetune's interval-rate weights), and the resemblance control;
#      reduced size: 10 classes x 10 training / 3 test examples, 6 epochs at lr 1e-3, batch 8 (78 steps);
#   2. LDS on sentences in the converged regime, the same recipe (100 training examples, 30 queries, 6 epochs
#      at lr 1e-3, batch 8; retrains on half-subsets of 50), scored at the final adapter, step 0 and the run,
#      with the control; 20, then 40, then 60 retrained subsets (each cached in subsets/ as it finishes; a rerun
#      reuses them; lds-N.json is the result over the first N). No leave-one-out.
# Rerun the script to resume: a finished step is skipped, the LDS retrains already cached are reused; a
# killed identification run is started again from scratch (it keeps nothing half-done).
# Usage: scripts/issue29_eval.sh [OUT]   (default /work/runs/eval); env PY = the python with datainf's deps.
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-/work/runs/eval}
PY=${PY:-/work/main/.venv/bin/python}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
say() { echo "[$(date -u +%FT%TZ)] $* (load: $(cut -d' ' -f1-3 /proc/loadavg))"; }

IDENT="$OUT/ident-sentences"
if [ -f "$IDENT/results.json" ]; then
    say "identification: done already ($IDENT/results.json)"
else
    rm -rf "$IDENT"  # this script's own folder: a killed run left partial files, it is run again whole
    say "identification: start"
    "$PY" -m datainf experiment llm-identification --task sentences --protocol response --classes 10 \
        --train-per-class 10 --test-per-class 3 --epochs 6 --lr 1e-3 --batch-size 8 --checkpoints 4 --control \
        --methods datainf,identity,exact,lissa,kfac,ekfac --seed 0 --no-keep-store --device cpu --out "$IDENT"
    rc=$?
    say "identification: exit $rc"
    [ "$rc" -eq 0 ] || exit "$rc"
fi

LDS="$OUT/lds-sentences"
for n in 20 40 60; do
    if [ -f "$LDS/lds-$n.json" ]; then
        say "LDS over $n subsets: done already"
        continue
    fi
    say "LDS over $n subsets: start"
    "$PY" -m datainf experiment lds --task sentences --classes 10 --n-train 100 --n-query 30 --epochs 6 \
        --lr 1e-3 --checkpoints 4 --control --subsets "$n" --loo-examples 0 --loo-seeds 1 \
        --methods datainf,identity,exact,lissa,kfac,ekfac --seed 0 --device cpu --out "$LDS"
    rc=$?
    say "LDS over $n subsets: exit $rc"
    [ "$rc" -eq 0 ] || exit "$rc"
    cp "$LDS/lds.json" "$LDS/lds-$n.json"
done
say "all done"
