"""The loss each example of a batch contributes: one number per example, never averaged over the batch.

A *task* says how to turn ``model(**inputs)`` into per-example losses. It is one of

* ``"classification"``  cross-entropy of a sequence-classification model's ``logits`` (B, C) against
  ``batch["labels"]`` (B,) of class indices;
* ``"causal_lm"``       negative log-likelihood SUMMED over the response tokens: ``batch["labels"]`` is
  (B, T) with -100 on prompt and padding tokens, and ``logits[:, t]`` predicts ``labels[:, t + 1]``;
* ``"causal_lm_mean"``  the same divided by the example's number of response tokens;
* a callable ``loss(model, batch) -> Tensor (B,)`` for anything else.

The batch is a mapping of model inputs. Every key except ``labels`` is passed to the model's forward as a
keyword argument. For the causal LM tasks, when the batch has an ``attention_mask`` but no
``position_ids`` and the model's forward accepts them, ``position_ids = cumsum(attention_mask) - 1``
(clamped at 0) are passed too, so that left- and right-padded batches give each example the same loss as
the unpadded example alone.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datainf.errors import DataInfError

#: label value of tokens that carry no loss (prompt and padding), as in Hugging Face
IGNORE_INDEX = -100

LossFn = Callable[[nn.Module, Mapping[str, Any]], Tensor]
Task = str | LossFn

TASKS = ("classification", "causal_lm", "causal_lm_mean")


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


_BUILTIN: dict[str, LossFn] = {
    "classification": classification_loss,
    "causal_lm": causal_lm_loss,
    "causal_lm_mean": _causal_lm_mean,
}


def resolve_task(task: Task) -> LossFn:
    """The loss function ``(model, batch) -> Tensor (B,)`` of a task name or callable."""
    if callable(task):
        return task
    if isinstance(task, str) and task in _BUILTIN:
        return _BUILTIN[task]
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
    if task not in ("causal_lm", "causal_lm_mean") or not isinstance(batch, Mapping):
        return []
    labels = batch.get("labels")
    if not isinstance(labels, Tensor) or labels.dim() != 2:
        return []
    return torch.nonzero(response_token_counts(labels) == 0).flatten().tolist()
