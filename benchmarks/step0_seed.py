"""Does the seed of step 0's LoRA A matter? (issue 29, item 1: `datainf grads --initial` on an adapter that
records no seed draws A with --seed.)

On a generated task (response protocol, SmolLM2-135M-Instruct, LoRA r=8 alpha=32 on q_proj/v_proj as
`datainf finetune` puts it), for each seed: the LoRA at step 0 (B = 0, A drawn with the seed: what
:func:`datainf.models.initial.initial_lora` builds), training and test gradients, scores by each method;
then the identification AUC per seed and the Spearman correlation between two seeds' scores (mean over test
prompts). No fine-tune is needed: step 0 is the LoRA before the first optimizer step.

    OMP_NUM_THREADS=1 python benchmarks/step0_seed.py --task sentences --classes 10 --train 10 --test 2 \
        --seeds 0 1 2 --out /tmp/step0-seed.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from datainf.attributor import Attributor
from datainf.data.collate import TextCollator
from datainf.data.generation import make_task, split_task
from datainf.experiments.llm_identification import identification_metrics, mean_column_correlation
from datainf.models.finetune import LoraSettings
from datainf.models.llm import load_causal_lm, smollm2_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="sentences")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--train", type=int, default=10, help="training examples per class")
    parser.add_argument("--test", type=int, default=2, help="test prompts per class")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["datainf", "identity"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    records = make_task(args.task, args.classes, args.train + args.test, seed=0)
    train, test = split_task(records, args.train, args.test)
    pr = lambda rs: [{"prompt": r["prompt"], "response": r["response"]} for r in rs]  # noqa: E731
    train_labels, test_labels = [r["label"] for r in train], [r["label"] for r in test]
    lora = LoraSettings(rank=8, alpha=32, dropout=0.05, target_modules=("q_proj", "v_proj"), modules_to_save=())
    scores: dict[int, dict[str, np.ndarray]] = {}
    out: dict = {"task": args.task, "classes": args.classes, "train_per_class": args.train,
                 "test_per_class": args.test, "seeds": args.seeds, "methods": args.methods, "per_seed": {},
                 "load_before": os.getloadavg()}
    t_start = time.perf_counter()
    for seed in args.seeds:
        t0 = time.perf_counter()
        model, tokenizer = load_causal_lm(smollm2_dir(), lora, seed=seed)
        collate = TextCollator(tokenizer, task="causal_lm", max_length=128)
        folder = Path(tempfile.mkdtemp(prefix=f"step0-seed{seed}-"))
        try:
            attributor = Attributor(model, task="causal_lm", store=folder / "store", tokenizer=tokenizer,
                                    collate=collate, batch_size=8, progress=False)
            attributor.fit(pr(train))
            queries = attributor.gradients(pr(test), desc="test gradients")
            scores[seed] = {}
            row = {}
            for method in args.methods:
                result = attributor.score(queries, method=method, save=False)
                s = result.scores.double().numpy()
                scores[seed][method] = s
                m = identification_metrics(s, train_labels, test_labels)
                row[method] = {"auc": m["auc"], "recall": m["recall"]}
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        row["seconds"] = time.perf_counter() - t0
        out["per_seed"][str(seed)] = row
        print(seed, json.dumps(row), flush=True)
    out["spearman_between_seeds"] = {}
    for method in args.methods:
        pairs = {f"{a}-{b}": mean_column_correlation(scores[a][method], scores[b][method])[1]
                 for a, b in itertools.combinations(args.seeds, 2)}
        out["spearman_between_seeds"][method] = pairs
        aucs = [out["per_seed"][str(s)][method]["auc"] for s in args.seeds]
        out.setdefault("auc_mean_sd", {})[method] = [float(np.mean(aucs)), float(np.std(aucs, ddof=1))
                                                    if len(aucs) > 1 else 0.0]
    out["wall_seconds"] = time.perf_counter() - t_start
    out["load_after"] = os.getloadavg()
    args.out.write_text(json.dumps(out, indent=2))
    print(json.dumps({k: out[k] for k in ("spearman_between_seeds", "auc_mean_sd", "wall_seconds", "load_before",
                                          "load_after")}, indent=2))


if __name__ == "__main__":
    main()
