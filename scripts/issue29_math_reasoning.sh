#!/usr/bin/env bash
# Issue 29's identification on the third generated task, math with reasoning (SmolLM2-135M-Instruct, CPU, one
# torch thread), response protocol, step 0 + 4 checkpoints and the resemblance control:
#   reduced   3 seeds at 10 classes x 10 training / 3 test examples, 6 epochs at lr 1e-3, batch 8 (78 steps),
#             methods datainf, identity, kfac, ekfac -> OUT/ident-math-reasoning-seed{0,1,2}
#   paper     the paper's sizes (90 / 10 per class), the experiment's default recipe (2 epochs at lr 1e-3, 226
#             steps), seed 0, methods datainf, identity, ekfac -> OUT/paper-math-reasoning
# A finished run (results.json) is skipped; a stopped one picks up its kept work (the experiment resumes).
# Tables: python scripts/issue29_seeds.py math-reasoning OUT/ident-math-reasoning-seed*/results.json
# Usage: scripts/issue29_math_reasoning.sh reduced|paper [OUT] (default /work/runs/eval); env SEEDS="0 1 2", PY.
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
WHICH=${1:?give reduced or paper}
OUT=${2:-/work/runs/eval}
PY=${PY:-/work/main/.venv/bin/python}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
say() { echo "[$(date -u +%FT%TZ)] $* (load: $(cut -d' ' -f1-3 /proc/loadavg))"; }
if [ "$WHICH" = reduced ]; then
    for seed in ${SEEDS:-0 1 2}; do
        out="$OUT/ident-math-reasoning-seed$seed"
        [ -f "$out/results.json" ] && continue
        say "math-reasoning reduced seed $seed: start"
        "$PY" -m datainf --quiet experiment llm-identification --task math-reasoning --protocol response \
            --classes 10 --train-per-class 10 --test-per-class 3 --epochs 6 --lr 1e-3 --batch-size 8 \
            --checkpoints 4 --control --methods datainf,identity,kfac,ekfac --seed "$seed" --no-keep-store \
            --device cpu --out "$out"
        say "math-reasoning reduced seed $seed: exit $?"
    done
else
    out="$OUT/paper-math-reasoning"
    [ -f "$out/results.json" ] && exit 0
    say "math-reasoning paper size: start"
    "$PY" -m datainf --quiet experiment llm-identification --task math-reasoning --protocol response \
        --checkpoints 4 --control --methods datainf,identity,ekfac --seed 0 --no-keep-store --device cpu --out "$out"
    say "math-reasoning paper size: exit $?"
fi
