"""Per-example gradients of a (PEFT / LoRA) model: one gradient per example per tracked parameter tensor.

Fast path: every tracked parameter that is the ``weight`` or ``bias`` of an ``nn.Linear`` (PEFT's
``lora_A`` / ``lora_B`` and a ``modules_to_save`` classifier are) is handled by hooks. A forward hook saves
the module's input x (B, ..., in) and a tensor hook on its output catches the output gradient g
(B, ..., out) during ONE backward pass of the SUM of the per-example losses; since examples do not interact
(eval mode), ``einsum("b...o,b...i->boi", g, x)`` is each example's weight gradient and ``g`` summed over
the middle dimensions its bias gradient. Padding cannot leak: a padded position's output gradient is zero.

As a safety net, the per-example gradients summed over the batch are compared with the batch gradient
autograd computes in the same pass; a parameter whose sums disagree (weights tied to another module, a
module that folds the batch into another dimension, ...) falls back to the slow path.

Fallback: tracked parameters the fast path does not cover (an embedding LoRA, a raw ``nn.Parameter``, a
GPT-2 ``Conv1D``) get a loop of single-example forward/backward calls, for those parameters only. The
choice is logged once (logger ``"datainf.gradients"``, level INFO).

Projection (``projection=ProjectionSettings(dim=k, seed=s)``): each side of a tracked module whose dimension
exceeds k is multiplied by a fixed random matrix ``P`` (size x k, Gaussian / sqrt(k), drawn from the seed and
the module's name) BEFORE the per-example outer product: the weight gradient ``sum_t g_t x_t^T`` becomes
``P_out^T (sum_t g_t x_t^T) P_in = sum_t (P_out^T g_t)(P_in^T x_t)^T`` (a Kronecker-structured projection, as
LoGra does), so the full-size per-example gradient is never formed. For a LoRA A (r x d_in) only d_in is
projected, for a B (d_out x r) only d_out, for a full matrix both, for a bias its out side. Parameters on the
single-example fallback path are projected after the fact by the same matrices.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from datainf.adapters import adapter_parameters
from datainf.errors import DataInfError, NonFiniteError
from datainf.tasks import Task, batch_size, empty_examples, per_example_loss, upcast

logger = logging.getLogger("datainf.gradients")

ParamFilter = Sequence[str] | Callable[[str, nn.Parameter], bool] | None

_NO_TRAINABLE = ("no trainable parameters and no LoRA adapter: load a PEFT model with a LoRA adapter "
                 "(PeftModel.from_pretrained(base, adapter_folder))")
_LORA_NAME = re.compile(r"^(?P<module>.*)\.lora_[A-Za-z_]+\.(?P<adapter>[^.]+)(\.[^.]+)?$")
_reported_fallbacks: set[tuple[str, ...]] = set()


@dataclass(frozen=True)
class ProjectionSettings:
    """Random projection of the per-example gradients inside the hooks (see the module docstring).

    dim: k, the size every side larger than k is projected to (a LoRA A r x d_in becomes r x k, a B
        d_out x r becomes k x r, a full matrix k x k, a bias k).
    seed: the matrices are drawn from this seed and each module's name (and side and size), so every
        process, call and Attributor with the same settings gets the same matrices.
    """

    dim: int
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise DataInfError(f"projection dim must be an integer >= 1, got {self.dim!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise DataInfError(f"projection seed must be an integer >= 0, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        """What a store's manifest and task fingerprint record."""
        return {"dim": self.dim, "seed": self.seed, "kind": PROJECTION_KIND}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> ProjectionSettings | None:
        """The settings a manifest recorded (None for an unprojected store)."""
        if not data:
            return None
        if data.get("kind", PROJECTION_KIND) != PROJECTION_KIND:
            raise DataInfError(f"unknown projection kind {data.get('kind')!r}; this library makes {PROJECTION_KIND!r}")
        return cls(dim=int(data["dim"]), seed=int(data["seed"]))

    def projects(self, size: int) -> bool:
        """Whether a side of this size is projected (only sides larger than dim are)."""
        return size > self.dim

    def matrix(self, module: str, side: str, size: int, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> Tensor:
        """The (size, dim) matrix of one module's side ("in" or "out"): N(0, 1/dim) entries drawn in float64 on
        the CPU from a generator seeded by sha256(seed, module, side, size, dim), then cast."""
        key = (self.dim, self.seed, module, side, int(size), dtype, str(device))
        cached = _MATRICES.get(key)
        if cached is not None:
            return cached
        base = (self.dim, self.seed, module, side, int(size), torch.float64, "cpu")
        full = _MATRICES.get(base)
        if full is None:
            digest = hashlib.sha256(f"datainf-projection|{self.seed}|{module}|{side}|{size}|{self.dim}".encode())
            generator = torch.Generator().manual_seed(int.from_bytes(digest.digest()[:8], "little") >> 1)
            full = torch.randn(int(size), self.dim, generator=generator, dtype=torch.float64) / math.sqrt(self.dim)
            _remember(base, full)
        out = full.to(device=device, dtype=dtype)
        _remember(key, out)
        return out


#: the projection scheme this library draws (recorded in manifests, so another scheme is refused)
PROJECTION_KIND = "gaussian-kronecker"
_MATRICES: dict[tuple, Tensor] = {}
_MAX_MATRICES = 4096


def _remember(key: tuple, value: Tensor) -> None:
    if len(_MATRICES) >= _MAX_MATRICES:
        _MATRICES.clear()
    _MATRICES[key] = value


def module_key(name: str) -> str:
    """The module a parameter belongs to ("a.b.weight" -> "a.b"); a raw parameter is its own module."""
    head, _, last = name.rpartition(".")
    return head if head and last in ("weight", "bias") else name


def projected_shape(shape: Sequence[int], projection: ProjectionSettings | None) -> tuple[int, ...]:
    """The per-example shape of a parameter's projected gradient: (out,) -> (k or out,); (out, in, ...) ->
    (k or out, k or prod(in, ...)); unchanged when no side is larger than k."""
    shape = tuple(int(s) for s in shape)
    if projection is None or not shape:
        return shape
    out, rest = shape[0], math.prod(shape[1:])
    if len(shape) == 1:
        return (projection.dim,) if projection.projects(out) else shape
    if not (projection.projects(out) or projection.projects(rest)):
        return shape
    return (projection.dim if projection.projects(out) else out, projection.dim if projection.projects(rest) else rest)


def project_gradient(name: str, grad: Tensor, projection: ProjectionSettings | None, *,
                     batched: bool = True) -> Tensor:
    """A full gradient (B, *shape) (or (*shape) with ``batched=False``) of parameter ``name`` projected by the
    module's matrices: ``P_out^T G P_in`` (sides of size <= k untouched), shape (B, *projected_shape)."""
    if projection is None:
        return grad
    t = grad if batched else grad.unsqueeze(0)
    shape = tuple(t.shape[1:])
    target = projected_shape(shape, projection)
    if target == shape:
        return grad
    key = module_key(name)
    if len(shape) == 1:
        t = t @ projection.matrix(key, "out", shape[0], t.dtype, t.device)
    else:
        t = t.reshape(t.shape[0], shape[0], -1)
        if projection.projects(shape[0]):
            t = torch.einsum("boi,ok->bki", t, projection.matrix(key, "out", shape[0], t.dtype, t.device))
        if projection.projects(t.shape[-1]):
            t = t @ projection.matrix(key, "in", t.shape[-1], t.dtype, t.device)
    return t if batched else t[0]


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


def tracked_parameters(model: nn.Module, params: ParamFilter = None) -> dict[str, nn.Parameter]:
    """The parameters whose per-example gradients are computed, by name (as in ``model.named_parameters()``).

    params: None for every parameter with ``requires_grad=True`` (for a PEFT model loaded for inference,
    with every parameter frozen: its LoRA and ``modules_to_save`` parameters, see :mod:`datainf.adapters`);
    a list of names (each must be one of those); or a predicate ``(name, param) -> bool`` over them.
    Raises DataInfError when nothing is tracked.
    """
    trainable = adapter_parameters(model)  # or, for a PEFT model loaded for inference, its LoRA parameters
    if not trainable:
        raise DataInfError(_NO_TRAINABLE)
    if params is None:
        return trainable
    if callable(params):
        chosen = {name: p for name, p in trainable.items() if params(name, p)}
        if not chosen:
            raise DataInfError("the params predicate selected no trainable parameter: loosen the predicate")
        return chosen
    if isinstance(params, str):
        params = [params]
    everything = dict(model.named_parameters())
    chosen = {}
    for name in params:
        if name not in everything:
            raise DataInfError(f"params names {name!r}, which is not a parameter of the model")
        if name not in trainable:
            raise DataInfError(f"params names {name!r}, which is frozen (requires_grad=False)")
        chosen[name] = trainable[name]
    if not chosen:
        raise DataInfError("params is an empty list: name at least one trainable parameter")
    return chosen


@dataclass
class _Call:
    """One call of a hooked nn.Linear: its input (B, ..., in) and, after backward, output grad (B, ..., out)."""

    inputs: Tensor
    grad: Tensor | None = None


@dataclass
class _LinearRecord:
    module: nn.Linear
    weight: str | None  # tracked parameter name of module.weight, if tracked
    bias: str | None
    calls: list[_Call] = field(default_factory=list)


def _linear_records(model: nn.Module, tracked: dict[str, nn.Parameter]) -> list[_LinearRecord]:
    """The nn.Linear modules owning a tracked weight or bias."""
    name_of = {id(p): name for name, p in tracked.items()}
    records = []
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        weight = name_of.get(id(module.weight))
        bias = name_of.get(id(module.bias)) if module.bias is not None else None
        if weight is not None or bias is not None:
            records.append(_LinearRecord(module, weight, bias))
    return records


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


def _fast_path(
    model: nn.Module, batch: Any, task: Task, tracked: dict[str, nn.Parameter], records: list[_LinearRecord],
    factors: Any = None, projection: ProjectionSettings | None = None,
) -> tuple[dict[str, Tensor], int]:
    """Per-example gradients ((B, *shape), float32 or float64) of the parameters owned by ``records`` from one forward
    and one backward pass (projected: (B, *projected_shape), the inputs and output gradients projected before
    the outer product); parameters whose per-example sums disagree with autograd's batch gradient (projected
    the same way) are left out. Returns (gradients, batch size)."""
    handles = []

    def forward_hook(record: _LinearRecord) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            if not torch.is_grad_enabled() or not isinstance(output, Tensor) or not output.requires_grad:
                return
            call = _Call(args[0].detach())
            record.calls.append(call)

            def grad_hook(grad: Tensor) -> None:
                call.grad = grad.detach()

            output.register_hook(grad_hook)

        return hook

    try:
        for record in records:
            record.calls.clear()
            handles.append(record.module.register_forward_hook(forward_hook(record)))
        losses = per_example_loss(task, model, batch)
        check_finite_losses(losses)
        names = [name for record in records for name in (record.weight, record.bias) if name is not None]
        totals = torch.autograd.grad(losses.sum(), [tracked[name] for name in names], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    size = losses.shape[0]
    total_of = dict(zip(names, totals))

    grads: dict[str, Tensor] = {}
    for record in records:
        weight_grad, bias_grad, ok = None, None, True
        key = module_key(record.weight or record.bias or "")
        for call in record.calls:
            if call.grad is None:
                continue
            g, x = upcast(call.grad), upcast(call.inputs)
            if g.shape[0] != size or x.shape[0] != size or g.shape[:-1] != x.shape[:-1]:
                ok = False
                break
            if projection is not None:  # project both sides before the outer product (never the full gradient)
                if projection.projects(g.shape[-1]):
                    g = g @ projection.matrix(key, "out", g.shape[-1], g.dtype, g.device)
                if record.weight is not None and projection.projects(x.shape[-1]):
                    x = x @ projection.matrix(key, "in", x.shape[-1], x.dtype, x.device)
                call.inputs, call.grad = x, g  # the K-FAC factors below then describe the projected block
            if record.weight is not None:
                w = torch.einsum("b...o,b...i->boi", g, x)
                weight_grad = w if weight_grad is None else weight_grad + w
            if record.bias is not None:
                b = g.reshape(size, -1, g.shape[-1]).sum(dim=1)
                bias_grad = b if bias_grad is None else bias_grad + b
        calls, record.calls = record.calls, []
        if not ok:
            continue
        kept = []
        for name, grad in ((record.weight, weight_grad), (record.bias, bias_grad)):
            if name is None:
                continue
            param = tracked[name]
            if grad is None:
                grad = torch.zeros(size, *projected_shape(param.shape, projection), dtype=upcast(param).dtype,
                                   device=param.device)
            total = total_of[name]
            if projection is not None and total is not None:
                total = project_gradient(name, upcast(total), projection, batched=False)
            if _agrees(grad.sum(dim=0), total, param.dtype):
                grads[name] = grad
                kept.append(name)
        if factors is not None:  # K-FAC factors from the same inputs and output gradients (datainf.estimators.kfac)
            weight, bias = (n if n in kept else None for n in (record.weight, record.bias))
            mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            for call in calls:
                if call.grad is not None and (weight or bias):
                    factors.update(weight, bias, call.inputs, call.grad, mask)
    if factors is not None:
        factors.add_examples(size)
    return grads, size


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


def check_finite_gradients(grads: Mapping[str, Tensor]) -> None:
    """Refuse per-example gradients with a NaN or infinite entry, naming the examples (batch indices)."""
    bad = None
    for g in grads.values():
        rows = ~torch.isfinite(g.reshape(g.shape[0], -1)).all(dim=1)
        bad = rows if bad is None else bad | rows
    if bad is not None and bool(bad.any()):
        idx = bad.nonzero().flatten().tolist()
        raise NonFiniteError(f"examples {idx[:10]} of the batch have a finite loss but a NaN or infinite gradient",
                             idx, "gradient")


def _agrees(summed: Tensor, total: Tensor | None, dtype: torch.dtype) -> bool:
    """Whether the batch sum of per-example gradients matches autograd's batch gradient."""
    if total is None:
        return bool(summed.abs().max() == 0) if summed.numel() else True
    total = upcast(total)
    tolerance = 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2
    scale = max(total.norm().item(), summed.norm().item())
    return (summed - total).norm().item() <= tolerance * scale + 1e-12


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


def _group_lora(grads: dict[str, Tensor]) -> dict[str, Tensor]:
    """Join the LoRA tensors of one module and adapter (A then B, in parameter order) into one flattened
    block named ``"<module>.lora"`` (``"<module>.lora.<adapter>"`` if several adapters share the module)."""
    groups: dict[tuple[str, str], list[str]] = {}
    order: list[str | tuple[str, str]] = []
    for name in grads:
        match = _LORA_NAME.match(name)
        if match is None:
            order.append(name)
            continue
        key = (match["module"], match["adapter"])
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(name)
    adapters_per_module: dict[str, int] = {}
    for module, _ in groups:
        adapters_per_module[module] = adapters_per_module.get(module, 0) + 1
    out: dict[str, Tensor] = {}
    for item in order:
        if isinstance(item, str):
            out[item] = grads[item]
            continue
        module, adapter = item
        block = f"{module}.lora" if adapters_per_module[module] == 1 else f"{module}.lora.{adapter}"
        parts = [grads[name].flatten(start_dim=1) for name in groups[item]]
        out[block] = torch.cat(parts, dim=1)
    return out


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
    return _group_lora(grads) if group_lora else grads


def _run(
    model: nn.Module, batch: Any, task: Task, tracked: dict[str, nn.Parameter], factors: Any = None,
    projection: ProjectionSettings | None = None,
) -> tuple[dict[str, Tensor], int]:
    records = _linear_records(model, tracked)
    grads: dict[str, Tensor] = {}
    size = batch_size(batch)
    if records:
        grads, size = _fast_path(model, batch, task, tracked, records, factors, projection)
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
        grouped = _group_lora(fake) if group_lora else fake
        return {name: tuple(t.shape[1:]) for name, t in grouped.items()}

    full, projected = shapes(False), shapes(True)
    return {**projection.to_dict(),
            "blocks": {name: {"shape": list(projected[name]), "full_shape": list(full[name])} for name in full}}
