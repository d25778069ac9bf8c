"""Ground truth for attribution: the linear datamodeling score (LDS) and leave-one-out (LOO) retraining.

LDS (as in TRAK, Kronfluence, dattri): retrain on many random subsets S_s (half of the training set each) and
record every query's loss. Under our sign convention a training example k with score[k, j] > 0 raises query
j's loss when up-weighted, so the predicted loss of a model trained on S is, up to a constant and a positive
factor, ``sum_{k in S} score[k, j]``. LDS for query j is the Spearman correlation over subsets between that
prediction and the measured loss; we report its mean over queries.

LOO: retrain without each of a few chosen examples, with several training seeds to average out training noise;
the measured effect of removing k on query j is ``loss_without_k - loss_full`` (seed-matched), predicted as
``-score[k, j]``. We report Pearson and Spearman correlation across the removed examples for the mean query
loss (the validation loss).

Two model kinds: ``task="classification"`` retrains the LoRA sequence classifier (MiniLM by default) on a
labelled text set with flipped labels; a generation task (``"sentences"``, ``"math"``, ``"math-reasoning"``)
retrains a LoRA causal LM (SmolLM2-135M-Instruct by default) on that generated task, the query loss being
each query's summed NLL of its response tokens (the loss its gradient, and so its score, is about).

Every retrained model's losses are cached in ``out_dir`` as they finish, so a killed run resumes.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from datainf import atomic
from datainf.errors import DataInfError
from datainf.estimators import method_names
from datainf.metrics import pearson, spearman

# Per model kind: (rank, alpha, epochs, learning rate, batch size, max length). The classifier's are the
# demo's (MiniLM needs lr 3e-3 x 4 epochs to learn); the causal LM's are llm-identification's (paper LoRA).
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "classification": {"rank": 4, "alpha": None, "epochs": 4, "learning_rate": 3e-3, "batch_size": 16,
                       "max_length": 64},
    "causal_lm": {"rank": 8, "alpha": 32.0, "epochs": 2, "learning_rate": 1e-3, "batch_size": 8,
                  "max_length": 128},
}


@dataclass
class LdsSettings:
    """Sizes default to what 2 CPU cores run in about half an hour with the MiniLM classifier.

    ``task``: "classification" (``dataset``, ``noise_fraction`` apply) or a generation task of
    :data:`datainf.data.generation.TASKS` (``classes`` apply; n_train and n_query split evenly over them).
    Training settings left at None take the model kind's defaults (:data:`TASK_DEFAULTS`); alpha None = rank.
    """

    task: str = "classification"
    dataset: str = "rotten_tomatoes"
    model_dir: str | None = None
    n_train: int = 200
    n_query: int = 50
    noise_fraction: float = 0.2
    classes: int = 10
    rank: int | None = None
    alpha: float | None = None
    epochs: int | None = None
    learning_rate: float | None = None
    batch_size: int | None = None
    max_length: int | None = None
    subsets: int = 50
    subset_fraction: float = 0.5
    loo_examples: int = 20
    loo_seeds: int = 3
    methods: tuple[str, ...] = field(default_factory=lambda: tuple(m for m in method_names() if m != "kfac"))
    lissa_iterations: int = 100
    device: str | None = None
    seed: int = 0

    @property
    def kind(self) -> str:
        return "classification" if self.task == "classification" else "causal_lm"

    def __post_init__(self) -> None:
        from datainf.data.generation import TASKS

        if self.task != "classification" and self.task not in TASKS:
            raise DataInfError(f"unknown --task '{self.task}'; choose classification or one of {', '.join(TASKS)}")
        for name, value in TASK_DEFAULTS[self.kind].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.alpha is None:
            self.alpha = float(self.rank)
        if self.subsets < 2:
            raise DataInfError("--subsets must be >= 2 (LDS correlates over subsets)")
        if not 0 < self.subset_fraction < 1:
            raise DataInfError(f"--subset-fraction must be in (0, 1), got {self.subset_fraction}")
        if self.loo_examples > self.n_train:
            raise DataInfError("--loo-examples cannot exceed --n-train")
        if self.kind == "causal_lm" and (self.n_train % self.classes or self.n_query % self.classes):
            raise DataInfError(f"--n-train ({self.n_train}) and --n-query ({self.n_query}) must be multiples of "
                               f"--classes ({self.classes}) for task '{self.task}' (same count per class)")
        for m in self.methods:
            if m not in method_names():
                raise DataInfError(f"unknown method '{m}'; choose from {', '.join(method_names())}")


class ClassifierTrainer:
    """Retrains the LoRA classifier from the same initialisation on a subset; returns per-query losses."""

    task = "classification"

    def __init__(self, s: LdsSettings, train: list[dict], queries: list[dict]):
        from datainf.data.assets import minilm_dir
        from datainf.models.finetune import LoraSettings

        self.s, self.train, self.queries = s, train, queries
        self.model_dir = s.model_dir or str(minilm_dir())
        self.num_labels = max(r["label"] for r in train + queries) + 1
        self.lora = LoraSettings(rank=s.rank, alpha=s.alpha, target_modules=("value",))

    def fit(self, indices: list[int], train_seed: int):
        from datainf.models.finetune import TrainSettings, finetune_classifier, load_classifier

        model, tok = load_classifier(self.model_dir, self.num_labels, self.lora, seed=self.s.seed)
        finetune_classifier(model, tok, [self.train[i] for i in indices], TrainSettings(
            epochs=self.s.epochs, learning_rate=self.s.learning_rate, batch_size=self.s.batch_size,
            max_length=self.s.max_length, seed=train_seed), progress=False)
        return model, tok

    def query_losses(self, model, tok) -> np.ndarray:
        from datainf.data.collate import TextCollator
        from datainf.tasks import classification_loss

        collate = TextCollator(tokenizer=tok, max_length=self.s.max_length)
        model.eval()
        out = []
        with torch.no_grad():
            for i in range(0, len(self.queries), 64):
                out.append(classification_loss(model, collate(self.queries[i : i + 64])))
        return torch.cat(out).double().numpy()


class CausalLMTrainer:
    """Retrains a LoRA causal LM (q_proj, v_proj) from the same initialisation on a subset of
    {"prompt", "response"} records; a query's loss is its summed NLL of the response tokens."""

    task = "causal_lm"

    def __init__(self, s: LdsSettings, train: list[dict], queries: list[dict]):
        from datainf.models.finetune import LoraSettings
        from datainf.models.llm import smollm2_dir

        self.s, self.train, self.queries = s, train, queries
        self.model_dir = s.model_dir or str(smollm2_dir())
        self.lora = LoraSettings(rank=s.rank, alpha=s.alpha, dropout=0.05, target_modules=("q_proj", "v_proj"),
                                 modules_to_save=())

    def fit(self, indices: list[int], train_seed: int):
        from datainf.models.llm import finetune_causal_lm, load_causal_lm

        model, tok = load_causal_lm(self.model_dir, self.lora, device=self.s.device, seed=self.s.seed)
        finetune_causal_lm(model, tok, [self.train[i] for i in indices], epochs=self.s.epochs,
                           lr=self.s.learning_rate, batch_size=self.s.batch_size, max_length=self.s.max_length,
                           seed=train_seed, progress=False)
        return model, tok

    def query_losses(self, model, tok) -> np.ndarray:
        from datainf.data.collate import TextCollator
        from datainf.tasks import causal_lm_loss

        collate = TextCollator(tokenizer=tok, task="causal_lm", max_length=self.s.max_length)
        device = next(model.parameters()).device
        model.eval()
        out = []
        with torch.no_grad():
            for i in range(0, len(self.queries), 16):
                batch = {k: v.to(device) for k, v in collate(self.queries[i : i + 16]).items()}
                out.append(causal_lm_loss(model, batch).cpu())
        return torch.cat(out).double().numpy()


def _records(s: LdsSettings, records: tuple[list[dict], list[dict]] | None) -> tuple[list[dict], list[dict], int]:
    """(training records, query records, number of flipped labels) for the settings' task."""
    if s.kind == "causal_lm":
        from datainf.data.generation import make_task, split_task

        per_train, per_query = s.n_train // s.classes, s.n_query // s.classes
        train, queries = split_task(make_task(s.task, s.classes, per_train + per_query, seed=s.seed),
                                    per_train, per_query)
        keep = ("prompt", "response")
        return [{k: r[k] for k in keep} for r in train], [{k: r[k] for k in keep} for r in queries], 0
    from datainf.data.noise import flip_labels
    from datainf.experiments.classification import load_dataset_records

    if records is None:
        train, queries = load_dataset_records(s.dataset, s.n_train, s.n_query, s.seed)
    else:
        train, queries = records
    num_labels = max(r["label"] for r in train + queries) + 1
    noisy, flipped = flip_labels([r["label"] for r in train], s.noise_fraction, num_labels, seed=s.seed)
    train = [{"text": r["text"], "label": int(y)} for r, y in zip(train, noisy)]
    queries = [{"text": r["text"], "label": int(r["label"])} for r in queries]
    return train, queries, int(sum(flipped))


def _settings_dict(s: LdsSettings) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(s).items()}


# Settings that only say how many retrains to run: a rerun with more of them reuses the cached ones (the
# subset masks and the LOO examples are drawn so that the first ones stay the same).
EXTENDABLE = ("subsets", "loo_examples", "loo_seeds", "device")


def _check_same_settings(path: Path, s: LdsSettings) -> None:
    """The cached retrains in a folder are only valid for the settings that made them: refuse others."""
    mine = {k: v for k, v in _settings_dict(s).items() if k not in EXTENDABLE}
    if path.exists():
        theirs = {k: v for k, v in json.loads(path.read_text()).items() if k not in EXTENDABLE}
        differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if differ:
            raise DataInfError(f"{path.parent} holds retrains made with other settings ({', '.join(differ)}); "
                               "use another --out or the same settings")
        return
    atomic.write_json(path, mine)


def _cached(path: Path, compute) -> Any:
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    atomic.write_text(path, json.dumps(value))
    return value


def lds(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean over queries of the Spearman correlation between predicted and measured subset losses.

    Args:
        scores: (n_train, n_query) influence scores (positive = harmful).
        masks: (n_subsets, n_train) booleans, True where the example was kept.
        losses: (n_subsets, n_query) measured query losses of the retrained models.
    Returns:
        (mean LDS, per-query LDS (n_query,)).
    """
    predicted = masks.astype(np.float64) @ scores  # (n_subsets, n_query)
    per_query = np.array([spearman(predicted[:, j], losses[:, j]) for j in range(scores.shape[1])])
    return float(np.mean(per_query)), per_query


def run_lds(settings: LdsSettings, out_dir: str | os.PathLike, *, progress: bool = True,
            records: tuple[list[dict], list[dict]] | None = None) -> dict[str, Any]:
    """Run LDS and LOO for every method on the settings' model; writes ``lds.json``; resumes from its cache.

    ``records``: (train, query) classification records to use instead of loading ``settings.dataset``.
    """
    from datainf.attributor import Attributor

    t_start = time.perf_counter()
    s = settings
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_same_settings(out / "settings.json", s)
    train, queries, n_flipped = _records(s, records)
    trainer = ClassifierTrainer(s, train, queries) if s.kind == "classification" else CausalLMTrainer(
        s, train, queries)
    everyone = list(range(len(train)))

    # scores of the model trained on all data
    def full_scores() -> dict[str, list]:
        model, tok = trainer.fit(everyone, train_seed=s.seed)
        att = Attributor(model, trainer.task, store=out / "store", tokenizer=tok, max_length=s.max_length,
                         batch_size=s.batch_size, progress=progress)
        att.fit(train)
        qgrads = att.gradients(queries)
        res = {}
        for m in s.methods:
            opts = {"iterations": s.lissa_iterations} if m == "lissa" else {}
            t0 = time.perf_counter()
            res[m] = att.scores(qgrads, method=m, save=False, **opts).double().numpy().tolist()
            res[m + ":seconds"] = time.perf_counter() - t0
        return res

    full = _cached(out / "scores.json", full_scores)
    scores = {m: np.array(full[m]) for m in s.methods}

    # LDS: random subsets, one retrain each (same initialisation and training seed, only the data changes)
    rng = np.random.default_rng(s.seed + 1)
    masks = np.zeros((s.subsets, len(train)), dtype=bool)
    k = int(round(s.subset_fraction * len(train)))
    for i in range(s.subsets):
        masks[i, rng.permutation(len(train))[:k]] = True
    losses = []
    for i in _bar(range(s.subsets), "LDS retrains", progress):
        idx = np.flatnonzero(masks[i]).tolist()
        losses.append(_cached(out / "subsets" / f"{i:04d}.json",
                              lambda idx=idx: trainer.query_losses(*trainer.fit(idx, s.seed)).tolist()))
    losses = np.array(losses)

    # LOO: remove each of a few examples, with several training seeds
    loo_idx = np.sort(np.random.default_rng(s.seed + 2).permutation(len(train))[: s.loo_examples]).tolist()
    base = []
    for r in range(s.loo_seeds):
        base.append(_cached(out / "loo" / f"full-seed{r}.json",
                            lambda r=r: trainer.query_losses(*trainer.fit(everyone, s.seed + r)).tolist()))
    effects = []
    for kk in _bar(loo_idx, "LOO retrains", progress):
        keep = [i for i in everyone if i != kk]
        per_seed = [np.array(_cached(out / "loo" / f"without{kk:05d}-seed{r}.json",
                                     lambda r=r, keep=keep: trainer.query_losses(
                                         *trainer.fit(keep, s.seed + r)).tolist())) - np.array(base[r])
                    for r in range(s.loo_seeds)]
        effects.append(np.mean(per_seed, axis=0).mean())  # effect on the mean query loss
    effects = np.array(effects)
    seed_noise = float(np.std([np.mean(b) for b in base])) if s.loo_seeds > 1 else None

    results: dict[str, Any] = {"settings": _settings_dict(s),
                               "n_flipped": n_flipped, "methods": {}}
    for m in s.methods:
        mean_lds, per_query = lds(scores[m], masks, losses)
        predicted_removal = -scores[m][loo_idx].mean(axis=1)
        results["methods"][m] = {
            "lds": mean_lds, "lds_sd_over_queries": float(np.std(per_query)),
            "loo_pearson": pearson(predicted_removal, effects), "loo_spearman": spearman(predicted_removal, effects),
            "seconds": full[m + ":seconds"],
        }
    results["loo"] = {"examples": loo_idx, "mean_effect": effects.tolist(), "seed_std_of_full_loss": seed_noise}
    results["wall_seconds_this_call"] = time.perf_counter() - t_start
    atomic.write_json(out / "lds.json", results)
    return results


def _bar(it, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, disable=not progress)


@click.command(name="lds")
@click.option("--out", "out_dir", default="runs/lds", type=click.Path(file_okay=False))
@click.option("--task", default="classification", show_default=True,
              type=click.Choice(["classification", "sentences", "math", "math-reasoning"]),
              help="classification: a LoRA sequence classifier on --dataset; the others: a LoRA causal LM on "
                   "that generated task.")
@click.option("--dataset", default="rotten_tomatoes", show_default=True,
              help="Classification only: built-in offline set, a local file, or glue:TASK.")
@click.option("--model", "model_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="Local HF model folder; default MiniLM (classification) or SmolLM2-135M-Instruct.")
@click.option("--n-train", type=int, default=200, show_default=True)
@click.option("--n-query", type=int, default=50, show_default=True)
@click.option("--noise", type=float, default=0.2, show_default=True, help="Classification only: flipped share.")
@click.option("--classes", type=int, default=10, show_default=True, help="Generation tasks only.")
@click.option("--rank", type=int, default=None, help="LoRA rank [default: 4 classifier, 8 causal LM].")
@click.option("--epochs", type=int, default=None, help="[default: 4 classifier, 2 causal LM]")
@click.option("--lr", type=float, default=None, help="[default: 3e-3 classifier, 1e-3 causal LM]")
@click.option("--subsets", type=int, default=50, show_default=True)
@click.option("--loo-examples", type=int, default=20, show_default=True)
@click.option("--loo-seeds", type=int, default=3, show_default=True)
@click.option("--methods", default=None, help="Comma-separated; default every registered method but kfac.")
@click.option("--device", default=None, help="Causal LM only: cpu or cuda [default: cuda when available].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.pass_context
def lds_command(ctx, out_dir, task, dataset, model_dir, n_train, n_query, noise, classes, rank, epochs, lr, subsets,
                loo_examples, loo_seeds, methods, device, seed):
    """Linear datamodeling score and leave-one-out correlation of each method (retrains; cached, resumable)."""
    chosen = {"methods": tuple(m for m in methods.split(",") if m)} if methods else {}
    settings = LdsSettings(task=task, dataset=dataset, model_dir=model_dir, n_train=n_train, n_query=n_query,
                           noise_fraction=noise, classes=classes, rank=rank, epochs=epochs, learning_rate=lr,
                           subsets=subsets, loo_examples=loo_examples, loo_seeds=loo_seeds, device=device,
                           seed=seed, **chosen)
    records = None
    if task == "classification" and dataset not in ("rotten_tomatoes", "sms_spam", "trec_coarse"):
        from datainf.experiments.classification import load_dataset_records

        records = load_dataset_records(dataset, n_train, n_query, seed)
    res = run_lds(settings, out_dir, progress=not ctx.find_root().params.get("quiet"), records=records)
    click.echo(f"{'method':<10} {'LDS':>7} {'LOO pearson':>12} {'LOO spearman':>13}")
    for m, r in res["methods"].items():
        click.echo(f"{m:<10} {r['lds']:7.3f} {r['loo_pearson']:12.3f} {r['loo_spearman']:13.3f}")


cli_commands = {"lds": lds_command}
