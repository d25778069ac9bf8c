"""Does step 0 rebuilt from a final adapter alone need the seed its A matrices were drawn with? (issue 29)

Step 0 of a LoRA fine-tune is B = 0 and a random A: it does not depend on the training at all, only on the
base model, the LoRA config and the seed A was drawn with. ``datainf grads --initial`` rebuilds it from an
adapter's config, with the seed the adapter recorded (``datainf finetune`` records it) or, for an adapter
made elsewhere, another one. This script scores the identification task (the paper's sizes by default) at
step 0 drawn with several seeds: seed 0 is the A that ``experiment llm-identification --seed 0`` trained from
(its step-0 row is the reference), the others are what a user with a foreign adapter gets.

    python scripts/issue29_step0_seed.py --task sentences --seeds 1,2,0 --out OUT/step0-seed

One result file per (task, seed), written as it finishes; a rerun skips the ones present.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from datainf.experiments.llm_identification import (
    LLMIdentificationSettings,
    gradients,
    identification_metrics,
    method_arguments,
    prompts_and_responses,
    task_records,
)
from datainf.models.llm import load_causal_lm, smollm2_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="sentences")
    ap.add_argument("--seeds", default="1,2,0", help="A's seeds (the data and the queries stay seed 0's)")
    ap.add_argument("--train-per-class", type=int, default=90)
    ap.add_argument("--test-per-class", type=int, default=10)
    ap.add_argument("--methods", default="ekfac,datainf,identity")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    settings = LLMIdentificationSettings(task=a.task, train_per_class=a.train_per_class,
                                         test_per_class=a.test_per_class, protocol="response",
                                         methods=tuple(a.methods.split(",")), seed=0, device="cpu")
    train, test = task_records(settings)  # the data of seed 0, whatever A's seed
    train_pr, test_pr = prompts_and_responses(train), prompts_and_responses(test)
    train_labels, test_labels = [r["label"] for r in train], [r["label"] for r in test]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for seed in [int(s) for s in a.seeds.split(",")]:
        path = out / f"{a.task}-{len(train)}-seed{seed}.json"
        if path.exists():
            print(f"{path} exists; skipped", flush=True)
            continue
        t0 = time.perf_counter()
        model, tokenizer = load_causal_lm(str(smollm2_dir()), settings.lora, device="cpu", seed=seed)
        store = out / f"store-{a.task}-{seed}"
        attributor, queries, train_s, query_s = gradients(settings, model, tokenizer, train_pr, test_pr, store,
                                                          progress=False)
        rows = {}
        for name, arguments in method_arguments(settings).items():
            t1 = time.perf_counter()
            result = attributor.score(queries, arguments, save=False)
            m = identification_metrics(result.scores, train_labels, test_labels)
            rows[name] = {"auc": m["auc"], "recall": m["recall"], "seconds": time.perf_counter() - t1}
            print(f"{a.task} A seed {seed}: {name} AUC {m['auc']:.3f} recall {m['recall']:.3f}", flush=True)
        record = {"task": a.task, "n_train": len(train), "n_test": len(test), "a_seed": seed, "data_seed": 0,
                  "lora": {"rank": settings.lora.rank, "alpha": settings.lora.alpha,
                           "target_modules": list(settings.lora.target_modules)},
                  "train_gradient_seconds": train_s, "query_gradient_seconds": query_s,
                  "wall_seconds": time.perf_counter() - t0, "torch_threads": torch.get_num_threads(),
                  "methods": rows}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(path)
        shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    main()
