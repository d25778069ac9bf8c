"""The loss each example of a batch contributes: one number per example, never averaged over the batch.

A *task* says how to turn ``model(**inputs)`` into per-example losses. It is one of

* ``"classification"``  cross-entropy of a sequence-classification model's ``logits`` (B, C) against
  ``batch["labels"]`` (B,) of class indices;
* ``"causal_lm"``       negative log-likelihood SUMMED over the response tokens: ``batch["labels"]`` is
  (B, T) with -100 on prompt and padding tokens, and ``logits[:, t]`` predicts ``labels[:, t + 1]``;
* ``"causal_lm_mean"``  the same divided by the example's number of response tokens;
* :class:`DiffusionLoss`  a diffusion model's noise-prediction MSE at fixed timesteps with per-example seeded
  noise (a callable built with the noise scheduler);
* a callable ``loss(model, batch) -> Tensor (B,)`` for anything else.

The batch is a mapping of model inputs. Every key except ``labels`` is passed to the model's forward as a
keyword argument. For the causal LM tasks, when the batch has an ``attention_mask`` but no
``position_ids`` and the model's forward accepts them, ``position_ids = cumsum(attention_mask) - 1``
(clamped at 0) are passed too, so that left- and right-padded batches give each example the same loss as
the unpadded example alone.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datainf.adapters import ADAPTER_MARKER, ADAPTER_NAME_PARTS
from datainf.errors import DataInfError, parse_json

#: label value of tokens that carry no loss (prompt and padding), as in Hugging Face
IGNORE_INDEX = -100

LossFn = Callable[[nn.Module, Mapping[str, Any]], Tensor]
Task = str | LossFn

#: the fixed timesteps of the paper's diffusion notebook
PAPER_TIMESTEPS = (25, 225, 425, 525, 725, 925)


def _logits(output: Any) -> Tensor:
    """The logits of a model output: ``output.logits``, ``output["logits"]``, ``output[0]`` or the tensor."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None and isinstance(output, tuple | list) and output:
        logits = output[0]
    if not isinstance(logits, Tensor):
        raise DataInfError("the model's output has no logits: use a model returning .logits, or a loss callable")
    return logits


def _labels(batch: Mapping[str, Any], task: str) -> Tensor:
    if not isinstance(batch, Mapping):
        raise DataInfError(f"task {task!r} needs the batch as a mapping of model inputs, got {type(batch).__name__}")
    labels = batch.get("labels")
    if not isinstance(labels, Tensor):
        raise DataInfError(f"task {task!r} needs batch['labels'] as a tensor; add a 'labels' key to the batch")
    return labels


def _accepts(model: nn.Module, name: str) -> bool:
    """Whether the forward of ``model`` (or of the model a PEFT wrapper holds) takes keyword ``name``."""
    candidates = [model]
    if hasattr(model, "get_base_model"):
        candidates.append(model.get_base_model())
    for candidate in candidates:
        try:
            params = inspect.signature(candidate.forward).parameters
        except (TypeError, ValueError):
            continue
        if name in params:
            return True
    return False


def upcast(t: Tensor) -> Tensor:
    """float16/bfloat16 -> float32 for the loss; float32 and float64 stay as they are (a float64 model gives
    float64 losses and gradients, which the tests use as exact references)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in batch.items() if key != "labels"}


def classification_loss(model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
    """Per-example cross-entropy of ``model(**inputs).logits`` (B, C) against ``batch["labels"]`` (B,).

    Returns a float tensor of shape (B,) (float32, or float64 for a float64 model).
    """
    labels = _labels(batch, "classification")
    if labels.dim() != 1 or labels.dtype.is_floating_point:
        raise DataInfError(
            f"task 'classification' needs batch['labels'] of class indices with shape (B,), "
            f"got dtype {labels.dtype} and shape {tuple(labels.shape)}"
        )
    logits = _logits(model(**_model_inputs(batch)))
    if logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
        raise DataInfError(
            f"task 'classification' needs logits of shape (B, num_labels) with B = {labels.shape[0]}, "
            f"got {tuple(logits.shape)}: is this a sequence-classification model?"
        )
    outside = (labels < 0) | (labels >= logits.shape[1])
    if bool(outside.any()):
        k = int(outside.nonzero()[0])
        raise DataInfError(f"example {k} of the batch has label {int(labels[k])}, but the model has "
                           f"{logits.shape[1]} classes (ids 0..{logits.shape[1] - 1})")
    return F.cross_entropy(upcast(logits), labels.to(logits.device), reduction="none")


def response_token_counts(labels: Tensor) -> Tensor:
    """Number of response tokens of each example: labels (B, T) -> (B,) long, counting ``labels[:, 1:]``
    entries other than -100 (the first token is never predicted)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)


def causal_lm_loss(model: nn.Module, batch: Mapping[str, Any], *, reduction: str = "sum") -> Tensor:
    """Per-example negative log-likelihood of the response tokens of a causal LM.

    batch["labels"]: (B, T) token ids with -100 on prompt and padding tokens; ``logits[:, t]`` (from the
    model's forward on the other keys) predicts ``labels[:, t + 1]``.
    reduction: ``"sum"`` over the response tokens, or ``"mean"`` (divided by their number; an example with
    no response tokens has loss 0 either way).
    Returns a float tensor of shape (B,).
    """
    if reduction not in ("sum", "mean"):
        raise DataInfError(f"causal_lm reduction must be 'sum' or 'mean', got {reduction!r}")
    labels = _labels(batch, "causal_lm")
    if labels.dim() != 2:
        raise DataInfError(
            f"task 'causal_lm' needs batch['labels'] of shape (B, T) with -100 on prompt and padding, "
            f"got shape {tuple(labels.shape)}"
        )
    inputs = _model_inputs(batch)
    mask = inputs.get("attention_mask")
    if isinstance(mask, Tensor) and "position_ids" not in inputs and _accepts(model, "position_ids"):
        inputs["position_ids"] = (mask.long().cumsum(dim=-1) - 1).clamp(min=0)
    logits = _logits(model(**inputs))
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise DataInfError(
            f"task 'causal_lm' needs logits of shape (B, T, vocab) matching labels {tuple(labels.shape)}, "
            f"got {tuple(logits.shape)}: is this a causal LM?"
        )
    targets = labels[:, 1:].to(logits.device)
    predictions = upcast(logits[:, :-1])
    keep = targets != IGNORE_INDEX
    # Ignored positions get loss exactly 0 and gradient exactly 0 (the where also stops NaN from
    # fully masked padding rows reaching the backward pass).
    safe_targets = torch.where(keep, targets, torch.zeros_like(targets))
    safe_predictions = torch.where(keep.unsqueeze(-1), predictions, torch.zeros_like(predictions))
    nll = F.cross_entropy(safe_predictions.transpose(1, 2), safe_targets, reduction="none")
    per_example = torch.where(keep, nll, torch.zeros_like(nll)).sum(dim=1)
    if reduction == "mean":
        per_example = per_example / keep.sum(dim=1).clamp(min=1)
    return per_example


def _causal_lm_mean(model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
    return causal_lm_loss(model, batch, reduction="mean")


@dataclass(frozen=True)
class TaskSpec:
    """A task as one object: what its examples are trained on and what a query measures.

    name: how stores, adapters and the CLI call it.
    loss: the training loss, ``(model, batch) -> Tensor (B,)``: the training examples' gradients.
    measurement: what a query's gradient is of, ``(model, batch) -> Tensor (B,)`` (e.g. a class's
        log-probability margin, a token span's log-likelihood); None: the training loss (the paper's setting).
    collate: which records the collator builds: ``"classification"`` ({"text", "label"}) or ``"causal_lm"``
        (chat, prompt/response or text records with -100 on the tokens that carry no loss).
    tracked: name parts of the parameters whose gradients are taken (PEFT's adapter parameters).
    peft_task_type: the ``task_type`` PEFT writes in adapter_config.json for a model of this task.

    A spec is itself a loss callable (its training loss), so it goes wherever a task name or loss does;
    :meth:`query` is the spec whose loss is the measurement, for the queries' gradients.
    """

    name: str
    loss: LossFn
    measurement: LossFn | None = None
    collate: str = "classification"
    tracked: tuple[str, ...] = ADAPTER_NAME_PARTS
    peft_task_type: str | None = None

    def __call__(self, model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
        return self.loss(model, batch)

    @property
    def token_level(self) -> bool:
        """Whether the loss is over tokens with -100 on those without one (an example may have none)."""
        return self.collate == "causal_lm"

    def query(self) -> TaskSpec:
        """The task whose loss is this one's query measurement (itself when it has none)."""
        if self.measurement is None:
            return self
        return replace(self, name=f"{self.name}:query", loss=self.measurement, measurement=None)


#: the named tasks, declared once: every name the CLI, stores and adapters use
NAMED_TASKS: dict[str, TaskSpec] = {
    spec.name: spec for spec in (
        TaskSpec("classification", classification_loss, collate="classification", peft_task_type="SEQ_CLS"),
        TaskSpec("causal_lm", causal_lm_loss, collate="causal_lm", peft_task_type="CAUSAL_LM"),
        TaskSpec("causal_lm_mean", _causal_lm_mean, collate="causal_lm", peft_task_type="CAUSAL_LM"),
    )
}
TASKS = tuple(NAMED_TASKS)
#: the name of the task of each kind of record a collator builds, when nothing else says
DEFAULT_TASK = TASKS[0]


def get_task(task: str | TaskSpec) -> TaskSpec:
    """The spec of a named task (a spec is returned as it is); one line listing the names otherwise."""
    if isinstance(task, TaskSpec):
        return task
    if isinstance(task, str) and task in NAMED_TASKS:
        return NAMED_TASKS[task]
    raise DataInfError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")


def token_level(task: Task) -> bool:
    """Whether ``task`` (a name or spec) scores tokens of a causal LM (False for a plain loss callable)."""
    spec = task if isinstance(task, TaskSpec) else NAMED_TASKS.get(task) if isinstance(task, str) else None
    return spec is not None and spec.token_level


def recorded_task(adapter_dir: str | Path | None) -> tuple[str, str] | None:
    """(task name, the file that says so) of an adapter folder: what `datainf finetune` recorded in its
    marker file, else the ``task_type`` PEFT wrote in adapter_config.json (a causal LM or a sequence
    classifier); None when neither names a task this library has."""
    if adapter_dir is None:
        return None
    folder = Path(adapter_dir)
    marker = folder / ADAPTER_MARKER
    for path, key in ((marker, "task"), (folder / "adapter_config.json", "task_type")):
        if not path.is_file():
            continue
        try:
            data = parse_json(path.read_bytes(), str(path))
        except (DataInfError, OSError):
            continue
        value = data.get(key) if isinstance(data, dict) else None
        if key == "task" and value in NAMED_TASKS:
            return str(value), str(path)
        if key == "task_type" and isinstance(value, str):
            names = [spec.name for spec in NAMED_TASKS.values() if spec.peft_task_type == value]
            if names:
                return names[0], str(path)
    return None


class DiffusionLoss:
    """Per-example denoising loss ``loss(model, batch) -> (B,)``, deterministic per example.

    Args:
        scheduler: a diffusers noise scheduler with ``add_noise`` (DDPMScheduler, DDIMScheduler, ...);
            its ``prediction_type`` ("epsilon", "v_prediction" or "sample") sets the target.
        timesteps: the fixed timesteps the loss is averaged over.
        noise_draws: noise samples per timestep (averaged).
        seed: global seed; example noise is drawn from ``seed`` and the example's ``batch["seed"]`` (or
            ``batch["index"]``), a (B,) integer tensor. Without either, example i of the batch uses i
            (then the loss depends on the batch order: pass seeds).

    The batch: ``pixel_values`` or ``latents`` (B, C, H, W), plus ``encoder_hidden_states`` (B, L, D) and
    optional ``encoder_attention_mask`` (B, L) for a UNet2DConditionModel, or ``class_labels`` (B,) for a
    class-conditional UNet2DModel. Returns the MSE between the model's prediction and the target,
    averaged over pixels, timesteps and draws: (B,), float32 (float64 for a float64 model and batch).
    """

    def __init__(self, scheduler: Any, timesteps: Sequence[int] = PAPER_TIMESTEPS, noise_draws: int = 1,
                 seed: int = 0):
        total = int(getattr(getattr(scheduler, "config", None), "num_train_timesteps", 1000))
        timesteps = tuple(int(t) for t in timesteps)
        if not timesteps:
            raise DataInfError("DiffusionLoss needs at least one timestep")
        bad = [t for t in timesteps if not 0 <= t < total]
        if bad:
            raise DataInfError(f"timesteps {bad} are outside the scheduler's range 0..{total - 1}")
        if noise_draws < 1:
            raise DataInfError(f"noise_draws must be >= 1, got {noise_draws}")
        if not hasattr(scheduler, "add_noise"):
            raise DataInfError("the scheduler has no add_noise method: pass a diffusers DDPMScheduler or alike")
        self.scheduler = scheduler
        self.timesteps = timesteps
        self.noise_draws = int(noise_draws)
        self.seed = int(seed)
        self.__qualname__ = f"DiffusionLoss(t={list(timesteps)}, draws={noise_draws}, seed={seed})"

    def noise(self, seeds: Tensor, shape: tuple[int, ...]) -> Tensor:
        """Noise (B, draws, T, *shape) on the CPU, example b's drawn from its own generator."""
        out = []
        for s in seeds.tolist():
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(s))
            out.append(torch.randn(self.noise_draws, len(self.timesteps), *shape, generator=generator))
        return torch.stack(out)

    def __call__(self, model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
        if not isinstance(batch, Mapping):
            raise DataInfError("the diffusion task needs the batch as a mapping with 'pixel_values' or 'latents'")
        x0 = batch.get("latents", batch.get("pixel_values"))
        if not isinstance(x0, Tensor) or x0.dim() != 4:
            raise DataInfError("the diffusion batch needs 'pixel_values' (or 'latents') of shape (B, C, H, W)")
        size = x0.shape[0]
        seeds = batch.get("seed", batch.get("index"))
        if seeds is None:
            seeds = torch.arange(size)
        seeds = torch.as_tensor(seeds).reshape(-1)
        if seeds.shape[0] != size:
            raise DataInfError(f"batch['seed'] has {seeds.shape[0]} entries for {size} images; give one per image")
        kwargs: dict[str, Any] = {}
        for key in ("encoder_hidden_states", "encoder_attention_mask", "class_labels"):
            if batch.get(key) is not None:
                kwargs[key] = batch[key]
        noise = self.noise(seeds, tuple(x0.shape[1:])).to(device=x0.device, dtype=x0.dtype)
        prediction_type = getattr(self.scheduler.config, "prediction_type", "epsilon")
        total = torch.zeros(size, device=x0.device, dtype=torch.promote_types(x0.dtype, torch.float32))
        for d in range(self.noise_draws):
            for k, t in enumerate(self.timesteps):
                eps = noise[:, d, k]
                steps = torch.full((size,), t, dtype=torch.long, device=x0.device)
                noisy = self.scheduler.add_noise(x0, eps, steps)
                pred = model(noisy, steps, **kwargs, return_dict=False)[0]
                if prediction_type == "epsilon":
                    target = eps
                elif prediction_type == "v_prediction":
                    target = self.scheduler.get_velocity(x0, eps, steps)
                elif prediction_type == "sample":
                    target = x0
                else:
                    raise DataInfError(f"unsupported scheduler prediction_type {prediction_type!r}")
                total = total + (pred.to(total.dtype) - target.to(total.dtype)).pow(2).flatten(1).mean(dim=1)
        return total / (self.noise_draws * len(self.timesteps))



def resolve_task(task: Task) -> LossFn:
    """The loss function ``(model, batch) -> Tensor (B,)`` of a task name, spec or callable."""
    if callable(task):
        return task
    if isinstance(task, str) and task in NAMED_TASKS:
        return NAMED_TASKS[task]
    raise DataInfError(f"unknown task {task!r}: use one of {', '.join(TASKS)} or a callable loss(model, batch)")


def per_example_loss(task: Task, model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
    """Each example's own loss: a tensor of shape (batch_size,), still attached to the autograd graph."""
    losses = resolve_task(task)(model, batch)
    if not isinstance(losses, Tensor) or losses.dim() != 1:
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise DataInfError(f"the task's loss must return one value per example, shape (B,), got {shape}")
    size = batch_size(batch)
    if size is not None and losses.shape[0] != size:
        raise DataInfError(f"the task's loss returned {losses.shape[0]} values for a batch of {size} examples")
    return losses


def batch_size(batch: Any) -> int | None:
    """The batch size: the first dimension of ``labels``, else of the first tensor in the batch."""
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.dim() else None
    if not isinstance(batch, Mapping):
        return None
    tensors = [batch["labels"]] if isinstance(batch.get("labels"), Tensor) else []
    tensors += [value for value in batch.values() if isinstance(value, Tensor)]
    for tensor in tensors:
        if tensor.dim() > 0:
            return tensor.shape[0]
    return None


def empty_examples(task: Task, batch: Mapping[str, Any]) -> list[int]:
    """Indices of the examples whose loss has no tokens (a causal LM task with every label -100 after the
    first position); always empty for other tasks."""
    if not token_level(task) or not isinstance(batch, Mapping):
        return []
    labels = batch.get("labels")
    if not isinstance(labels, Tensor) or labels.dim() != 2:
        return []
    return torch.nonzero(response_token_counts(labels) == 0).flatten().tolist()
