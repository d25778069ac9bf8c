"""The paper's classification experiments (sections 4.1, 4.2 and appendix F), scaled to what a machine runs.

* ``approximation``  Pearson/Spearman correlation of each method's scores with exact, per dataset and LoRA rank;
* ``mislabeled``     ROC AUC of finding flipped labels and each method's wall time, same grid;
* ``selection``      retrain on the 70% of training data each method ranks least harmful; validation accuracy
                     (over the same grid's runs);
* ``scaling``        time of each method as n_train and the block size grow; fitted log-log exponents.

``approximation`` and ``mislabeled`` come from one grid of :func:`run_mislabeled` runs (every run measures
both, :func:`run_grid`), summarized by :func:`write_grid_summary`; each run's results.json is cached, so a
killed grid resumes where it stopped. ``selection`` (:func:`run_selection_grid`) reuses the same runs' scores
and caches its retrains beside them.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datainf import atomic
from datainf.data.text import DATASETS, load_records, load_text_dataset, sample_split
from datainf.errors import DataInfError, parse_json
from datainf.estimators import accepted_options, get_method, influence, method_names
from datainf.estimators.defaults import REFERENCE_METHOD
from datainf.experiments.common import settings_dict
from datainf.experiments.mislabeled import MislabeledSettings, finetune, noisy_split, run_mislabeled
from datainf.scoring import load_scores

log = logging.getLogger("datainf.experiments")

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
    check_dataset(dataset)
    records = list(load_records(Path(dataset)))
    return sample_split(records, min(n_train, len(records) - n_val), n_val, seed=seed)


def check_dataset(dataset: str) -> None:
    """One error line unless ``dataset`` is a built-in set, ``glue:TASK`` or an existing local path."""
    if dataset not in DATASETS and not dataset.startswith("glue:") and not Path(dataset).exists():
        raise DataInfError(f"unknown dataset '{dataset}': use one of {', '.join(DATASETS)}, a local "
                           ".jsonl/.csv file or save_to_disk folder, or glue:TASK")


# ---------------------------------------------------------------------------------------------- grid

#: grid summary name -> (title, the per-method metrics it tabulates; the first is plotted against the rank)
GRID_SUMMARIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "approximation": ("Correlation of each method's scores with exact influence.",
                      ("pearson_with_exact", "spearman_with_exact")),
    "mislabeled": ("Mislabeled-data detection: AUC of flipped labels and wall time.", ("auc", "seconds")),
}


def grid_cells(base: MislabeledSettings, datasets: list[str], ranks: list[int], seeds: list[int],
               out_dir: str | os.PathLike, target_sets: list[tuple[str, ...]] | None = None,
               ) -> list[tuple[MislabeledSettings, Path]]:
    """(settings, run folder) of every (dataset, rank, target modules, seed) of a grid, in grid order; an
    unknown dataset is an error before any run starts."""
    for dataset in datasets:
        check_dataset(dataset)
    out = Path(out_dir)
    cells = []
    for dataset, rank, targets, seed in itertools.product(datasets, ranks, target_sets or [tuple(base.target_modules)],
                                                          seeds):
        run_dir = out / "runs" / f"{Path(dataset).stem}-r{rank}-{'+'.join(targets)}-s{seed}"
        cells.append((replace(base, dataset=dataset, rank=rank, target_modules=tuple(targets), seed=seed), run_dir))
    return cells


def grid_records(settings: MislabeledSettings) -> tuple[list[dict], list[dict]] | None:
    """The (train, val) records a run of a local or GLUE dataset reads; None for a built-in set (the run
    samples it itself)."""
    if settings.dataset in DATASETS:
        return None
    return load_dataset_records(settings.dataset, settings.n_train, settings.n_val, settings.seed)


def run_grid(base: MislabeledSettings, datasets: list[str], ranks: list[int], seeds: list[int],
             out_dir: str | os.PathLike, *, target_sets: list[tuple[str, ...]] | None = None,
             progress: bool = True) -> list[dict[str, Any]]:
    """One :func:`run_mislabeled` per (dataset, rank, target modules, seed), cached per run in out_dir/runs.

    Returns each run's results.json contents (``MislabeledResult.to_dict()``), in grid order.
    """
    return [grid_run(settings, run_dir, progress)
            for settings, run_dir in grid_cells(base, datasets, ranks, seeds, out_dir, target_sets)]


def grid_run(settings: MislabeledSettings, run_dir: Path, progress: bool) -> dict[str, Any]:
    """One cell's results.json contents: the cached file when it was made with ``settings``, else a new run
    (under the run's lock, so a second grid on the same folder waits for it and then reuses it)."""
    cached = run_dir / "results.json"
    with run_lock(run_dir):
        if cached.exists():
            saved = parse_json(cached.read_bytes(), str(cached), "remove it to rerun that cell")
            _check_cached_settings(saved.get("settings", {}), settings, cached)
            return saved
        return run_mislabeled(settings, run_dir, progress=progress, records=grid_records(settings),
                              keep_store=False).to_dict()


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``RUN/.lock`` while a grid's run or its selection is read or made: two grids or selections on one
    --out never compute the same run at once."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic.exclusive(run_dir / ".lock", f"{run_dir.name}: another process holds this run; waiting for it"):
        yield


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
               if not (m == REFERENCE_METHOD and metric.endswith("with_exact"))]  # 1 by definition
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
    """One training subset and the validation accuracy of the classifier retrained on it; a run folder's
    selection.json maps each subset's name to one (with its ``keep``, ``n_keep`` and the run's settings).
    ``kept``: the indices of the training examples kept, in the order of the run's train.jsonl."""

    validation_accuracy: float
    n: int
    flipped_kept: int
    kept: list[int]


def run_selection_grid(base: MislabeledSettings, datasets: list[str], ranks: list[int], seeds: list[int],
                       out_dir: str | os.PathLike, *, target_sets: list[tuple[str, ...]] | None = None,
                       keep: float = 0.7, progress: bool = True) -> list[dict[str, Any]]:
    """Appendix F over a grid: per run of :func:`run_grid` (its cached runs reused, missing ones made first),
    keep the ``keep`` share of the training data each method scores most helpful and fine-tune afresh on it.

    Each retrain goes through the run's own fine-tune (same initialisation, seed, head, pooling and learning
    rates: :func:`datainf.experiments.mislabeled.finetune`), so the subsets are the only difference. "all
    data" is the run's own noisy-label model (retraining on everything gives the same model; the tests check
    it), "random" a random subset of the same size. Each run's ``selection.json`` is cached beside its
    results.json; a rerun retrains only the methods it lacks. Returns the selection.json contents in grid order.
    """
    if not 0 < keep <= 1:
        raise DataInfError(f"keep must be in (0, 1], got {keep}")
    cells = grid_cells(base, datasets, ranks, seeds, out_dir, target_sets)
    runs = [grid_run(settings, run_dir, progress) for settings, run_dir in cells]  # every run before any retrain
    return [select_and_retrain(settings, run_dir, run, keep, progress) for (settings, run_dir), run in zip(cells, runs)]


def select_and_retrain(settings: MislabeledSettings, run_dir: Path, run: dict[str, Any], keep: float,
                       progress: bool) -> dict[str, Any]:
    """One run's selection.json: its cached contents when they cover ``settings.methods``, else the missing
    selections retrained and added. A selection.json made from another results.json of the same folder (the
    run was redone since: its ``created`` stamp differs) is refused rather than trusted."""
    with run_lock(run_dir):
        return _select_and_retrain(settings, run_dir, run, keep, progress)


def _select_and_retrain(settings: MislabeledSettings, run_dir: Path, run: dict[str, Any], keep: float,
                        progress: bool) -> dict[str, Any]:
    path = run_dir / "selection.json"
    saved: dict[str, Any] = parse_json(path.read_bytes(), str(path), "remove it to redo it") if path.exists() else {}
    if saved and saved.get("keep") != keep:
        raise DataInfError(f"{path} was made with keep={saved.get('keep')!r}, this run asks for {keep!r}: pass "
                           "another --out, or remove that file to redo it")
    if saved and saved.get("run_created") != run.get("created"):
        raise DataInfError(f"{path} was made from the run of {saved.get('run_created')!r}, but {run_dir / 'results.json'}"
                           f" is from {run.get('created')!r}: remove that selection.json to retrain on this run's scores")
    selections = dict(saved.get("selections", {}))
    wanted = ("all data", "random", *settings.methods)
    if all(name in selections for name in wanted):
        return saved
    train, val, num_labels = noisy_split(settings, grid_records(settings))
    n_keep = int(round(keep * len(train)))
    subsets = selection_subsets(run_dir / "scores.safetensors", len(train), n_keep, settings.seed)
    for name in wanted:
        if name in selections:
            continue
        idx = subsets[name]
        if name == "all data":
            accuracy = run["validation_accuracy"]
        else:
            log.info("%s: retraining on the %d examples %s keeps", run_dir.name, len(idx), name)
            accuracy = retrain_on(settings, train, val, num_labels, idx, progress)["accuracy"]
        selections[name] = asdict(Selection(validation_accuracy=accuracy, n=int(len(idx)),
                                            flipped_kept=int(sum(train[i]["flipped"] for i in idx)),
                                            kept=[int(i) for i in idx]))
    result = {"keep": keep, "n_keep": n_keep, "run_created": run.get("created"), "settings": run["settings"],
              "selections": selections}
    atomic.write_json(path, result)
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


def retrain_on(settings: MislabeledSettings, train: list[dict], val: list[dict], num_labels: int, idx: np.ndarray,
               progress: bool) -> dict[str, float]:
    """Validation metrics ("accuracy", "loss") of a classifier fine-tuned afresh on ``train[idx]`` with the
    run's own recipe."""
    return finetune(settings, [train[i] for i in idx], val, num_labels, progress)[3]


def write_selection_summary(results: list[dict[str, Any]], out_dir: str | os.PathLike) -> str:
    """``selection.json`` and ``selection.md`` beside the grid's runs: per (dataset, rank, LoRA targets) and
    training subset, the retrained validation accuracy and the flipped labels kept, mean ± sd over seeds;
    returns the markdown tables."""
    if not results:
        raise DataInfError("the selection grid has no runs: give at least one dataset, rank and seed")
    as_runs = [{"settings": r["settings"], "methods": r["selections"]} for r in results]
    tables = {metric: summarize(as_runs, metric) for metric in ("validation_accuracy", "flipped_kept")}
    text = (f"\n### validation accuracy after retraining on the kept share ({results[0]['keep']:.0%})\n\n"
            + markdown_table(tables["validation_accuracy"], "validation_accuracy")
            + "\n### flipped labels kept\n\n" + markdown_table(tables["flipped_kept"], "flipped_kept", ".1f"))
    out = Path(out_dir)
    atomic.write_json(out / "selection.json", tables)
    atomic.write_text(out / "selection.md", "## Data selection: retrain on the least harmful share\n" + text)
    return text


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
    opts = accepted_options(method, iterations=SCALING_LISSA_ITERATIONS)
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


__all__ = ["GRID_SUMMARIES", "ScalingResult", "ScalingRow", "Selection", "grid_cells",
           "load_dataset_records", "markdown_table", "rank_plot", "run_grid", "run_scaling", "run_selection_grid",
           "summarize", "write_grid_summary", "write_selection_summary"]
