"""Per-example gradients of a (PEFT / LoRA) model: one gradient per example per tracked parameter tensor.

:func:`per_example_gradients` runs the forward and backward itself, inside a
:class:`datainf.collector.GradientCollector` (the one implementation of the hooks and of the projection; see
its module docstring): ONE backward pass of the SUM of the per-example losses gives every hooked ``nn.Linear``
parameter's per-example gradients, checked against the batch gradient autograd computes in the same pass.

Fallback: tracked parameters the hooks do not cover (an embedding LoRA, a raw ``nn.Parameter``, a GPT-2
``Conv1D``) or whose per-example sums disagree with the batch gradient (weights tied to another module, a
module that folds the batch into another dimension, ...) get a loop of single-example forward/backward calls,
for those parameters only, projected after the fact by the same matrices. The choice is logged once (logger
``"datainf.gradients"``, level INFO).

The projection, the tracked parameters and the LoRA grouping are defined in :mod:`datainf.collector` and
re-exported here (``datainf.gradients.ProjectionSettings`` and the others keep working).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from datainf.collector import (
    PROJECTION_KIND,
    GradientCollector,
    ParamFilter,
    ProjectionSettings,
    check_finite_gradients,
    group_lora_blocks,
    module_key,
    project_gradient,
    projected_shape,
    tracked_parameters,
)
from datainf.errors import DataInfError, NonFiniteError
from datainf.tasks import Task, batch_size, empty_examples, per_example_loss, upcast

logger = logging.getLogger("datainf.gradients")

_reported_fallbacks: set[tuple[str, ...]] = set()


class GradientDict(dict):
    """Per-example gradients (block -> tensor) that remember the projection they were made with (None:
    unprojected), so that scoring can refuse queries projected differently from the training store."""

    projection: ProjectionSettings | None = None

    def __init__(self, *args: Any, projection: ProjectionSettings | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.projection = projection

    @property
    def projection_dict(self) -> dict[str, Any] | None:
        return None if self.projection is None else self.projection.to_dict()


def _slice_example(batch: Any, index: int, size: int) -> Any:
    """Example ``index`` of a batch of ``size``: every tensor with first dimension ``size`` sliced to 1."""
    if isinstance(batch, Tensor):
        return batch[index : index + 1]
    if isinstance(batch, Mapping):
        return {
            key: value[index : index + 1] if isinstance(value, Tensor) and value.dim() and value.shape[0] == size
            else value
            for key, value in batch.items()
        }
    raise DataInfError(f"cannot split a batch of type {type(batch).__name__} into examples: pass a mapping")


def check_finite_losses(losses: Tensor, offset: int = 0) -> None:
    """Refuse a batch in which some example's loss is NaN or infinite (its gradient would be stored as if it
    were fine: zero where a NaN was masked, finite for an infinite loss), naming the examples."""
    losses = losses.detach()
    bad = ~torch.isfinite(losses)
    if bool(bad.any()):
        idx = bad.nonzero().flatten().tolist()
        values = [float(losses[i]) for i in idx]
        shown = ", ".join(f"{offset + i} ({v})" for i, v in zip(idx[:10], values))
        raise NonFiniteError(f"examples of the batch have a non-finite loss: {shown}",
                             [offset + i for i in idx], "loss", values)


def _loop_path(model: nn.Module, batch: Any, task: Task, params: dict[str, nn.Parameter], size: int) -> dict[str, Tensor]:
    """Per-example gradients ((B, *shape), float32 or float64) of ``params`` by one forward/backward each."""
    rows: dict[str, list[Tensor]] = {name: [] for name in params}
    names = list(params)
    for index in range(size):
        example = _slice_example(batch, index, size)
        loss = per_example_loss(task, model, example)
        if loss.shape[0] != 1:
            raise DataInfError(f"the task's loss returned {loss.shape[0]} values for a single example {index}")
        check_finite_losses(loss, offset=index)
        grads = torch.autograd.grad(loss.sum(), [params[name] for name in names], allow_unused=True)
        for name, grad in zip(names, grads):
            param = params[name]
            rows[name].append(torch.zeros(param.shape, dtype=upcast(param).dtype, device=param.device)
                              if grad is None else upcast(grad))
    return {name: torch.stack(rows[name]) for name in names}


def per_example_gradients(
    model: nn.Module,
    batch: Any,
    task: Task = "classification",
    *,
    params: ParamFilter = None,
    group_lora: bool = False,
    train_mode: bool = False,
    factors: Any = None,
    projection: ProjectionSettings | None = None,
) -> dict[str, Tensor]:
    """The gradient of EACH example's own loss with respect to every tracked parameter tensor.

    model: any torch model, typically a PEFT model with a LoRA adapter.
    batch: a mapping of model inputs plus ``labels`` (see datainf.tasks), with B examples.
    task: ``"classification"``, ``"causal_lm"``, ``"causal_lm_mean"`` or a callable
        ``loss(model, batch) -> (B,)`` (see datainf.tasks).
    params: which parameters to track (see ``tracked_parameters``); default every trainable one.
    group_lora: join the lora_A and lora_B of one adapted module into one flattened block named after the
        module (``"...value.lora"``, shape (B, numel_A + numel_B)).
    train_mode: run the model in train mode (dropout on; examples of the fast path then see different
        dropout masks than alone). Default eval mode. The model's modes are restored afterwards.
    factors: a ``datainf.estimators.kfac.KFACFactors`` to accumulate the K-FAC factors of the hooked nn.Linear
        blocks into, from the same forward/backward pass (padding excluded via ``batch["attention_mask"]``).
        Blocks on the slow path get no factors. Keyed by parameter name (also with group_lora). With a
        projection, the factors are those of the projected inputs and output gradients.
    projection: a :class:`ProjectionSettings` to project every gradient with fixed seeded random matrices
        inside the hooks (never forming the full per-example gradient; the fallback path projects after
        the fact): each tensor becomes (B, *projected_shape(param.shape)). Default None: full gradients.

    Returns {name: tensor (B, *param.shape)} (projected: (B, *projected_shape(param.shape))) on the
    parameters' device, in parameter order: float32, or
    float64 for a float64 model (half-precision models are accumulated in float32).
    An example whose loss or gradient is NaN or infinite raises :class:`~datainf.errors.NonFiniteError`
    naming it (by its index in the batch): a masked NaN would otherwise give a zero gradient, an infinite
    loss a finite one.
    Trainable parameters that are not tracked are frozen during the call; ``requires_grad`` flags, ``.grad``
    fields and train/eval modes are left as they were. An example with no loss tokens gets a zero gradient
    and a warning naming its index.
    """
    tracked = tracked_parameters(model, params)
    tracked_ids = {id(p) for p in tracked.values()}
    untracked = [p for p in model.parameters() if p.requires_grad and id(p) not in tracked_ids]
    frozen = [p for p in tracked.values() if not p.requires_grad]  # an adapter loaded for inference
    modes = {module: module.training for module in model.modules()}
    try:
        for p in untracked:
            p.requires_grad_(False)
        for p in frozen:
            p.requires_grad_(True)
        model.train(train_mode)
        with torch.enable_grad():
            grads, size = _run(model, batch, task, tracked, factors, projection)
    finally:
        for p in untracked:
            p.requires_grad_(True)
        for p in frozen:
            p.requires_grad_(False)
        for module, training in modes.items():
            module.training = training

    empty = empty_examples(task, batch)
    if empty:
        warnings.warn(
            f"examples {empty} of the batch have no response tokens (every label is -100): their gradient is zero",
            stacklevel=2,
        )
        for grad in grads.values():
            grad[empty] = 0.0
    grads = {name: grads[name] for name in tracked}
    check_finite_gradients(grads)
    return group_lora_blocks(grads) if group_lora else grads


def _run(
    model: nn.Module, batch: Any, task: Task, tracked: dict[str, nn.Parameter], factors: Any = None,
    projection: ProjectionSettings | None = None,
) -> tuple[dict[str, Tensor], int]:
    """Every tracked parameter's per-example gradients: the collector's for those its hooks give, a loop of
    single-example backward calls for the rest. Returns (gradients, batch size)."""
    collector = GradientCollector(model, params=tracked, projection=projection)
    grads: dict[str, Tensor] = {}
    size = batch_size(batch)
    if collector.covered:
        with collector:
            losses = per_example_loss(task, model, batch)
            check_finite_losses(losses)
            size = losses.shape[0]
            # autograd.grad leaves the .grad fields alone; the collector's hooks see this pass all the same
            torch.autograd.grad(losses.sum(), [tracked[name] for name in collector.covered], allow_unused=True)
            mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            grads = collector.take(batch_size=size, partial=True, factors=factors, attention_mask=mask)
    rest = {name: p for name, p in tracked.items() if name not in grads}
    if rest:
        if size is None:
            raise DataInfError("cannot tell the batch size: give the batch a 'labels' tensor or another tensor input")
        key = tuple(rest)
        if key not in _reported_fallbacks:
            _reported_fallbacks.add(key)
            logger.info(
                "per-example gradients of %d parameter tensor(s) not owned by an nn.Linear (or whose hooks "
                "disagreed with autograd) use a loop of single-example backward calls: %s",
                len(rest),
                ", ".join(rest),
            )
        looped = _loop_path(model, batch, task, rest, size)
        grads.update({name: project_gradient(name, g, projection) for name, g in looped.items()})
    return grads, size


def projection_layout(model: nn.Module, projection: ProjectionSettings, *, params: ParamFilter = None,
                      group_lora: bool = False) -> dict[str, Any]:
    """What a store's manifest records about a projection: the settings and, per block (named as
    :func:`per_example_gradients` names them), its full and its projected per-example shape."""
    tracked = tracked_parameters(model, params)

    def shapes(project: bool) -> dict[str, tuple[int, ...]]:
        fake = {name: torch.empty((0, *(projected_shape(p.shape, projection) if project else p.shape)), device="meta")
                for name, p in tracked.items()}
        grouped = group_lora_blocks(fake) if group_lora else fake
        return {name: tuple(t.shape[1:]) for name, t in grouped.items()}

    full, projected = shapes(False), shapes(True)
    return {**projection.to_dict(),
            "blocks": {name: {"shape": list(projected[name]), "full_shape": list(full[name])} for name in full}}


__all__ = [
    "PROJECTION_KIND", "GradientCollector", "GradientDict", "ParamFilter", "ProjectionSettings",
    "check_finite_gradients", "check_finite_losses", "module_key", "per_example_gradients", "project_gradient",
    "projected_shape", "projection_layout", "tracked_parameters",
]
