"""What projecting the per-example gradients costs in accuracy and saves in storage and time.

Two tasks, each fine-tuned ONCE, then the gradient pass, the store and every method's scores repeated for
each projection (k in ``--dims``, seed 0) and unprojected, on the same model:

* ``mislabeled``: the demo's run (``MislabeledSettings()`` defaults: MiniLM + LoRA r=4 on the value
  matrices + classifier head, 1,000 Rotten Tomatoes sentences, 20% flipped labels); influence of every
  training example on the mean validation loss; AUC of finding the flipped labels.
* ``llm``: influential-data identification (``LLMIdentificationSettings``, SmolLM2-135M-Instruct, LoRA r=8
  on q_proj/v_proj, response protocol) reduced to fit a 2-core machine: ``--llm-classes`` x
  ``--llm-train`` training / ``--llm-test`` test examples per class on ``--llm-task`` (default 10 x 20 / 2
  on "math"); identification AUC (same class ranked most helpful) averaged over the test prompts.

Per setting and method: store bytes, gradient-pass seconds (training store + queries), scoring seconds
(the curvature fit of kfac/ekfac shown on its own), the Pearson / Spearman correlation with the SAME method
unprojected, with unprojected exact and with exact at the same k (for the LLM task: means over test
prompts), and the task's AUC. The gradient-pass seconds of the main run are as they came on a shared
machine; ``--timing`` measures them in alternating rounds on the same models (best round).

    python benchmarks/bench_projection.py --out runs/bench_projection              # both tasks (~1 h on 2 cores)
    python benchmarks/bench_projection.py --tasks mislabeled --quick --out /tmp/bp  # smoke run
    python benchmarks/bench_projection.py --timing --out runs/bench_projection      # gradient pass only, alternating

Writes ``<out>/projection.json`` and prints the markdown table docs/results.md holds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from datainf.attributor import Attributor  # noqa: E402
from datainf.experiments.common import method_options  # noqa: E402
from datainf.gradients import ProjectionSettings  # noqa: E402
from datainf.metrics import pearson, roc_auc, spearman  # noqa: E402


def store_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in (path / "chunks").rglob("*.npy"))


def _label(dim: int | None) -> str:
    return "full" if dim is None else f"k={dim}"


def _score_all(attributor: Attributor, queries: dict, methods: tuple[str, ...], lissa_iterations: int,
               mean_query: bool) -> dict[str, Any]:
    out = {}
    for m in methods:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # lissa's not-converged warning: its residual is in the JSON
            t0 = time.perf_counter()
            r = attributor.score(queries, method=m, mean_query=mean_query, save=False,
                                 **method_options(m, lissa_iterations))
            wall = time.perf_counter() - t0
        out[m] = {"scores": r.scores.double().cpu().numpy(), "wall_s": wall,
                  "curvature_s": r.curvature_seconds if r.arguments.method in ("kfac", "ekfac") else 0.0}
    return out


def _one_setting(make_attributor, train_records, query_records, dim, store, methods, lissa_iterations,
                 mean_query) -> dict[str, Any]:
    if store.exists():
        shutil.rmtree(store)
    projection = None if dim is None else ProjectionSettings(dim=dim, seed=0)
    attributor = make_attributor(store, projection)
    t0 = time.perf_counter()
    attributor.fit(train_records)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    queries = attributor.gradients(query_records, desc=None)
    query_s = time.perf_counter() - t0
    entry = {"dim": dim, "store_bytes": store_bytes(store), "train_gradient_s": train_s, "query_gradient_s": query_s,
             "numbers_per_example": sum(int(np.prod(s)) for s in attributor.store.block_shapes.values()),
             "methods": _score_all(attributor, queries, methods, lissa_iterations, mean_query)}
    shutil.rmtree(store)
    return entry


def _compare(settings: list[dict], metric) -> None:
    """Fill each method's correlations with the unprojected same method, unprojected exact and exact at the
    same projection (how far the method's own approximation is, inside the projected space), and its AUC."""
    full = next(s for s in settings if s["dim"] is None)["methods"]
    for s in settings:
        for m, r in s["methods"].items():
            r["auc"] = metric(r["scores"])
            for ref_name, ref in (("same", full[m]["scores"]), ("exact", full.get("exact", {}).get("scores")),
                                  ("exact_same_k", s["methods"].get("exact", {}).get("scores"))):
                if ref is None:
                    continue
                p, sp = _correlations(r["scores"], ref)
                r[f"pearson_{ref_name}"], r[f"spearman_{ref_name}"] = p, sp


def _correlations(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    ps, ss = [], []
    for j in range(a.shape[1]):
        ps.append(pearson(a[:, j], b[:, j]))
        ss.append(spearman(a[:, j], b[:, j]))
    return float(np.mean(ps)), float(np.mean(ss))


# ------------------------------------------------------------------------------------------------ the tasks
def run_mislabeled(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from datainf.experiments.mislabeled import MislabeledSettings, finetune, model_record, noisy_split

    settings = MislabeledSettings(n_train=200, n_val=50, epochs=1) if args.quick else MislabeledSettings()
    train, val, num_labels = noisy_split(settings, None)
    model, tokenizer, finetune_s, metrics = finetune(settings, train, val, num_labels, progress=False)
    flipped = np.array([r["flipped"] for r in train])

    def make(store, projection):
        return Attributor(model, task="classification", store=store, tokenizer=tokenizer,
                          batch_size=settings.grad_batch_size, max_length=settings.max_length, progress=False,
                          projection=projection)

    rows = [_one_setting(make, [model_record(r) for r in train], [model_record(r) for r in val], dim,
                         out / "store-mislabeled", settings.methods, settings.lissa_iterations, True)
            for dim in [None, *args.dims]]
    _compare(rows, lambda s: roc_auc(s[:, 0], flipped))
    return {"task": "mislabeled", "settings": {"n_train": settings.n_train, "n_val": settings.n_val,
                                               "rank": settings.rank, "noise": settings.noise_fraction},
            "validation_accuracy": metrics["accuracy"], "finetune_s": finetune_s, "auc_label": "mislabel AUC",
            "rows": rows}


def run_llm(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from datainf.experiments.llm_identification import (
        LLM_TRAINING,
        LLMIdentificationSettings,
        finetune,
        identification_metrics,
        load_model,
        prompts_and_responses,
        protocol_collator,
        protocol_records,
        task_records,
    )
    from datainf.models.finetune import TrainSettings

    sizes = (3, 4, 1) if args.quick else (args.llm_classes, args.llm_train, args.llm_test)
    settings = LLMIdentificationSettings(task=args.llm_task, classes=sizes[0], train_per_class=sizes[1],
                                         test_per_class=sizes[2],
                                         train=TrainSettings(**(LLM_TRAINING | {"epochs": 1 if args.quick else 2})))
    train, test = task_records(settings)
    train_pr, test_pr = prompts_and_responses(train), prompts_and_responses(test)
    model, tokenizer, name = load_model(settings, None, None)
    _, stats, loss_after, _ = finetune(settings, model, tokenizer, train_pr, test_pr, progress=False)
    collate = protocol_collator(settings, tokenizer, "gradients")
    train_labels, test_labels = np.array([r["label"] for r in train]), np.array([r["label"] for r in test])

    def make(store, projection):
        return Attributor(model, task=collate.task, store=store, tokenizer=tokenizer, collate=collate,
                          batch_size=settings.grad_batch_size, progress=False, projection=projection)

    rows = [_one_setting(make, protocol_records(settings, train_pr, "gradients"),
                         protocol_records(settings, test_pr, "gradients"), dim, out / "store-llm", settings.methods,
                         settings.lissa_iterations, False)
            for dim in [None, *args.dims]]
    _compare(rows, lambda s: identification_metrics(s, train_labels, test_labels)["auc"])
    return {"task": "llm", "settings": {"task": settings.task, "classes": sizes[0], "train_per_class": sizes[1],
                                        "test_per_class": sizes[2], "rank": settings.lora.rank,
                                        "protocol": settings.protocol, "epochs": settings.train.epochs},
            "model": name, "test_loss_after": loss_after, "finetune_s": stats["seconds"],
            "auc_label": "identification AUC", "rows": rows}


# ------------------------------------------------------------------------------------------------ output
def table(result: dict[str, Any]) -> str:
    rows = result["rows"]
    full = next(r for r in rows if r["dim"] is None)
    lines = ["| setting | store MB | numbers / example | gradient pass s | method | scoring s | pearson / spearman "
             "with same method unprojected | pearson / spearman with exact unprojected | pearson with exact at the "
             "same k | " + result["auc_label"] + " |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        first = True
        for m, e in r["methods"].items():
            fit = f" (fit {e['curvature_s']:.2f})" if e["curvature_s"] else ""
            head = (f"| {_label(r['dim'])} | {r['store_bytes'] / 1e6:.1f} ({full['store_bytes'] / r['store_bytes']:.1f}x "
                    f"less) | {r['numbers_per_example']:,} | {r['train_gradient_s'] + r['query_gradient_s']:.1f} "
                    if first else "| | | | ")
            if r["dim"] is None:
                head = head.replace(" (1.0x less)", "")
            lines.append(head + f"| {m} | {e['wall_s']:.2f}{fit} | {e['pearson_same']:.3f} / {e['spearman_same']:.3f} | "
                         f"{e.get('pearson_exact', float('nan')):.3f} / {e.get('spearman_exact', float('nan')):.3f} | "
                         f"{e.get('pearson_exact_same_k', float('nan')):.3f} | {e['auc']:.3f} |")
            first = False
    return "\n".join(lines)


def timing(args: argparse.Namespace) -> dict[str, Any]:
    """The gradient pass of each setting on the same LoRA models (as loaded: the cost does not depend on the
    weights), in alternating rounds so that a shared machine's load falls on every setting alike; best round."""
    from datainf.data.assets import minilm_dir
    from datainf.data.collate import TextCollator
    from datainf.data.generation import make_task
    from datainf.data.text import load_text_dataset
    from datainf.models.finetune import LoraSettings, load_classifier
    from datainf.models.llm import load_causal_lm, smollm2_dir

    n = 16 if args.quick else args.timing_examples
    cases = {}
    model, tok = load_classifier(minilm_dir(), 2, LoraSettings(rank=4, target_modules=("value",)))
    cases["mislabeled"] = (model, TextCollator(tok, task="classification", max_length=64), "classification",
                           [{"text": r["text"], "label": r["label"]} for r in load_text_dataset("rotten_tomatoes")[:n]])
    model, tok = load_causal_lm(str(smollm2_dir()), LoraSettings(rank=8, alpha=32, target_modules=("q_proj", "v_proj"),
                                                                 modules_to_save=()), device="cpu", seed=0)
    records = [{"prompt": r["prompt"], "response": r["response"]} for r in make_task(args.llm_task, 10, 4)][:n]
    cases["llm"] = (model, TextCollator(tok, task="causal_lm", max_length=128), "causal_lm", records)
    out: dict[str, Any] = {"examples": n, "rounds": args.timing_rounds}
    for task, (model, collate, loss, recs) in cases.items():
        best: dict[str, float] = {}
        for _ in range(args.timing_rounds):
            for dim in [None, *args.dims]:
                attributor = Attributor(model, task=loss, store=Path(args.out) / "unused", collate=collate,
                                        batch_size=8, progress=False,
                                        projection=None if dim is None else ProjectionSettings(dim=dim, seed=0))
                t0 = time.perf_counter()
                attributor.gradients(recs, desc=None)
                best[_label(dim)] = min(best.get(_label(dim), float("inf")), time.perf_counter() - t0)
        out[task] = best
        print(f"gradient pass of {n} examples, {task}, best of {args.timing_rounds} alternating rounds: "
              + ", ".join(f"{k} {v:.2f} s ({v / best['full']:.2f}x)" for k, v in best.items()), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="mislabeled,llm")
    ap.add_argument("--dims", default="16,64,256")
    ap.add_argument("--llm-task", default="math")
    ap.add_argument("--llm-classes", type=int, default=10)
    ap.add_argument("--llm-train", type=int, default=20)
    ap.add_argument("--llm-test", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--timing-examples", type=int, default=64, help="examples per timed gradient pass (--timing)")
    ap.add_argument("--timing-rounds", type=int, default=3)
    ap.add_argument("--timing", action="store_true", help="only time the gradient pass of every setting")
    ap.add_argument("--out", default="runs/bench_projection")
    args = ap.parse_args(argv)
    args.dims = [int(x) for x in args.dims.split(",") if x]
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.timing:
        result = timing(args)
        (out / "timing.json").write_text(json.dumps(result, indent=1))
        return 0
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(),
               "load_average_start": os.getloadavg(), "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "tasks": {}}
    for task in [t for t in args.tasks.split(",") if t]:
        t0 = time.perf_counter()
        result = {"mislabeled": run_mislabeled, "llm": run_llm}[task](args, out)
        result["wall_s"] = time.perf_counter() - t0
        results["tasks"][task] = result
        print(f"\n## {task} ({result['wall_s']:.0f} s)\n\n{table(result)}\n", flush=True)
        results["load_average_end"] = os.getloadavg()
        np.savez(out / f"scores-{task}.npz", **{f"{_label(r['dim'])}/{m}": e["scores"] for r in result["rows"]
                                               for m, e in r["methods"].items()})
        serial = json.loads(json.dumps(results, default=lambda x: None if isinstance(x, np.ndarray) else str(x)))
        (out / "projection.json").write_text(json.dumps(serial, indent=1))
    print(f"load average at start {results['load_average_start']}, at end {results['load_average_end']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
