"""Issue 29: which weighting of a run's checkpoints predicts retraining, judged afterwards on an ``experiment lds
--checkpoints K`` folder (its cached retrains and each checkpoint's scores, rows ``<method>@step<S>``).

Usage: python scripts/issue29_weights.py FOLDER [--methods ekfac,datainf]

FOLDER is an ``experiment lds --checkpoints K`` folder (judged by LDS) or an ``experiment llm-identification
--checkpoints K`` folder (judged by identification AUC and recall@10, from scores.safetensors and its labels).

For each method prints the LDS (mean over queries, +- sd / sqrt(queries)) of: each checkpoint alone; the run as
``datainf finetune`` weighs it (each checkpoint's learning-rate weight, the row ``<method>+run``); the same
weights with each checkpoint's scores first divided by their standard deviation over all (example, query)
pairs (a preconditioned score does not shrink as the gradients do, so the later checkpoints weigh in as much
as step 0); the weights squared; and the uniform sum of standardized scores. Every number is computed here
from scores.json and subsets/*.json with :func:`datainf.experiments.lds.lds` (Spearman per query).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from datainf.experiments.lds import LdsSettings, lds, subset_masks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--methods", default=None, help="comma-separated (default: every method with checkpoint rows)")
    args = ap.parse_args()
    out = Path(args.folder)
    if (out / "scores.safetensors").is_file() and not (out / "scores.json").is_file():
        return identification(out, args.methods)
    settings = json.loads((out / "settings.json").read_text())
    s = LdsSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()
                       if k in LdsSettings.__dataclass_fields__})
    scores = json.loads((out / "scores.json").read_text())
    subsets = sorted((out / "subsets").glob("*.json"))
    losses = np.array([json.loads(p.read_text()) for p in subsets], dtype=np.float64)
    n_train = len(scores[next(k for k in scores if not k.endswith(("seconds", "weight")))])
    masks = subset_masks(s, n_train)[: len(subsets)]
    methods = args.methods.split(",") if args.methods else sorted(
        {k.partition("@")[0] for k in scores if "@step" in k and ":" not in k})
    print(f"{out}: {len(subsets)} retrained subsets, {losses.shape[1]} queries\n")

    def row(label: str, x: np.ndarray) -> None:
        mean, per_query = lds(x, masks, losses)
        print(f"  {label:<44} {mean:.3f} +- {np.std(per_query) / np.sqrt(len(per_query)):.3f}")

    if "resemblance" in scores:
        row("control: resemblance", np.array(scores["resemblance"], dtype=np.float64))
        print()
    for m in methods:
        steps = sorted((k for k in scores if k.startswith(m + "@step") and ":" not in k),
                       key=lambda k: int(k.rpartition("step")[2]))
        S = {k: np.array(scores[k], dtype=np.float64) for k in steps}
        w = {k: float(scores[k + ":weight"]) for k in steps}
        z = {k: S[k] / (S[k].std() or 1.0) for k in steps}
        print(f"{m}:")
        for k in steps:
            row(f"step {k.rpartition('step')[2]} alone (weight {w[k]:.2e})", S[k])
        row("run, learning-rate weights (the +run row)", np.array(scores[m + "+run"], dtype=np.float64))
        row("run, lr weights on standardized scores", sum(w[k] * z[k] for k in steps))
        row("run, squared lr weights on standardized scores", sum(w[k] ** 2 * z[k] for k in steps))
        row("run, uniform on standardized scores", sum(z[k] for k in steps))
        print()


def identification(out: Path, methods_arg: str | None) -> None:
    """The same weightings judged by identification (AUC and recall@10 of the query's class)."""
    from datainf.experiments.llm_identification import identification_metrics
    from datainf.scoring import load_scores

    saved = load_scores(out / "scores.safetensors")
    extra = saved.extra if hasattr(saved, "extra") else {}
    results = json.loads((out / "results.json").read_text())
    train_labels = np.array(extra.get("train_labels") or [json.loads(x)["label"] for x in
                                                           (out / "train.jsonl").read_text().splitlines() if x])
    test_labels = np.array(extra.get("test_labels") or [json.loads(x)["label"] for x in
                                                        (out / "test.jsonl").read_text().splitlines() if x])
    weight = {row["step"]: float(row["lr"]) for row in results["checkpoints"]}
    scores = {k: v.double().numpy() for k, v in saved.scores.items()}
    methods = methods_arg.split(",") if methods_arg else sorted({k.partition("@")[0] for k in scores if "@step" in k})
    print(f"{out}: identification, {len(test_labels)} queries, steps {sorted(weight)}\n")

    def row(label: str, x: np.ndarray) -> None:
        m = identification_metrics(x, train_labels, test_labels)
        print(f"  {label:<44} AUC {m['auc']:.3f}  recall@10 {m['recall']:.3f}")

    for m in methods:
        steps = sorted(weight)
        S = {s: scores[f"{m}@step{s}"] for s in steps}
        z = {s: S[s] / (S[s].std() or 1.0) for s in steps}
        print(f"{m}:")
        for s in steps:
            row(f"step {s} alone (weight {weight[s]:.2e})", S[s])
        row("run, learning-rate weights (the +run row)", scores[m + "+run"])
        row("run, lr weights on standardized scores", sum(weight[s] * z[s] for s in steps))
        row("run, squared lr weights on standardized scores", sum(weight[s] ** 2 * z[s] for s in steps))
        row("run, uniform on standardized scores", sum(z[s] for s in steps))
        print()


if __name__ == "__main__":
    main()
