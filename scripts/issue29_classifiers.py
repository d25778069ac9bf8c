"""Issue 29 on the classifiers: which scored variant should `score` use by default for a classifier store?

Two measures on the demo's recipe (all-MiniLM-L6-v2 + LoRA r=4 on the value matrices and the head, Rotten
Tomatoes, 20% flipped labels, 4 epochs at lr 3e-3), every variant a spec of
:func:`datainf.estimators.arguments_from_spec`, scored on the same fine-tune:

1. mislabel: the demo itself (1,000 training / 200 validation sentences, seed 0): AUC of the flipped labels,
   ranking by the influence on the mean validation loss (most harmful first); results in OUT/mislabel.json.
2. LDS: ``datainf experiment lds`` at its classifier defaults (200 training / 50 queries, 50 half-subsets,
   no leave-one-out) with the same variants (``--variant``); results in OUT/lds/lds.json.

Usage: python scripts/issue29_classifiers.py OUT [--seeds 0,1,2]  (one torch thread; resumable: a finished
seed's mislabel results and the LDS retrains are cached).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from datainf import atomic
from datainf.estimators import arguments_from_spec
from datainf.experiments import lds as lds_module
from datainf.experiments import mislabeled
from datainf.metrics import roc_auc

METHODS = ("datainf", "identity", "exact", "lissa", "ekfac")
VARIANTS = ("datainf:damping_scale=10", "datainf:damping_scale=100", "exact:damping_scale=10",
            "exact:damping_scale=100", "lissa:damping_scale=10", "ekfac:damping_scale=10", "ekfac:damping_scale=100",
            "identity:normalize", "datainf:normalize", "ekfac:normalize", "datainf:damping_rule=rank",
            "datainf:remove_top=1", "identity:remove_top=1")


def mislabel(out: Path, seed: int) -> dict:
    path = out / f"mislabel-seed{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    settings = mislabeled.MislabeledSettings(seed=seed, methods=METHODS)
    train, val, num_labels = mislabeled.noisy_split(settings, None)
    model, tok, _, metrics = mislabeled.finetune(settings, train, val, num_labels, progress=False)
    att, val_grads, _ = mislabeled.gradients(settings, model, tok, train, val, out / f"mislabel-seed{seed}",
                                             progress=False)
    flipped = np.array([r["flipped"] for r in train])
    rows = {}
    for spec in (*METHODS, *VARIANTS):
        result = att.score(val_grads, arguments_from_spec(spec, mean_query=True), save=False)
        rows[spec] = {"auc": roc_auc(result.scores[:, 0].double().numpy(), flipped), "seconds": result.seconds}
        print(f"seed {seed} {spec:28s} AUC {rows[spec]['auc']:.3f}", flush=True)
    res = {"seed": seed, "validation_accuracy": metrics["accuracy"], "rows": rows,
           "wall_seconds": time.perf_counter() - t0}
    atomic.write_json(path, res)
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--subsets", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    for seed in seeds:
        mislabel(out, seed)
    settings = lds_module.LdsSettings(n_train=200, n_query=50, subsets=args.subsets, loo_examples=0,
                                      methods=METHODS, variants=VARIANTS)
    result = lds_module.run(settings, out / "lds", progress=False)
    print("\n| variant | " + " | ".join(f"mislabel AUC seed {s}" for s in seeds) + " | LDS |")
    print("|---|" + "---|" * (len(seeds) + 1))
    for spec in (*METHODS, *VARIANTS):
        aucs = [json.loads((out / f"mislabel-seed{s}.json").read_text())["rows"][spec]["auc"] for s in seeds]
        print(f"| {spec} | " + " | ".join(f"{a:.3f}" for a in aucs) + f" | {result.methods[spec].lds:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
