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
harmful training images).
"""

from __future__ import annotations

import base64
import copy
import html
import io
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from torch import Tensor

from datainf import atomic
from datainf.attributor import Attributor
from datainf.data.collate import DiffusionCollate
from datainf.errors import DataInfError
from datainf.estimators import method_names
from datainf.metrics import pearson, recall_at_k, roc_auc, spearman
from datainf.models.diffusion import PromptEncoder, add_lora, base_model, make_scheduler, train_denoiser
from datainf.scoring import save_scores
from datainf.tasks import PAPER_TIMESTEPS, DiffusionLoss
from datainf.version import __version__

log = logging.getLogger("datainf.experiments")

#: the paper's table 2 (stable-diffusion-v1.5, LoRA), for the results page
PAPER = {
    "style": {"datainf": {"auc": 0.820, "recall": 0.687}, "identity": {"auc": 0.692, "recall": 0.533}},
    "subject": {"datainf": {"auc": 0.865, "recall": 0.315}, "identity": {"auc": 0.820, "recall": 0.210}},
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
    methods: tuple[str, ...] = ("datainf", "identity", "exact")
    damping: float | None = None           # None: the paper's rule per block
    grad_batch_size: int = 16
    seed: int = 0
    base: str | None = None                # None: the cached pre-trained base (built if missing)

    def __post_init__(self) -> None:
        if self.experiment not in ("style", "subject"):
            raise DataInfError(f"experiment must be 'style' or 'subject', got {self.experiment!r}")
        for m in self.methods:
            if m not in method_names():
                raise DataInfError(f"unknown method '{m}'; choose from {', '.join(method_names())}")
        if not self.methods:
            raise DataInfError("give at least one method")
        if self.steps < 1 or self.rank < 1 or self.batch_size < 1 or self.grad_batch_size < 1:
            raise DataInfError("steps, rank, batch_size and grad_batch_size must be >= 1")


def _records(settings: DiffusionSettings, image_size: int) -> tuple[list[dict], list[dict], str]:
    from datainf.data.images import style_sets, subject_sets

    if settings.experiment == "style":
        train, test = style_sets(settings.n_train_per_style, settings.n_test_per_style, image_size, settings.seed)
        return train, test, "style"
    train, test = subject_sets(settings.n_subjects, settings.views, image_size, settings.seed)
    return train, test, "subject"


@torch.no_grad()
def _mean_loss(model: torch.nn.Module, task: DiffusionLoss, collate: DiffusionCollate, records: list[dict],
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


def run_diffusion(settings: DiffusionSettings, out_dir: str | os.PathLike, *, device: str = "cpu",
                  progress: bool = True, unet: torch.nn.Module | None = None, encoder: PromptEncoder | None = None,
                  rebuild_base: bool = False) -> dict[str, Any]:
    """Run the style or subject experiment; write results.json, scores.safetensors and report.html to out_dir.

    unet: a base UNet2DConditionModel to use instead of the cached pre-trained one (tests pass a tiny
    random one). encoder: the prompt encoder (default MiniLM). Returns the results dict.
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_dir = None
    if unet is None:
        unet, base_dir = base_model(settings.base, rebuild=rebuild_base, device=device, progress=progress)
    unet = copy.deepcopy(unet).to(device)
    image_size = int(unet.config.sample_size)
    encoder = encoder or PromptEncoder()
    collate = DiffusionCollate(encoder)
    train, test, group_key = _records(settings, image_size)
    torch.manual_seed(settings.seed)

    # 1. LoRA fine-tuning on the styled / subject images
    model = add_lora(unet, rank=settings.rank, seed=settings.seed)
    task = DiffusionLoss(make_scheduler(), settings.timesteps, settings.noise_draws, seed=settings.seed)
    with model.disable_adapter():
        base_test_loss = _mean_loss(model, task, collate, test, device, settings.grad_batch_size)
    t0 = time.perf_counter()
    losses = train_denoiser(model, train, collate, steps=settings.steps, batch_size=settings.batch_size,
                            learning_rate=settings.learning_rate, seed=settings.seed, device=device,
                            progress=progress)
    finetune_seconds = time.perf_counter() - t0
    test_loss = _mean_loss(model, task, collate, test, device, settings.grad_batch_size)

    # 2. per-example gradients of the fixed-timestep denoising loss
    attributor = Attributor(model, task=task, store=out / "store", collate=collate,
                            batch_size=settings.grad_batch_size, progress=progress, device=device)
    t0 = time.perf_counter()
    attributor.fit(train)
    train_gradient_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    query_grads = attributor.gradients(test)
    query_gradient_seconds = time.perf_counter() - t0

    # 3. scores and metrics per method
    train_groups = [r[group_key] for r in train]
    test_groups = [r[group_key] for r in test]
    scores: dict[str, np.ndarray] = {}
    methods: dict[str, dict[str, Any]] = {}
    results_by_method = {}
    for method in settings.methods:
        result = attributor.score(query_grads, method=method, damping=settings.damping, save=False)
        results_by_method[method] = result
        scores[method] = result.scores.double().cpu().numpy()
        methods[method] = {**attribution_metrics(scores[method], train_groups, test_groups),
                           "seconds": result.seconds}
        log.info("%s: %s", method, methods[method])
    if "exact" in scores:
        for method, s in scores.items():
            methods[method]["pearson_with_exact"] = pearson(s.ravel(), scores["exact"].ravel())
            methods[method]["spearman_with_exact"] = spearman(s.ravel(), scores["exact"].ravel())

    results = {
        "library_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "experiment": f"diffusion-{settings.experiment}",
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()},
        "base": str(base_dir) if base_dir is not None else "given",
        "image_size": image_size,
        "n_train": len(train),
        "n_test": len(test),
        "n_blocks": len(query_grads),
        "n_lora_parameters": int(sum(v[0].numel() for v in query_grads.values())),
        "test_loss_base": base_test_loss,
        "test_loss_lora": test_loss,
        "finetune_first_last_loss": [float(np.mean(losses[:10])), float(np.mean(losses[-10:]))],
        "finetune_seconds": finetune_seconds,
        "train_gradient_seconds": train_gradient_seconds,
        "query_gradient_seconds": query_gradient_seconds,
        "methods": methods,
        "paper": PAPER[settings.experiment],
        "torch_threads": torch.get_num_threads(),
    }
    save_scores(out / "scores.safetensors", results_by_method, train_store=attributor.store,
                extra={"experiment": f"diffusion-{settings.experiment}"})
    report_method = "datainf" if "datainf" in scores else next(iter(scores))
    write_image_report(out / "report.html", results=results, train=train, test=test, scores=scores[report_method],
                       method=report_method, group_key=group_key)
    results["wall_seconds"] = time.perf_counter() - t_start
    atomic.write_text(out / "results.json", json.dumps(results, indent=2, default=str))
    return results


# ------------------------------------------------------------------------------------------------- report
def _png(image: Tensor) -> str:
    """A (1, H, W) image in [-1, 1] as a base64 PNG data URI."""
    import matplotlib.image

    array = ((image.detach().float().cpu()[0] + 1) / 2).clamp(0, 1).numpy()
    buffer = io.BytesIO()
    matplotlib.image.imsave(buffer, array, cmap="gray", vmin=0, vmax=1, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def write_image_report(path: str | os.PathLike, *, results: dict, train: list[dict], test: list[dict],
                       scores: np.ndarray, method: str, group_key: str, top_k: int = 5,
                       max_queries: int = 30) -> Path:
    """Self-contained HTML: a table of each method's metrics, then each query image beside its ``top_k`` most
    helpful and most harmful training images under ``method`` (green border: same style/subject)."""
    path = Path(path)
    rows = []
    for m, r in results["methods"].items():
        paper = results.get("paper", {}).get(m, {})
        rows.append(
            f"<tr><td>{html.escape(m)}</td><td>{r['auc']:.3f}</td><td>{r['recall']:.3f}</td><td>{r['top1']:.3f}</td>"
            f"<td>{r['seconds']:.2f}</td><td>{paper.get('auc', 'n/a')}</td><td>{paper.get('recall', 'n/a')}</td></tr>")
    first = next(iter(results["methods"].values()))
    queries = []
    for j, q in enumerate(test[:max_queries]):
        col = scores[:, j]
        cells = [f"<figure><img src='{_png(q['image'])}'><figcaption>query {j}<br>"
                 f"{html.escape(str(q[group_key]))}</figcaption></figure><span class='sep'></span>"]
        for label, order in (("helpful", np.argsort(col)[:top_k]), ("harmful", np.argsort(-col)[:top_k])):
            for i in order:
                same = train[i][group_key] == q[group_key]
                cells.append(f"<figure class='{'same' if same else 'other'}'><img src='{_png(train[i]['image'])}'>"
                             f"<figcaption>{label}<br>#{i} {col[i]:+.2e}</figcaption></figure>")
            cells.append("<span class='sep'></span>")
        queries.append(f"<div class='row'><p>{html.escape(q['prompt'])}</p>{''.join(cells)}</div>")
    settings = html.escape(json.dumps(results.get("settings", {}), default=str))
    text = f"""<!doctype html><html><head><meta charset="utf-8"><title>datainf: {html.escape(results['experiment'])}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:4px 8px}}
figure{{display:inline-block;margin:2px;text-align:center;font-size:10px;border:3px solid transparent}}
figure.same{{border-color:#2a2}} figure.other{{border-color:#c33}}
img{{width:64px;height:64px;image-rendering:pixelated}} .sep{{display:inline-block;width:16px}}
.row p{{margin:.8em 0 .2em}}</style></head><body>
<h1>datainf: {html.escape(results['experiment'])}</h1>
<p>{results['n_train']} training images, {results['n_test']} queries, image size {results['image_size']}.
Training images are ranked by helpfulness (-score); AUC and recall@k (k = number of same-{group_key} training
images) are averaged over queries; top1 = share of queries whose most helpful image has the same {group_key}
(chance: {first['chance_top1']:.3f}; chance recall {first['chance_recall']:.3f}).</p>
<table><tr><th>method</th><th>AUC</th><th>recall@k</th><th>top1</th><th>seconds</th><th>paper AUC</th>
<th>paper recall</th></tr>{''.join(rows)}</table>
<h2>Queries and their most helpful / harmful training images ({html.escape(method)})</h2>
<p>Green border: same {group_key} as the query; red: different. Scores: positive = harmful.</p>
{''.join(queries)}
<h2>Settings</h2><pre>{settings}</pre></body></html>"""
    atomic.write_text(path, text)
    return path


def format_table(results: dict[str, Any]) -> str:
    """The printed table: one row per method, the paper's numbers beside."""
    lines = [f"{'method':<10} {'AUC':>7} {'recall':>7} {'top1':>6} {'seconds':>8}  paper AUC / recall", "-" * 62]
    for m, r in results["methods"].items():
        p = results["paper"].get(m, {})
        paper = f"{p['auc']:.3f} / {p['recall']:.3f}" if p else "n/a"
        lines.append(f"{m:<10} {r['auc']:7.3f} {r['recall']:7.3f} {r['top1']:6.3f} {r['seconds']:8.2f}  {paper}")
    first = next(iter(results["methods"].values()))
    lines.append(f"(chance: AUC 0.5, recall {first['chance_recall']:.3f}; identity = Hessian-free)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- CLI
def _parse_ints(value: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise DataInfError(f"--{name} must be comma-separated integers, got {value!r}") from None


def _common(f):
    options = [
        click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder."),
        click.option("--steps", default=160, show_default=True, help="LoRA fine-tuning steps."),
        click.option("--batch-size", default=16, show_default=True, help="Fine-tuning batch size."),
        click.option("--lr", "learning_rate", default=5e-3, show_default=True, help="LoRA learning rate."),
        click.option("--rank", default=4, show_default=True, help="LoRA rank (alpha = rank)."),
        click.option("--timesteps", default=",".join(map(str, PAPER_TIMESTEPS)), show_default=True,
                     help="Fixed timesteps of the attribution loss."),
        click.option("--methods", default="datainf,identity,exact", show_default=True,
                     help="Comma-separated: datainf, identity, exact, lissa."),
        click.option("--damping", type=float, default=None, help="Damping; default the paper's rule per block."),
        click.option("--grad-batch-size", default=16, show_default=True, help="Examples per gradient pass."),
        click.option("--seed", default=0, show_default=True),
        click.option("--base", default=None, type=click.Path(file_okay=False),
                     help="Pre-trained base UNet folder; default the cached one (built if missing)."),
        click.option("--rebuild-base", is_flag=True, help="Pre-train the base again (a few minutes)."),
        click.option("--device", default=None, help="cpu or cuda[:N]; default cuda when available."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _run_cli(ctx: click.Context, experiment: str, out: str, methods: str, timesteps: str, device: str | None,
             rebuild_base: bool, **kw: Any) -> None:
    quiet = bool(ctx.find_root().params.get("quiet"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DataInfError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    names = tuple(m.strip() for m in methods.split(",") if m.strip())
    settings = DiffusionSettings(experiment=experiment, methods=names,
                                 timesteps=_parse_ints(timesteps, "timesteps"), **kw)
    results = run_diffusion(settings, out, device=device, progress=not quiet, rebuild_base=rebuild_base)
    click.echo(format_table(results))
    click.echo(f"wrote {Path(out) / 'results.json'} and {Path(out) / 'report.html'} "
               f"({results['wall_seconds']:.0f} s)")


@click.command("diffusion-style")
@_common
@click.option("--n-train-per-style", default=30, show_default=True, help="Training images per style.")
@click.option("--n-test-per-style", default=5, show_default=True, help="Held-out query images per style.")
@click.pass_context
def style_command(ctx: click.Context, **kw: Any) -> None:
    """Which training images of a LoRA-tuned diffusion model share a query image's style? (paper table 2)"""
    _run_cli(ctx, "style", **kw)


@click.command("diffusion-subject")
@_common
@click.option("--n-subjects", default=30, show_default=True, help="Subjects (each one MNIST image + augmentations).")
@click.option("--views", default=3, show_default=True, help="Training images per subject.")
@click.pass_context
def subject_command(ctx: click.Context, **kw: Any) -> None:
    """Which training images of a DreamBooth-style LoRA show a query's subject? (paper table 2)"""
    _run_cli(ctx, "subject", **kw)


cli_commands = {"diffusion-style": style_command, "diffusion-subject": subject_command}

__all__ = ["PAPER", "DiffusionSettings", "attribution_metrics", "cli_commands", "format_table", "run_diffusion",
           "write_image_report"]
