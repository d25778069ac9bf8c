#!/usr/bin/env bash
# Issue 29 item 6: the paper's protocol in the paper's own training regime, scaled down. Its research code makes
# about one optimizer step per epoch (per-device batch 64 x accumulation 16 over 900 examples), 10 epochs at lr
# 3e-4: about 10 AdamW steps. Here: math without reasoning, 10 classes x 10 training / 3 test examples, one batch
# of all 100 per step, 10 epochs at lr 3e-4 (10 optimizer steps), the paper's prompt-loss protocol; DataInf and
# Hessian-free (identity). Does its math gap (DataInf 1.000 vs Hessian-free 0.770) appear there?
# Usage: scripts/issue29_paper_regime.sh [OUT]  (default /work/runs/eval/paper-regime-math); one torch thread.
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-/work/runs/eval/paper-regime-math}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
echo "[$(date -u +%FT%TZ)] start (load: $(cut -d' ' -f1-3 /proc/loadavg))"
"$REPO/.venv/bin/python" -m datainf experiment llm-identification --task math --protocol paper --classes 10 \
    --train-per-class 10 --test-per-class 3 --epochs 10 --lr 3e-4 --batch-size 100 \
    --methods datainf,identity,exact,ekfac --seed 0 --no-keep-store --device cpu --out "$OUT"
echo "[$(date -u +%FT%TZ)] exit $? (load: $(cut -d' ' -f1-3 /proc/loadavg))"
