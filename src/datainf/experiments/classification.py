"""The paper's classification experiments (sections 4.1, 4.2 and appendix F), scaled to what a machine runs.

* ``approximation``  Pearson/Spearman correlation of each method's scores with exact, per dataset and LoRA rank;
* ``mislabeled``     ROC AUC of finding flipped labels and each method's wall time, same grid;
* ``selection``      retrain on the 70% of training data each method ranks least harmful; validation accuracy;
* ``scaling``        time of each method as n_train and the block size grow; fitted log-log exponents.

``approximation`` and ``mislabeled`` come from one grid of :func:`run_mislabeled` runs (every run measures
both, :func:`run_grid`), summarized by :func:`write_grid_summary`; each run's results.json is cached, so a
killed grid resumes where it stopped.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datainf import atomic
from datainf.data.text import DATASETS, load_records, load_text_dataset, sample_split
from datainf.errors import DataInfError
from datainf.estimators import get_method, influence, method_names
from datainf.experiments.common import settings_dict
from datainf.experiments.mislabeled import MislabeledSettings, finetune, run_mislabeled
from datainf.scoring import load_scores

# ---------------------------------------------------------------------------------------------- data


def load_dataset_records(dataset: str, n_train: int, n_val: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, val) records from a built-in offline set, a local file/folder, or ``glue:TASK`` (needs the hub).

    A local file or ``save_to_disk`` folder needs ``text`` and ``label`` columns. ``glue:mrpc`` and other GLUE
    tasks are read with ``datasets.load_dataset`` (network needed: for the paper's own setting on a machine
    that has it); pairs of sentences become ``text`` + ``text_pair``.
    """
    if dataset in DATASETS:
        return sample_split(load_text_dataset(dataset), n_train, n_val, seed=seed)
    if dataset.startswith("glue:"):
        import datasets

        task = dataset.split(":", 1)[1]
        raw = datasets.load_dataset("glue", task)
        cols = [c for c in raw["train"].column_names if c not in ("label", "idx")]

        def convert(split):
            out = []
            for r in split:
                rec = {"text": r[cols[0]], "label": int(r["label"])}
                if len(cols) > 1:
                    rec["text_pair"] = r[cols[1]]
                out.append(rec)
            return out

        train = convert(raw["train"].shuffle(seed=seed).select(range(min(n_train, len(raw["train"])))))
        val = convert(raw["validation"].shuffle(seed=seed).select(range(min(n_val, len(raw["validation"])))))
        return train, val
    path = Path(dataset)
    if not path.exists():
        raise DataInfError(f"unknown dataset '{dataset}': use one of {', '.join(DATASETS)}, a local "
                           ".jsonl/.csv file or save_to_disk folder, or glue:TASK")
    records = list(load_records(path))
    return sample_split(records, min(n_train, len(records) - n_val), n_val, seed=seed)


# ---------------------------------------------------------------------------------------------- grid

#: grid summary name -> (title, the per-method metrics it tabulates; the first is plotted against the rank)
GRID_SUMMARIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "approximation": ("Correlation of each method's scores with exact influence.",
                      ("pearson_with_exact", "spearman_with_exact")),
    "mislabeled": ("Mislabeled-data detection: AUC of flipped labels and wall time.", ("auc", "seconds")),
}


def run_grid(base: MislabeledSettings, datasets: list[str], ranks: list[int], seeds: list[int],
             out_dir: str | os.PathLike, *, target_sets: list[tuple[str, ...]] | None = None,
             progress: bool = True) -> list[dict[str, Any]]:
    """One :func:`run_mislabeled` per (dataset, rank, target modules, seed), cached per run in out_dir/runs.

    Returns each run's results.json contents (``MislabeledResult.to_dict()``), in grid order.
    """
    out = Path(out_dir)
    runs = []
    target_sets = target_sets or [tuple(base.target_modules)]
    for dataset, rank, targets, seed in itertools.product(datasets, ranks, target_sets, seeds):
        run_dir = out / "runs" / f"{Path(dataset).stem}-r{rank}-{'+'.join(targets)}-s{seed}"
        cached = run_dir / "results.json"
        settings = replace(base, dataset=dataset, rank=rank, target_modules=tuple(targets), seed=seed)
        if cached.exists():
            saved = json.loads(cached.read_text())
            _check_cached_settings(saved.get("settings", {}), settings, cached)
            runs.append(saved)
            continue
        records = None
        if dataset not in DATASETS:
            records = load_dataset_records(dataset, base.n_train, base.n_val, seed)
        result = run_mislabeled(settings, run_dir, progress=progress, records=records, keep_store=False)
        runs.append(result.to_dict())
    return runs


def _check_cached_settings(saved: dict[str, Any], settings: MislabeledSettings, path: Path) -> None:
    """A cached run is reused only if it was made with these settings (a field it lacks must be at its default:
    runs saved before the field existed); otherwise one error line naming the first differing field."""
    defaults = settings_dict(MislabeledSettings())
    for key, value in settings_dict(settings).items():
        if key == "extra" or (key == "methods" and set(value) <= set(saved.get(key, ()))):
            continue
        if saved.get(key, defaults[key]) != value:
            raise DataInfError(f"{path} was made with {key}={saved.get(key, defaults[key])!r}, this grid asks for "
                               f"{value!r}: pass another --out, or remove that run's folder to redo it")


def write_grid_summary(runs: list[dict[str, Any]], name: str, out_dir: str | os.PathLike) -> str:
    """``{name}.json``, ``{name}.md`` and ``{name}.png`` (one of :data:`GRID_SUMMARIES`) from a grid's runs;
    returns the markdown tables."""
    title, metrics = GRID_SUMMARIES[name]
    out = Path(out_dir)
    text = "\n### validation accuracy\n\n" + accuracy_table(runs)
    for m in metrics:
        text += f"\n### {m}\n\n" + markdown_table(summarize(runs, m), m)
    atomic.write_json(out / f"{name}.json", {m: summarize(runs, m) for m in metrics})
    atomic.write_text(out / f"{name}.md", f"## {title}\n{text}")
    rank_plot(summarize(runs, metrics[0]), metrics[0], out / f"{name}.png")
    return text


def _mean_sd(values: list[float]) -> tuple[float, float]:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return float("nan"), float("nan")
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def summarize(runs: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Rows (dataset, rank, targets, method) with mean and standard deviation of `metric` over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        s = r["settings"]
        key = (Path(s["dataset"]).stem, s["rank"], "+".join(s["target_modules"]))
        groups.setdefault(key, []).append(r)
    rows = []
    for (dataset, rank, targets), rs in sorted(groups.items()):
        for method in rs[0]["methods"]:
            mean, sd = _mean_sd([r["methods"][method].get(metric) for r in rs])
            rows.append({"dataset": dataset, "rank": rank, "targets": targets, "method": method,
                         "mean": mean, "sd": sd, "runs": len(rs)})
    return rows


def accuracy_table(runs: list[dict[str, Any]]) -> str:
    """Per (dataset, rank, LoRA targets): validation accuracy trained on the clean labels and on the noisy
    ones (mean ± sd over seeds), the majority-class accuracy, and how many runs did not learn (noisy-label
    accuracy within 2 points of the majority class): a grid row whose models did not learn says little."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        s = r["settings"]
        groups.setdefault((Path(s["dataset"]).stem, s["rank"], "+".join(s["target_modules"])), []).append(r)
    lines = ["| dataset | rank | LoRA on | runs | clean labels | 20% flipped | majority class | did not learn |",
             "|---|---|---|---|---|---|---|---|"]

    def cell(values: list[Any]) -> str:
        mean, sd = _mean_sd([v for v in values if v is not None])
        return "—" if not math.isfinite(mean) else f"{mean:.3f} ± {sd:.3f}"

    for (dataset, rank, targets), rs in sorted(groups.items()):
        failed = sum(1 for r in rs if r.get("learned") is False)
        lines.append(f"| {dataset} | {rank} | {targets} | {len(rs)} | "
                     f"{cell([r.get('clean_validation_accuracy') for r in rs])} | "
                     f"{cell([r.get('validation_accuracy') for r in rs])} | "
                     f"{cell([r.get('majority_accuracy') for r in rs])} | "
                     f"{failed if any('learned' in r for r in rs) else '—'} |")
    return "\n".join(lines) + "\n\n(validation accuracy, mean ± standard deviation over seeds)\n"


def markdown_table(rows: list[dict[str, Any]], metric: str, fmt: str = ".3f") -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    keys = list(dict.fromkeys((r["dataset"], r["rank"], r["targets"]) for r in rows))
    lines = ["| dataset | rank | LoRA on | runs | " + " | ".join(methods) + " |",
             "|---|---|---|---|" + "---|" * len(methods)]
    for key in keys:
        cells = {r["method"]: r for r in rows if (r["dataset"], r["rank"], r["targets"]) == key}
        runs = next(iter(cells.values()))["runs"]
        vals = [f"{cells[m]['mean']:{fmt}} ± {cells[m]['sd']:{fmt}}" if m in cells else "n/a" for m in methods]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {runs} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + f"\n\n(mean ± standard deviation over seeds of {metric})\n"


def rank_plot(rows: list[dict[str, Any]], metric: str, path: Path) -> None:
    """One panel per dataset: ``metric`` (mean ± sd over seeds) against LoRA rank, a line per method; other
    LoRA target sets than the most common one are drawn as separate markers at their rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    methods = [m for m in dict.fromkeys(r["method"] for r in rows)
               if not (m == "exact" and metric.endswith("with_exact"))]  # 1 by definition
    ranks = sorted(set(r["rank"] for r in rows))
    main_targets = max(set(r["targets"] for r in rows), key=lambda t: sum(r["targets"] == t for r in rows))
    colors = dict(zip(methods, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3))
    fig, axes = plt.subplots(1, len(datasets), figsize=(3.4 * len(datasets), 3.2), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for method in methods:
            pts = sorted((r["rank"], r["mean"], r["sd"]) for r in rows
                         if r["dataset"] == dataset and r["method"] == method and r["targets"] == main_targets)
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                            capsize=2, color=colors[method], label=method)
            for r in rows:
                if r["dataset"] == dataset and r["method"] == method and r["targets"] != main_targets:
                    ax.errorbar([r["rank"] * 1.08], [r["mean"]], yerr=[r["sd"]], marker="s", mfc="none",
                                capsize=2, color=colors[method])
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.minorticks_off()
        ax.set_title(f"{dataset} (LoRA on {main_targets}; open squares: other targets)", fontsize=7)
        ax.set_xlabel("LoRA rank r")
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    atomic.savefig(fig, path)


# ---------------------------------------------------------------------------------------------- selection


@dataclass
class Selection:
    """One training subset and the validation accuracy of the classifier retrained on it."""

    validation_accuracy: float
    n: int
    flipped_kept: int


@dataclass
class SelectionResult:
    """``to_dict()`` is selection.json. ``selections``: "all data", "random", then one per method."""

    keep: float
    n_keep: int
    settings: dict[str, Any]
    selections: dict[str, Selection]

    def to_dict(self) -> dict[str, Any]:
        return {"keep": self.keep, "n_keep": self.n_keep, "settings": self.settings,
                "selections": {k: asdict(v) for k, v in self.selections.items()}}


def run_selection(base: MislabeledSettings, out_dir: str | os.PathLike, *, keep: float = 0.7,
                  methods: tuple[str, ...] = ("datainf", "identity", "lissa", "exact"), progress: bool = True,
                  records: tuple[list[dict], list[dict]] | None = None) -> SelectionResult:
    """Appendix F: keep the `keep` share of training data with the lowest (most helpful) scores and retrain.

    Compares each method's selection with a random selection of the same size and with all (noisy) data;
    reports validation accuracy of the retrained classifier. Writes ``selection.json``.
    """
    out = Path(out_dir)
    scores_run = run_mislabeled(replace(base, methods=tuple(methods)), out / "scores-run", progress=progress,
                                records=records, keep_store=False)
    train = [json.loads(line) for line in (out / "scores-run" / "train.jsonl").read_text().splitlines()]
    if records is None:
        _, val = load_dataset_records(base.dataset, base.n_train, base.n_val, base.seed)
    else:
        val = records[1]
    n_keep = int(round(keep * len(train)))
    subsets = selection_subsets(out / "scores-run" / "scores.safetensors", len(train), n_keep, base.seed)
    result = SelectionResult(keep=keep, n_keep=n_keep, settings=scores_run.settings,
                             selections={name: retrain_on(base, train, val, idx, progress)
                                         for name, idx in subsets.items()})
    atomic.write_json(out / "selection.json", result.to_dict())
    return result


def selection_subsets(scores_path: Path, n_train: int, n_keep: int, seed: int) -> dict[str, np.ndarray]:
    """Sorted indices kept: all data, ``n_keep`` random ones, and per method the ``n_keep`` lowest scores."""
    loaded = load_scores(scores_path)
    scores = {k: v[:, 0].double().numpy() for k, v in loaded.scores.items()}
    rng = np.random.default_rng(seed)
    subsets = {"all data": np.arange(n_train), "random": np.sort(rng.permutation(n_train)[:n_keep])}
    for m, s in scores.items():
        subsets[m] = np.sort(np.argsort(s, kind="stable")[:n_keep])
    return subsets


def retrain_on(base: MislabeledSettings, train: list[dict], val: list[dict], idx: np.ndarray,
               progress: bool) -> Selection:
    """Fine-tune afresh on ``train[idx]`` with the scores run's own recipe (same initialisation and seed,
    head, pooling and learning rates: :func:`datainf.experiments.mislabeled.finetune`); its validation
    accuracy."""
    num_labels = max(r["label"] for r in train) + 1
    _, _, _, metrics = finetune(base, [train[i] for i in idx], val, num_labels, progress)
    return Selection(validation_accuracy=metrics["accuracy"], n=int(len(idx)),
                     flipped_kept=int(sum(train[i]["flipped"] for i in idx)))


# ---------------------------------------------------------------------------------------------- scaling

#: LiSSA's iterations in the timing runs (not converged: only its time per iteration counts here)
SCALING_LISSA_ITERATIONS = 10


@dataclass
class ScalingRow:
    method: str
    vary: str       # "n" or "d"
    n: int
    d: int
    seconds: float


@dataclass
class ScalingResult:
    """``to_dict()`` is scaling.json; ``exponents["{method}/{n or d}"]`` the fitted log-log slopes."""

    blocks: int
    n_query: int
    rows: list[ScalingRow]
    exponents: dict[str, float]
    lissa_iterations: int = SCALING_LISSA_ITERATIONS

    def to_dict(self) -> dict[str, Any]:
        return {"blocks": self.blocks, "n_query": self.n_query, "lissa_iterations": self.lissa_iterations,
                "rows": [asdict(r) for r in self.rows], "exponents": self.exponents}


def run_scaling(out_dir: str | os.PathLike, *, n_values: tuple[int, ...] = (250, 500, 1000, 2000, 4000),
                d_values: tuple[int, ...] = (256, 1024, 4096), blocks: int = 4, n_query: int = 1,
                methods: tuple[str, ...] | None = None, seed: int = 0) -> ScalingResult:
    """Wall time of each method on random gradients as n_train (at the largest d) and d (at n = 1000) grow.

    Fitted exponents are slopes of log(seconds) against log(n) or log(d); the paper's table 1 expects
    datainf O(n d), lissa O(n d) per iteration, exact O(n d^2 + d^3) (ours: O(min(n d^2 + d^3, n^2 d + n^3))).
    Writes ``scaling.json`` and ``scaling.png``.
    """
    methods = methods or tuple(m for m in method_names() if not get_method(m).needs_curvature)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    d_fixed, n_fixed = max(d_values), 1000
    for method in methods:
        for n in n_values:
            rows.append(ScalingRow(method, "n", n, d_fixed, time_method(n, d_fixed, method, blocks, n_query, gen)))
        for d in d_values:
            rows.append(ScalingRow(method, "d", n_fixed, d, time_method(n_fixed, d, method, blocks, n_query, gen)))
    result = ScalingResult(blocks=blocks, n_query=n_query, rows=rows, exponents=fit_exponents(rows, methods))
    out = Path(out_dir)
    atomic.write_json(out / "scaling.json", result.to_dict())
    scaling_plot(result, out / "scaling.png")
    return result


def time_method(n: int, d: int, method: str, blocks: int, n_query: int, gen: torch.Generator) -> float:
    """Seconds of one influence call on ``blocks`` random (n, d) blocks, after a one-block warm-up."""
    G = [torch.randn(n, d, generator=gen) for _ in range(blocks)]
    V = [torch.randn(n_query, d, generator=gen) for _ in range(blocks)]
    opts = {"iterations": SCALING_LISSA_ITERATIONS} if method == "lissa" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lissa at 10 iterations is not converged; only its time counts here
        influence(G[:1], V[:1], method, **opts)  # warm-up
        t0 = time.perf_counter()
        influence(G, V, method, **opts)
        return time.perf_counter() - t0


def fit_exponents(rows: list[ScalingRow], methods: tuple[str, ...]) -> dict[str, float]:
    """Per method and varied size: the slope of log(seconds) against log(size)."""
    exponents = {}
    for method in methods:
        for vary in ("n", "d"):
            pts = [(getattr(r, vary), r.seconds) for r in rows if r.method == method and r.vary == vary]
            x, y = np.log([p[0] for p in pts]), np.log([max(p[1], 1e-6) for p in pts])
            exponents[f"{method}/{vary}"] = float(np.polyfit(x, y, 1)[0])
    return exponents


def scaling_plot(result: ScalingResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, vary in zip(axes, ("n", "d")):
        for method in dict.fromkeys(r.method for r in result.rows):
            pts = [(getattr(r, vary), r.seconds) for r in result.rows if r.method == method and r.vary == vary]
            ax.loglog([p[0] for p in pts], [p[1] for p in pts], "o-",
                      label=f"{method} (slope {result.exponents[f'{method}/{vary}']:.2f})")
        ax.set_xlabel("n_train" if vary == "n" else "block dimension d")
        ax.set_ylabel("seconds")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    atomic.savefig(fig, path)


__all__ = ["GRID_SUMMARIES", "ScalingResult", "ScalingRow", "Selection", "SelectionResult", "load_dataset_records",
           "markdown_table", "rank_plot", "run_grid", "run_scaling", "run_selection", "summarize",
           "write_grid_summary"]
