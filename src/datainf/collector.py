"""A push-style collector of per-example gradients: hooks + projection on the caller's own forward and backward.

```
with GradientCollector(model, projection=ProjectionSettings(dim=64)) as collector:
    loss = per_example_losses(model, batch).sum()   # the caller's own forward (a Trainer's step, a loop, ...)
    loss.backward()                                 # ... and backward
    grads = collector.take()                        # {parameter: (B, *shape)}, this batch's per-example gradients
```

How: every tracked parameter that is the ``weight`` or ``bias`` of an ``nn.Linear`` (PEFT's ``lora_A`` /
``lora_B`` and a ``modules_to_save`` classifier are) is hooked. A forward hook saves the module's input x
(B, ..., in) and a tensor hook on its output catches the output gradient g (B, ..., out) during the backward
pass; since examples do not interact (no batch norm, same dropout as the step had), ``einsum("b...o,b...i->boi",
g, x)`` is each example's weight gradient and ``g`` summed over the middle dimensions its bias gradient. Padding
cannot leak: a padded position's output gradient is zero. The backward must be that of a SUM of per-example
losses (a mean gives each row divided by B, which is what that loss's gradient is made of).

As a safety net, a hook on each tracked parameter catches the batch gradient autograd computes in the same pass;
:meth:`GradientCollector.take` compares it with the per-example gradients summed over the batch, and a parameter
whose sums disagree (weights tied to another module, a module that folds the batch into another dimension, two
backward passes without a ``take`` between them) is refused (or, with ``partial=True``, left out for the caller
to compute otherwise: :func:`datainf.gradients.per_example_gradients` then loops over single examples).

Projection (``projection=ProjectionSettings(dim=k, seed=s)``): each side of a tracked module whose dimension
exceeds k is multiplied by a fixed random matrix ``P`` (size x k, Gaussian / sqrt(k), drawn from the seed and
the module's name) BEFORE the per-example outer product: the weight gradient ``sum_t g_t x_t^T`` becomes
``P_out^T (sum_t g_t x_t^T) P_in = sum_t (P_out^T g_t)(P_in^T x_t)^T`` (a Kronecker-structured projection, as
LoGra does), so the full-size per-example gradient is never formed. For a LoRA A (r x d_in) only d_in is
projected, for a B (d_out x r) only d_out, for a full matrix both, for a bias its out side.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from datainf.adapters import adapter_parameters
from datainf.errors import DataInfError, NonFiniteError
from datainf.tasks import upcast

ParamFilter = Sequence[str] | Callable[[str, nn.Parameter], bool] | None

_NO_TRAINABLE = ("no trainable parameters and no LoRA adapter: load a PEFT model with a LoRA adapter "
                 "(PeftModel.from_pretrained(base, adapter_folder))")
_LORA_NAME = re.compile(r"^(?P<module>.*)\.lora_[A-Za-z_]+\.(?P<adapter>[^.]+)(\.[^.]+)?$")


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


def group_lora_blocks(grads: dict[str, Tensor]) -> dict[str, Tensor]:
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


def _linear_records(model: nn.Module, tracked: Mapping[str, nn.Parameter]) -> list[_LinearRecord]:
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


class GradientCollector:
    """Per-example gradients of the batches whose backward passes run inside it (see the module docstring).

    Args:
        model: any torch model, typically a PEFT model with a LoRA adapter.
        params: which parameters to track: None for every trainable one (for a PEFT model loaded for
            inference, its adapter's), a list of names, a predicate ``(name, param) -> bool`` (see
            :func:`tracked_parameters`), or a mapping name -> parameter.
        projection: a :class:`ProjectionSettings` to project every gradient inside the hooks; None (the
            default) for full gradients.
        group_lora: join the lora_A and lora_B of one adapted module into one flattened block named after the
            module (see :func:`group_lora_blocks`), as a store made with ``group_lora`` names its blocks.

    Used as a context manager: entering installs the hooks (every tracked parameter the hooks cover must then
    require a gradient), leaving removes them. Inside, each forward with gradients enabled is recorded; after
    the backward of the batch's summed loss, :meth:`take` returns that batch's per-example gradients and starts
    the next batch. Forwards without gradients (evaluation under ``torch.no_grad``) are not recorded. Nothing
    else of the model is changed: ``requires_grad`` flags, ``.grad`` fields and modes are the caller's.
    """

    def __init__(self, model: nn.Module, *, params: ParamFilter | Mapping[str, nn.Parameter] = None,
                 projection: ProjectionSettings | None = None, group_lora: bool = False):
        if projection is not None and not isinstance(projection, ProjectionSettings):
            raise DataInfError(f"projection must be a ProjectionSettings(dim=k, seed=s), got {projection!r}")
        self.model = model
        self.tracked = dict(params) if isinstance(params, Mapping) else tracked_parameters(model, params)
        if not self.tracked:
            raise DataInfError("the collector tracks no parameter: name at least one trainable parameter")
        self.projection = projection
        self.group_lora = bool(group_lora)
        self._records = _linear_records(model, self.tracked)
        hooked = {name for r in self._records for name in (r.weight, r.bias) if name is not None}
        #: tracked parameters the hooks cover (owned by an nn.Linear), in parameter order
        self.covered = [name for name in self.tracked if name in hooked]
        #: tracked parameters no hook can see (an embedding LoRA, a raw nn.Parameter, a GPT-2 Conv1D)
        self.uncovered = [name for name in self.tracked if name not in hooked]
        self._handles: list[Any] = []
        self._totals: dict[str, Tensor] = {}
        self._passes: dict[str, int] = {}

    # ---------------------------------------------------------------- hooks

    def __enter__(self) -> GradientCollector:
        if self._handles:
            raise DataInfError("this GradientCollector is already installed: leave its `with` block first")
        frozen = [name for name in self.covered if not self.tracked[name].requires_grad]
        if frozen:
            raise DataInfError(f"parameter {frozen[0]} does not require a gradient: set requires_grad=True on the "
                               "tracked parameters before entering the collector")
        try:
            for record in self._records:
                record.calls.clear()
                self._handles.append(record.module.register_forward_hook(self._forward_hook(record)))
            for name in self.covered:
                self._handles.append(self.tracked[name].register_hook(self._total_hook(name)))
        except BaseException:
            self._remove()
            raise
        self._totals, self._passes = {}, {}
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for record in self._records:
            record.calls.clear()
        self._totals, self._passes = {}, {}

    @staticmethod
    def _forward_hook(record: _LinearRecord) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            if not torch.is_grad_enabled() or not isinstance(output, Tensor) or not output.requires_grad:
                return
            call = _Call(args[0].detach())
            record.calls.append(call)

            def grad_hook(grad: Tensor) -> None:
                call.grad = grad.detach()

            output.register_hook(grad_hook)

        return hook

    def _total_hook(self, name: str) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:  # the batch gradient of this parameter, once per backward pass
            self._totals[name] = grad.detach()
            self._passes[name] = self._passes.get(name, 0) + 1

        return hook

    # ---------------------------------------------------------------- per-example gradients

    def take(self, *, batch_size: int | None = None, partial: bool = False, factors: Any = None,
             attention_mask: Tensor | None = None) -> dict[str, Tensor]:
        """The per-example gradients of the batch whose backward ran since the last take (or since entering).

        Args:
            batch_size: B, the number of examples of the batch; default the leading dimension of the hooked
                modules' inputs (refused when they differ: then give it).
            partial: leave out (instead of refusing) the tracked parameters the hooks cannot give: those no
                nn.Linear owns (:attr:`uncovered`) and those whose per-example sum disagrees with the batch
                gradient. :func:`datainf.gradients.per_example_gradients` computes these by a loop.
            factors: a ``datainf.estimators.kfac.KFACFactors`` to accumulate the K-FAC factors of the hooked
                blocks into, from the same inputs and output gradients (projected ones with a projection).
            attention_mask: (B, T) mask of the batch, to leave padding out of ``factors``.
        Returns:
            {name: (B, *shape)} (projected: (B, *projected_shape(shape))), float32 or float64 for a float64
            model (half precision is accumulated in float32), in parameter order; with ``group_lora``, blocks.
        Raises:
            DataInfError when no backward pass reached the hooks, when a parameter's gradient cannot be
            collected (unless ``partial``); :class:`~datainf.errors.NonFiniteError` naming the examples whose
            gradient holds a NaN or an infinity.
        """
        if not self._handles:
            raise DataInfError("take() is called outside the collector's `with` block: call it inside")
        totals, passes = self._totals, self._passes
        self._totals, self._passes = {}, {}
        calls = {id(record): [c for c in record.calls if c.grad is not None] for record in self._records}
        for record in self._records:
            record.calls = []
        if not any(calls.values()) and not (partial and batch_size is not None):
            raise DataInfError("no backward pass reached the tracked modules since the last take(): run the "
                               "batch's forward and loss.backward() inside the collector, then take()")
        size = self._batch_size(batch_size, calls)
        repeated = sorted(name for name, n in passes.items() if n > 1)
        grads: dict[str, Tensor] = {}
        for record in self._records:
            if any(name in repeated for name in (record.weight, record.bias)):
                continue  # two batches' calls mixed: refused below (partial: left to the caller)
            grads.update(self._record_gradients(record, calls[id(record)], size, totals, factors, attention_mask))
        if factors is not None:
            factors.add_examples(size)
        missing = [name for name in self.tracked if name not in grads]
        if missing and not partial:
            why = (f"{len(repeated)} parameter(s) saw several backward passes since the last take() (call take() "
                   "after each backward)" if repeated else
                   "not owned by an nn.Linear, or the per-example sum disagreed with the batch gradient")
            raise DataInfError(f"per-example gradients of {', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''} "
                               f"cannot be collected from hooks ({why}); track only nn.Linear parameters "
                               "(params=...), or use datainf.per_example_gradients, which loops over single "
                               "examples for them")
        check_finite_gradients(grads)
        grads = {name: grads[name] for name in self.tracked if name in grads}
        return group_lora_blocks(grads) if self.group_lora else grads

    def _batch_size(self, given: int | None, calls: Mapping[int, list[_Call]]) -> int:
        if given is not None:
            if isinstance(given, bool) or not isinstance(given, int) or given < 1:
                raise DataInfError(f"batch_size must be an integer >= 1, got {given!r}")
            return given
        leading = sorted({int(c.inputs.shape[0]) for cs in calls.values() for c in cs})
        if len(leading) != 1:
            raise DataInfError(f"the hooked modules' inputs have leading dimensions {leading}: pass "
                               "take(batch_size=B), the number of examples of the batch")
        return leading[0]

    def _record_gradients(self, record: _LinearRecord, calls: list[_Call], size: int,
                          totals: Mapping[str, Tensor], factors: Any,
                          mask: Tensor | None) -> dict[str, Tensor]:
        """One nn.Linear's per-example weight and bias gradients from its calls; those whose batch sum
        disagrees with the batch gradient (projected the same way) are left out."""
        projection = self.projection
        weight_grad, bias_grad = None, None
        key = module_key(record.weight or record.bias or "")
        # under autocast (a Trainer's bf16/fp16 step) the batch gradient was summed in half precision
        half = any(t.dtype in (torch.float16, torch.bfloat16) for call in calls for t in (call.inputs, call.grad))
        for call in calls:
            g, x = upcast(call.grad), upcast(call.inputs)  # type: ignore[arg-type]
            if g.shape[0] != size or x.shape[0] != size or g.shape[:-1] != x.shape[:-1]:
                return {}
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
        kept: dict[str, Tensor] = {}
        for name, grad in ((record.weight, weight_grad), (record.bias, bias_grad)):
            if name is None:
                continue
            param = self.tracked[name]
            if grad is None:
                grad = torch.zeros(size, *projected_shape(param.shape, projection), dtype=upcast(param).dtype,
                                   device=param.device)
            total = totals.get(name)
            if projection is not None and total is not None:
                total = project_gradient(name, upcast(total), projection, batched=False)
            if _agrees(grad.sum(dim=0), total, torch.bfloat16 if half else param.dtype):
                kept[name] = grad
        if factors is not None:  # K-FAC factors from the same inputs and output gradients (datainf.estimators.kfac)
            weight, bias = (n if n in kept else None for n in (record.weight, record.bias))
            for call in calls:
                if weight or bias:
                    factors.update(weight, bias, call.inputs, call.grad, mask)
        return kept


__all__ = [
    "PROJECTION_KIND", "GradientCollector", "ParamFilter", "ProjectionSettings", "check_finite_gradients",
    "group_lora_blocks", "module_key", "project_gradient", "projected_shape", "tracked_parameters",
]
