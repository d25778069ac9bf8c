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

On a generation task, ``checkpoints`` K > 0 scores the full model along its fine-tune as well
(:func:`datainf.experiments.llm_identification.score_along_run`): each method at the final adapter
(``"<method>"``), at step 0 (``"<method>+step0"``: the initial adapter, B = 0) and summed over step 0 and K
evenly spaced checkpoints with ``datainf finetune``'s learning-rate weights (``"<method>+run"``), and each
checkpoint alone (``"<method>@step<S>"``, its weight in scores.json as ``"<method>@step<S>:weight"``: another
weighting of the run can be judged afterwards from the cached retrains); the retrains are the same. ``control`` adds the resemblance control as the row ``"resemblance"`` (minus the cosine of the
base model's mean last hidden states; a method must beat it to count as attribution). ``loo_examples=0``
skips leave-one-out.

Every retrained model's losses are cached in ``out_dir`` as they finish, so a killed run resumes. :func:`run`
returns an :class:`LdsResult`; its ``to_dict()`` is what lds.json holds.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datainf import atomic
from datainf.errors import DataInfError, parse_json
from datainf.estimators import ScoreArguments, arguments_from_spec, method_names
from datainf.estimators.defaults import LDS_LEFT_OUT
from datainf.experiments.common import check_methods, method_options, settings_dict
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
    methods: tuple[str, ...] = field(default_factory=lambda: tuple(m for m in method_names() if m not in LDS_LEFT_OUT))
    lissa_iterations: int = 100
    checkpoints: int = 0        # generation tasks: also score at step 0 and summed over step 0 + K checkpoints
    control: bool = False       # generation tasks: also score the resemblance control
    variants: tuple[str, ...] = ()  # more scored rows, each a spec of arguments_from_spec ("ekfac:damping_scale=10")
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
        if not 0 <= self.loo_examples <= self.n_train:
            raise DataInfError(f"--loo-examples must be from 0 (no leave-one-out) to --n-train, got {self.loo_examples}")
        if not isinstance(self.checkpoints, int) or self.checkpoints < 0:
            raise DataInfError(f"--checkpoints must be an integer >= 0, got {self.checkpoints!r}")
        if self.kind == "classification" and (self.checkpoints or self.control):
            raise DataInfError("--checkpoints and --control apply to the generation tasks only (a classifier's new "
                               "head is random at step 0); drop them or choose --task sentences, math or "
                               "math-reasoning")
        if self.kind == "causal_lm" and (self.n_train % self.classes or self.n_query % self.classes):
            raise DataInfError(f"--n-train ({self.n_train}) and --n-query ({self.n_query}) must be multiples of "
                               f"--classes ({self.classes}) for task '{self.task}' (same count per class)")
        check_methods(self.methods)
        self.variants = tuple(self.variants)
        for spec in self.variants:
            arguments_from_spec(spec)


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

    def load(self):
        """The LoRA-wrapped model at its initialisation (the same for every retrain) and its tokenizer."""
        from datainf.models.llm import load_causal_lm

        return load_causal_lm(self.model_dir, self.lora, device=self.s.device, seed=self.s.seed)

    def train_on(self, model, tok, indices: list[int], train_seed: int, on_step=None) -> None:
        """Fine-tune ``model`` in place on the examples ``indices`` (``on_step(step, lr)`` after each step)."""
        from datainf.models.llm import finetune_causal_lm

        finetune_causal_lm(model, tok, [self.train[i] for i in indices], epochs=self.s.epochs,
                           lr=self.s.learning_rate, batch_size=self.s.batch_size, max_length=self.s.max_length,
                           seed=train_seed, progress=False, on_step=on_step)

    def fit(self, indices: list[int], train_seed: int):
        model, tok = self.load()
        self.train_on(model, tok, indices, train_seed)
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


# Settings that only say how many retrains to run: a rerun with more of them reuses the cached ones (the
# subset masks and the LOO examples are drawn so that the first ones stay the same).
EXTENDABLE = ("subsets", "loo_examples", "loo_seeds", "device", "variants")


def _check_same_settings(path: Path, s: LdsSettings) -> None:
    """The cached retrains in a folder are only valid for the settings that made them: refuse others."""
    mine = {k: v for k, v in settings_dict(s).items() if k not in EXTENDABLE}
    if path.exists():
        saved = parse_json(path.read_bytes(), str(path), f"remove {path.parent} or use another --out")
        # a setting added since the folder was made (checkpoints, control) had its default there
        defaults = {f.name: f.default for f in fields(LdsSettings) if f.default is not MISSING}
        theirs = {k: v for k, v in {**{k: defaults[k] for k in mine if k in defaults and k not in saved},
                                    **saved}.items() if k not in EXTENDABLE}
        differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if differ:
            raise DataInfError(f"{path.parent} holds retrains made with other settings ({', '.join(differ)}); "
                               "use another --out or the same settings")
        return
    atomic.write_json(path, mine)


def _cached(path: Path, compute) -> Any:
    if path.exists():
        return parse_json(path.read_bytes(), str(path), "remove it to recompute it")
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


@dataclass
class LdsMethod:
    """One method: LDS (mean and spread over queries), LOO correlations, and the time of its scores."""

    lds: float
    lds_sd_over_queries: float
    loo_pearson: float | None      # None without leave-one-out (loo_examples=0)
    loo_spearman: float | None
    seconds: float


@dataclass
class LooOutcome:
    """The removed examples, the measured effect of removing each on the mean query loss, and the seed noise."""

    examples: list[int]
    mean_effect: list[float]
    seed_std_of_full_loss: float | None   # None with a single training seed


@dataclass
class LdsResult:
    """``to_dict()`` is lds.json."""

    settings: dict[str, Any]
    n_flipped: int
    methods: dict[str, LdsMethod]
    loo: LooOutcome
    wall_seconds_this_call: float

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "n_flipped": self.n_flipped,
                "methods": {m: asdict(r) for m, r in self.methods.items()}, "loo": asdict(self.loo),
                "wall_seconds_this_call": self.wall_seconds_this_call}


def run(settings: LdsSettings, out_dir: str | os.PathLike, *, progress: bool = True,
        records: tuple[list[dict], list[dict]] | None = None) -> LdsResult:
    """Run LDS and LOO for every method on the settings' model; writes ``lds.json``; resumes from its cache.

    ``records``: (train, query) classification records to use instead of loading ``settings.dataset``.
    """
    t_start = time.perf_counter()
    s = settings
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_same_settings(out / "settings.json", s)
    train, queries, n_flipped = _records(s, records)
    trainer = ClassifierTrainer(s, train, queries) if s.kind == "classification" else CausalLMTrainer(
        s, train, queries)
    base = method_arguments(s)
    full = _cached(out / "scores.json", lambda: full_model_scores(s, trainer, train, queries, out, progress, base))
    full.update(variant_scores(s, trainer, train, queries, out, progress))
    scores = {m: np.array(full[m]) for m in score_names(s)}
    scores.update(debiased(s, scores, full))
    scores.update(checkpoint_rows(s, full))
    masks = subset_masks(s, len(train))
    losses = subset_losses(s, trainer, masks, out, progress)
    loo_idx = loo_examples(s, len(train))
    effects, seed_noise = loo_effects(s, trainer, loo_idx, len(train), out, progress) if loo_idx else (None, None)
    methods = {}
    for m in scores:
        mean_lds, per_query = lds(scores[m], masks, losses)
        predicted_removal = -scores[m][loo_idx].mean(axis=1) if loo_idx else None
        methods[m] = LdsMethod(lds=mean_lds, lds_sd_over_queries=float(np.std(per_query)),
                               loo_pearson=pearson(predicted_removal, effects) if loo_idx else None,
                               loo_spearman=spearman(predicted_removal, effects) if loo_idx else None,
                               seconds=full[m + ":seconds"])
    result = LdsResult(settings=settings_dict(s), n_flipped=n_flipped, methods=methods,
                       loo=LooOutcome(loo_idx, [] if effects is None else effects.tolist(), seed_noise),
                       wall_seconds_this_call=time.perf_counter() - t_start)
    atomic.write_json(out / "lds.json", result.to_dict())
    return result


#: the name callers know
run_lds = run


def method_arguments(s: LdsSettings) -> dict[str, ScoreArguments]:
    """Each method's arguments by row name (LiSSA with the settings' iteration count)."""
    return {m: ScoreArguments(method=m, options=method_options(m, s.lissa_iterations)) for m in s.methods}


def variant_scores(s: LdsSettings, trainer: ClassifierTrainer | CausalLMTrainer, train: list[dict],
                   queries: list[dict], out: Path, progress: bool) -> dict[str, Any]:
    """The rows of the settings' ``variants`` (each a spec of :func:`datainf.estimators.arguments_from_spec`),
    cached in ``scores-variants.json`` by name: a variant asked for later is computed on its own (the full model
    retrained and its gradients taken again: the same seed gives the same model), those cached are reused."""
    path = out / "scores-variants.json"
    cached = parse_json(path.read_bytes(), str(path), "remove it to recompute it") if path.exists() else {}
    missing = {v: arguments_from_spec(v) for v in s.variants if v not in cached}
    if missing:
        fresh = full_model_scores(s, trainer, train, queries, out / "variants", progress, missing, control=False)
        cached = {**cached, **fresh}
        atomic.write_text(path, json.dumps(cached))
    return {k: v for k, v in cached.items() if k.partition(":seconds")[0].partition("+")[0] in s.variants}


def debiased(s: LdsSettings, scores: dict[str, np.ndarray], full: dict[str, Any]) -> dict[str, np.ndarray]:
    """With ``checkpoints``: DDA's debias (arXiv 2410.01285) of every row, ``"<row>+dda"`` = the final
    adapter's scores minus step 0's (the model before fine-tuning), the same difference as
    ``datainf score --debias``; its seconds are the two rows'."""
    if not s.checkpoints:
        return {}
    out = {}
    for name in [*s.methods, *s.variants]:
        out[name + "+dda"] = scores[name] - scores[name + "+step0"]
        full[name + "+dda:seconds"] = full[name + ":seconds"] + full[name + "+step0:seconds"]
    return out


def full_model_scores(s: LdsSettings, trainer: ClassifierTrainer | CausalLMTrainer, train: list[dict],
                      queries: list[dict], out: Path, progress: bool, arguments: dict[str, ScoreArguments],
                      control: bool | None = None) -> dict[str, Any]:
    """The scores (as lists) and seconds (``"{row}:seconds"``) of each of ``arguments`` (row name -> arguments)
    on the model trained on all data (and, with ``checkpoints`` or ``control``, the rows of
    :func:`score_names`: :func:`run_scores`); the training store goes to ``out/store``."""
    from datainf.attributor import Attributor
    from datainf.scoring import score_store

    control = s.control if control is None else control
    if s.checkpoints or control:
        return run_scores(s, trainer, train, queries, out, progress, arguments, control)
    model, tok = trainer.fit(list(range(len(train))), train_seed=s.seed)
    att = Attributor(model, trainer.task, store=out / "store", tokenizer=tok, max_length=s.max_length,
                     batch_size=s.batch_size, progress=progress)
    att.fit(train)
    qgrads = att.gradients(queries)
    res: dict[str, Any] = {}
    for name, args in arguments.items():
        result = score_store(att.store, qgrads, args)
        res[name] = result.scores.double().numpy().tolist()
        res[name + ":seconds"] = result.seconds
    return res


def score_names(s: LdsSettings) -> list[str]:
    """The scored rows: each method and variant; with ``checkpoints`` also "<row>+step0" and "<row>+run" (and
    the derived "<row>+dda" of :func:`debiased`); with ``control`` the resemblance control."""
    from datainf.experiments.llm_identification import CONTROL

    suffixes = ("", "+step0", "+run") if s.checkpoints else ("",)
    return [m + x for m in [*s.methods, *s.variants] for x in suffixes] + ([CONTROL] if s.control else [])


def run_scores(s: LdsSettings, trainer: CausalLMTrainer, train: list[dict], queries: list[dict], out: Path,
               progress: bool, arguments: dict[str, ScoreArguments], control: bool) -> dict[str, Any]:
    """:func:`full_model_scores` of a causal LM scored along its fine-tune (``checkpoints``: the final
    adapter, step 0 and the run's learning-rate-weighted sum, by
    :func:`datainf.experiments.llm_identification.score_along_run`) and with the resemblance control
    (``control``, computed on the base model before fine-tuning)."""
    from datainf.attributor import Attributor
    from datainf.experiments.llm_identification import CONTROL, resemblance_scores, score_along_run
    from datainf.models.checkpoints import Snapshots, snapshot_steps
    from datainf.models.finetune import optimizer_steps
    from datainf.scoring import score_store

    model, tok = trainer.load()
    control = resemblance_scores(model, tok, queries=queries, train=train, max_length=s.max_length,
                                 batch_size=s.batch_size) if control else None
    everyone = list(range(len(train)))
    steps = snapshot_steps(s.checkpoints, optimizer_steps(len(train), s.batch_size, s.epochs))
    snapshots = Snapshots(model, steps, initial=True)
    trainer.train_on(model, tok, everyone, s.seed, on_step=snapshots.on_step)

    def gradients_at(store: Path):
        att = Attributor(model, trainer.task, store=store, tokenizer=tok, max_length=s.max_length,
                         batch_size=s.batch_size, progress=progress)
        att.fit(train)
        return att.store, att.gradients(queries)

    final = gradients_at(out / "store")
    per_step: list[dict[str, Any]] = []
    if s.checkpoints:
        scored, per_step = score_along_run(snapshots, gradients_at, arguments, final, out / "store-run")
    else:
        scored = {m: score_store(final[0], final[1], a) for m, a in arguments.items()}
    if control is not None:
        scored[CONTROL] = control
    res: dict[str, Any] = {}
    for name, result in scored.items():
        res[name] = result.scores.double().numpy().tolist()
        res[name + ":seconds"] = result.seconds
    for row in per_step:  # each checkpoint alone, "<row>@step<S>", and the weight it had in the run's sum
        for name, result in row["scores"].items():
            res[f"{name}@step{row['step']}"] = result.scores.double().numpy().tolist()
            res[f"{name}@step{row['step']}:seconds"] = result.seconds
            res[f"{name}@step{row['step']}:weight"] = row["lr"]
    return res


def checkpoint_rows(s: LdsSettings, full: dict[str, Any]) -> dict[str, np.ndarray]:
    """With ``checkpoints``: the rows "<row>@step<S>" of :func:`run_scores` (each checkpoint's scores alone,
    whose weight in "<row>+run" is ``full["<row>@step<S>:weight"]``), as arrays."""
    return {k: np.array(v) for k, v in full.items() if "@step" in k and ":" not in k} if s.checkpoints else {}


def subset_masks(s: LdsSettings, n_train: int) -> np.ndarray:
    """(subsets, n_train) booleans: each row keeps a random ``subset_fraction`` of the training set (the first
    rows stay the same when more subsets are asked for)."""
    rng = np.random.default_rng(s.seed + 1)
    masks = np.zeros((s.subsets, n_train), dtype=bool)
    k = int(round(s.subset_fraction * n_train))
    for i in range(s.subsets):
        masks[i, rng.permutation(n_train)[:k]] = True
    return masks


def subset_losses(s: LdsSettings, trainer: ClassifierTrainer | CausalLMTrainer, masks: np.ndarray, out: Path,
                  progress: bool) -> np.ndarray:
    """(subsets, n_query) query losses, one retrain per subset (same initialisation and training seed, only
    the data changes); each cached in ``out/subsets``."""
    losses = []
    for i in _bar(range(len(masks)), "LDS retrains", progress):
        idx = np.flatnonzero(masks[i]).tolist()
        losses.append(_cached(out / "subsets" / f"{i:04d}.json",
                              lambda idx=idx: trainer.query_losses(*trainer.fit(idx, s.seed)).tolist()))
    return np.array(losses)


def loo_examples(s: LdsSettings, n_train: int) -> list[int]:
    """The (sorted) training examples removed one at a time."""
    return np.sort(np.random.default_rng(s.seed + 2).permutation(n_train)[: s.loo_examples]).tolist()


def loo_effects(s: LdsSettings, trainer: ClassifierTrainer | CausalLMTrainer, loo_idx: list[int], n_train: int,
                out: Path, progress: bool) -> tuple[np.ndarray, float | None]:
    """Per removed example, the seed-matched change of the mean query loss (averaged over ``loo_seeds``
    training seeds); and the spread over seeds of the full model's mean loss (None with one seed). Each
    retrain is cached in ``out/loo``."""
    everyone = list(range(n_train))
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
    seed_noise = float(np.std([np.mean(b) for b in base])) if s.loo_seeds > 1 else None
    return np.array(effects), seed_noise


def _bar(it, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, disable=not progress)


__all__ = ["EXTENDABLE", "TASK_DEFAULTS", "CausalLMTrainer", "ClassifierTrainer", "LdsMethod", "LdsResult",
           "LdsSettings", "LooOutcome", "lds", "run", "run_lds", "run_scores", "score_names"]
