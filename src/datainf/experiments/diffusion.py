"""The paper's diffusion experiments (section 4.3, table 2), scaled to a CPU: style and subject attribution.

A small text-conditional UNet pre-trained on plain MNIST digits (datainf.models.diffusion.base_model) is LoRA
fine-tuned on

* style:   digits drawn in three styles (inverted, sketch, pixel), prompted "an image in {style} style of
  {class}"; queries are held-out styled digits. A training image is relevant to a query when it has the
  query's style.
* subject: DreamBooth-style subjects (one MNIST image and its small augmentations, bound to a made-up word:
  "an image of {word} digit"); queries are unseen augmentations of each subject. Relevant = same subject.

Every training image's influence on every query's denoising loss (datainf.tasks.DiffusionLoss) is
computed with each method; training images are ranked by helpfulness (-score) and scored per query with
ROC AUC (relevant vs not) and recall among the top k (k = number of relevant training images), averaged
over queries. Outputs: results.json, scores.safetensors, report.html (each query beside its most helpful and most
harmful training images, written by datainf.report.images). :func:`run` returns a :class:`DiffusionResult`;
its ``to_dict()`` is what results.json holds.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datainf.attributor import Attributor
from datainf.data.collate import DiffusionCollate
from datainf.errors import DataInfError
from datainf.estimators import ScoreArguments, ScoreResult
from datainf.estimators.defaults import DEFAULT_METHOD, DIFFUSION_METHODS, PLAIN_METHOD, REFERENCE_METHOD
from datainf.experiments.common import check_methods, present, settings_dict, write_results
from datainf.experiments.llm_identification import CONTROL, cosine_control, score_along_run, with_checkpoints
from datainf.metrics import pearson, recall_at_k, roc_auc, spearman
from datainf.models.checkpoints import Snapshots, snapshot_steps
from datainf.models.diffusion import PromptEncoder, add_lora, base_model, make_scheduler, train_denoiser
from datainf.scoring import save_scores
from datainf.tasks import PAPER_TIMESTEPS, DiffusionLoss
from datainf.version import __version__

log = logging.getLogger("datainf.experiments")

#: the paper's table 2 (stable-diffusion-v1.5, LoRA), for the results page
PAPER = {
    "style": {DEFAULT_METHOD: {"auc": 0.820, "recall": 0.687}, PLAIN_METHOD: {"auc": 0.692, "recall": 0.533}},
    "subject": {DEFAULT_METHOD: {"auc": 0.865, "recall": 0.315}, PLAIN_METHOD: {"auc": 0.820, "recall": 0.210}},
}


@dataclass
class DiffusionSettings:
    """Settings of one run. Defaults: the full CPU runs in docs/results.md (diffusion section)."""

    experiment: str = "style"              # "style" or "subject"
    n_train_per_style: int = 30
    n_test_per_style: int = 5
    n_subjects: int = 30
    views: int = 3
    rank: int = 4
    steps: int = 160                       # LoRA fine-tuning steps
    batch_size: int = 16
    learning_rate: float = 5e-3
    timesteps: tuple[int, ...] = PAPER_TIMESTEPS
    noise_draws: int = 1
    methods: tuple[str, ...] = DIFFUSION_METHODS
    damping: float | None = None           # None: the paper's rule per block
    grad_batch_size: int = 16
    seed: int = 0
    base: str | None = None                # None: the cached pre-trained base (built if missing)
    checkpoints: int = 0                   # > 0: also score at step 0 and this many steps, and summed (issue 29)
    control: bool = False                  # also the resemblance control (pixel cosine; not influence)

    def __post_init__(self) -> None:
        if self.experiment not in ("style", "subject"):
            raise DataInfError(f"experiment must be 'style' or 'subject', got {self.experiment!r}")
        check_methods(self.methods)
        if not self.methods:
            raise DataInfError("give at least one method")
        if self.steps < 1 or self.rank < 1 or self.batch_size < 1 or self.grad_batch_size < 1:
            raise DataInfError("steps, rank, batch_size and grad_batch_size must be >= 1")
        if self.checkpoints < 0:
            raise DataInfError(f"checkpoints must be >= 0, got {self.checkpoints}")


@dataclass
class DiffusionMethod:
    """One method's attribution metrics, averaged over queries (see :func:`attribution_metrics`)."""

    auc: float
    recall: float
    top1: float
    chance_auc: float
    chance_recall: float
    chance_top1: float
    seconds: float
    pearson_with_exact: float | None = None   # when exact ran: over all (train, query) pairs
    spearman_with_exact: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"auc": self.auc, "recall": self.recall, "top1": self.top1, "chance_auc": self.chance_auc,
                "chance_recall": self.chance_recall, "chance_top1": self.chance_top1, "seconds": self.seconds,
                **present(self, "pearson_with_exact", "spearman_with_exact")}


@dataclass
class DiffusionResult:
    """What one run measured; ``to_dict()`` is results.json."""

    experiment: str                       # "style" or "subject"
    settings: dict[str, Any]
    base: str
    image_size: int
    n_train: int
    n_test: int
    n_blocks: int
    n_lora_parameters: int
    test_loss_base: float
    test_loss_lora: float
    finetune_first_last_loss: list[float]
    finetune_seconds: float
    train_gradient_seconds: float
    query_gradient_seconds: float
    methods: dict[str, DiffusionMethod]
    checkpoints: list[dict[str, Any]] | None = None   # with settings.checkpoints: each checkpoint alone
    wall_seconds: float | None = None
    library_version: str = __version__
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))
    torch_threads: int = field(default_factory=torch.get_num_threads)

    def to_dict(self) -> dict[str, Any]:
        out = {"library_version": self.library_version, "created": self.created,
               "experiment": f"diffusion-{self.experiment}", "settings": self.settings, "base": self.base,
               "image_size": self.image_size, "n_train": self.n_train, "n_test": self.n_test,
               "n_blocks": self.n_blocks, "n_lora_parameters": self.n_lora_parameters,
               "test_loss_base": self.test_loss_base, "test_loss_lora": self.test_loss_lora,
               "finetune_first_last_loss": self.finetune_first_last_loss,
               "finetune_seconds": self.finetune_seconds, "train_gradient_seconds": self.train_gradient_seconds,
               "query_gradient_seconds": self.query_gradient_seconds,
               "methods": {m: r.to_dict() for m, r in self.methods.items()}, "paper": PAPER[self.experiment],
               "torch_threads": self.torch_threads}
        return out | present(self, "checkpoints", "wall_seconds")


def image_records(settings: DiffusionSettings, image_size: int) -> tuple[list[dict], list[dict], str]:
    from datainf.data.images import style_sets, subject_sets

    if settings.experiment == "style":
        train, test = style_sets(settings.n_train_per_style, settings.n_test_per_style, image_size, settings.seed)
        return train, test, "style"
    train, test = subject_sets(settings.n_subjects, settings.views, image_size, settings.seed)
    return train, test, "subject"


@torch.no_grad()
def mean_loss(model: torch.nn.Module, task: DiffusionLoss, collate: DiffusionCollate, records: list[dict],
               device: str, batch_size: int) -> float:
    total = 0.0
    for start in range(0, len(records), batch_size):
        batch = {k: v.to(device) for k, v in collate(records[start : start + batch_size]).items()}
        total += float(task(model, batch).sum())
    return total / len(records)


def attribution_metrics(scores: np.ndarray, train_groups: list[Any], test_groups: list[Any]) -> dict[str, float]:
    """Per-query ranking of training images by helpfulness (-score), averaged over queries.

    scores: (n_train, n_query), positive = harmful. A training image is relevant to query j when its group
    equals the query's. Returns mean AUC, mean recall at k (k = number of relevant images), the share of
    queries whose most helpful training image is relevant (top1), and the random-ranking expectations.
    """
    train_groups_arr = np.array(train_groups, dtype=object)
    aucs, recalls, top1, chance_recall = [], [], [], []
    for j, group in enumerate(test_groups):
        relevant = train_groups_arr == group
        k = int(relevant.sum())
        if k == 0 or k == len(relevant):
            continue
        helpful = -scores[:, j]
        aucs.append(roc_auc(helpful, relevant))
        recalls.append(recall_at_k(helpful, relevant, k))
        top1.append(float(relevant[int(np.argmax(helpful))]))
        chance_recall.append(k / len(relevant))
    if not aucs:
        raise DataInfError("no query has both relevant and irrelevant training images")
    return {"auc": float(np.mean(aucs)), "recall": float(np.mean(recalls)), "top1": float(np.mean(top1)),
            "chance_auc": 0.5, "chance_recall": float(np.mean(chance_recall)),
            "chance_top1": float(np.mean(chance_recall))}


def run(settings: DiffusionSettings, out_dir: str | os.PathLike, *, device: str = "cpu", progress: bool = True,
        unet: torch.nn.Module | None = None, encoder: PromptEncoder | None = None,
        rebuild_base: bool = False) -> DiffusionResult:
    """Run the style or subject experiment; write results.json, scores.safetensors and report.html to out_dir.

    unet: a base UNet2DConditionModel to use instead of the cached pre-trained one (tests pass a tiny
    random one). encoder: the prompt encoder (default MiniLM).
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_dir = None
    if unet is None:
        unet, base_dir = base_model(settings.base, rebuild=rebuild_base, device=device, progress=progress)
    unet = copy.deepcopy(unet).to(device)
    image_size = int(unet.config.sample_size)
    collate = DiffusionCollate(encoder or PromptEncoder())
    train, test, group_key = image_records(settings, image_size)
    torch.manual_seed(settings.seed)
    tuned = finetune(settings, unet, collate, train, test, device, progress)
    attributor = Attributor(tuned.model, task=tuned.task, store=out / "store", collate=collate,
                            batch_size=settings.grad_batch_size, progress=progress, device=device)
    query_grads, train_seconds, query_seconds = gradients(attributor, train, test)
    arguments = {m: ScoreArguments(method=m, damping=settings.damping) for m in settings.methods}
    per_step: list[dict[str, Any]] = []
    if tuned.snapshots is not None:
        def gradients_at(store: Path) -> tuple[Any, dict[str, torch.Tensor]]:
            at = Attributor(tuned.model, task=tuned.task, store=store, collate=collate,
                            batch_size=settings.grad_batch_size, progress=progress, device=device)
            queries, _, _ = gradients(at, train, test)
            return at.store, queries

        scored, per_step = score_along_run(tuned.snapshots, gradients_at, arguments,
                                           (attributor.store, query_grads), out / "store-run")
    else:
        scored = {m: attributor.score(query_grads, a, save=False) for m, a in arguments.items()}
    if settings.control:
        scored[CONTROL] = pixel_resemblance(train, test)
    scores = {m: r.scores.double().cpu().numpy() for m, r in scored.items()}
    groups = [r[group_key] for r in train], [r[group_key] for r in test]
    result = DiffusionResult(
        experiment=settings.experiment, settings=settings_dict(settings),
        base=str(base_dir) if base_dir is not None else "given", image_size=image_size, n_train=len(train),
        n_test=len(test), n_blocks=len(query_grads),
        n_lora_parameters=int(sum(v[0].numel() for v in query_grads.values())),
        test_loss_base=tuned.base_test_loss, test_loss_lora=tuned.test_loss,
        finetune_first_last_loss=[float(np.mean(tuned.losses[:10])), float(np.mean(tuned.losses[-10:]))],
        finetune_seconds=tuned.seconds, train_gradient_seconds=train_seconds, query_gradient_seconds=query_seconds,
        methods=method_outcomes(scored, scores, *groups),
        checkpoints=[{"step": row["step"], "lr": row["lr"], "methods": {
            name: {k: v for k, v in attribution_metrics(term.scores.double().cpu().numpy(), *groups).items()
                   if not k.startswith("chance")}
            for name, term in row["scores"].items()}} for row in per_step] or None)
    write_outputs(result, out, settings, train, test, group_key, with_checkpoints(scored, per_step), scores,
                  attributor)
    result.wall_seconds = time.perf_counter() - t_start
    write_results(out / "results.json", result.to_dict())
    return result


#: the name callers know
run_diffusion = run


@dataclass
class FineTuned:
    """The LoRA-tuned denoiser, its attribution loss, and how the fine-tuning went."""

    model: torch.nn.Module
    task: DiffusionLoss
    losses: list[float]
    seconds: float
    base_test_loss: float                 # the queries' loss under the base model (adapter off)
    test_loss: float                      # and after LoRA fine-tuning
    snapshots: Snapshots | None = None    # with settings.checkpoints: step 0 and the snapshots' weights


def finetune(settings: DiffusionSettings, unet: torch.nn.Module, collate: DiffusionCollate, train: list[dict],
             test: list[dict], device: str, progress: bool) -> FineTuned:
    """LoRA fine-tuning on the styled / subject images, with the queries' loss before and after."""
    model = add_lora(unet, rank=settings.rank, seed=settings.seed)
    task = DiffusionLoss(make_scheduler(), settings.timesteps, settings.noise_draws, seed=settings.seed)
    with model.disable_adapter():
        base_test_loss = mean_loss(model, task, collate, test, device, settings.grad_batch_size)
    snapshots = (Snapshots(model, snapshot_steps(settings.checkpoints, settings.steps), initial=True)
                 if settings.checkpoints else None)
    t0 = time.perf_counter()
    losses = train_denoiser(model, train, collate, steps=settings.steps, batch_size=settings.batch_size,
                            learning_rate=settings.learning_rate, seed=settings.seed, device=device,
                            progress=progress, on_step=snapshots.on_step if snapshots is not None else None)
    seconds = time.perf_counter() - t0
    test_loss = mean_loss(model, task, collate, test, device, settings.grad_batch_size)
    return FineTuned(model, task, losses, seconds, base_test_loss, test_loss, snapshots)


def pixel_resemblance(train: list[dict], test: list[dict]) -> ScoreResult:
    """The resemblance control: minus the cosine of the images' pixels, training image vs query (n_train,
    n_query); negative = helpful, as influence scores. Look-alikes, not influence: an attribution method
    must do better than this on what resemblance cannot see (retraining)."""
    t0 = time.perf_counter()
    return cosine_control(torch.stack([r["image"].double().flatten() for r in train]),
                          torch.stack([r["image"].double().flatten() for r in test]), t0,
                          "-cosine of the images' pixels, training image vs query")


def gradients(attributor: Attributor, train: list[dict], test: list[dict]):
    """Per-example gradients of the fixed-timestep denoising loss: training images into the store, queries in
    memory. Returns (query gradients, training seconds, query seconds)."""
    t0 = time.perf_counter()
    attributor.fit(train)
    train_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    query_grads = attributor.gradients(test)
    return query_grads, train_seconds, time.perf_counter() - t0


def method_outcomes(scored: dict[str, ScoreResult], scores: dict[str, np.ndarray], train_groups: list[Any],
                    test_groups: list[Any]) -> dict[str, DiffusionMethod]:
    """Per method: attribution metrics, time, and (when exact ran) the correlations with exact."""
    outcomes = {}
    for m, result in scored.items():
        outcomes[m] = DiffusionMethod(**attribution_metrics(scores[m], train_groups, test_groups),
                                      seconds=result.seconds)
        log.info("%s: %s", m, outcomes[m].to_dict())
    if REFERENCE_METHOD in scores:
        for m, s in scores.items():
            outcomes[m].pearson_with_exact = pearson(s.ravel(), scores[REFERENCE_METHOD].ravel())
            outcomes[m].spearman_with_exact = spearman(s.ravel(), scores[REFERENCE_METHOD].ravel())
    return outcomes


def write_outputs(result: DiffusionResult, out: Path, settings: DiffusionSettings, train: list[dict],
                  test: list[dict], group_key: str, scored: dict[str, ScoreResult], scores: dict[str, np.ndarray],
                  attributor: Attributor) -> None:
    """scores.safetensors and report.html under datainf's scores (results.json is written last, by :func:`run`)."""
    from datainf.report.images import write_image_report

    save_scores(out / "scores.safetensors", scored, train_store=attributor.store,
                extra={"experiment": f"diffusion-{settings.experiment}"})
    report_method = DEFAULT_METHOD if DEFAULT_METHOD in scores else next(iter(scores))
    write_image_report(out / "report.html", results=result.to_dict(), train=train, test=test,
                       scores=scores[report_method], method=report_method, group_key=group_key)


def format_table(result: DiffusionResult) -> str:
    """The printed table: one row per method, the paper's numbers beside."""
    paper_numbers = PAPER[result.experiment]
    w = max(10, *(len(m) for m in result.methods))
    lines = [f"{'method':<{w}} {'AUC':>7} {'recall':>7} {'top1':>6} {'seconds':>8}  paper AUC / recall", "-" * (w + 52)]
    for m, r in result.methods.items():
        p = paper_numbers.get(m, {})
        paper = f"{p['auc']:.3f} / {p['recall']:.3f}" if p else "n/a"
        lines.append(f"{m:<{w}} {r.auc:7.3f} {r.recall:7.3f} {r.top1:6.3f} {r.seconds:8.2f}  {paper}")
    first = next(iter(result.methods.values()))
    lines.append(f"(chance: AUC 0.5, recall {first.chance_recall:.3f}; identity = Hessian-free)")
    return "\n".join(lines)


__all__ = ["PAPER", "DiffusionMethod", "DiffusionResult", "DiffusionSettings", "attribution_metrics",
           "format_table", "run", "run_diffusion"]
