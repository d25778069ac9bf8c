"""The one arguments object of every scoring call, and the typed result it produces.

``ScoreArguments`` is validated once, where it is made, and travels unchanged through the library
(:func:`datainf.influence`, the Attributor, the distributed path, ``datainf score``); it is saved with every
scores file, so a result always says what produced it. ``ScoreResult`` carries the scores together with the
damping each block used, the method's diagnostics and the time it took.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from datainf.errors import DataInfError
from datainf.estimators.registry import allowed_options, get_method, parse_options, value_of

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _dtype_name(dtype: Any) -> str | None:
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        for name, value in _DTYPES.items():
            if value == dtype:
                return name
        raise DataInfError(f"compute dtype must be float32 or float64, got {dtype}")
    if isinstance(dtype, str) and dtype in _DTYPES:
        return dtype
    raise DataInfError(f"compute dtype must be 'float32', 'float64' or None, got {dtype!r}")


def _damping_value(damping: Any) -> float | tuple[float, ...] | dict[str, float] | None:
    """None, one number, a tuple (one per block, in block order) or a dict block -> number, each checked."""
    if damping is None:
        return None
    if isinstance(damping, Mapping):
        out: Any = {str(k): _one_damping(v, f"damping for block '{k}'") for k, v in damping.items()}
    elif isinstance(damping, Sequence) and not isinstance(damping, (str, bytes)):
        out = tuple(_one_damping(v, f"damping for block '{i}'") for i, v in enumerate(damping))
    else:
        out = _one_damping(damping, "damping")
    return out


def _one_damping(value: Any, what: str) -> float:
    try:
        lam = float(value)
    except (TypeError, ValueError):
        raise DataInfError(f"{what} must be a number, got {value!r}") from None
    if not (math.isfinite(lam) and lam > 0) or not math.isfinite(1.0 / lam):
        raise DataInfError(f"{what} is {lam}; it must be a finite number > 0 (or none, for the paper's rule)")
    return lam


@dataclass(frozen=True)
class ScoreArguments:
    """Everything that decides a score, validated once.

    method: a registered method (``datainf.estimators.method_names()``): "datainf", "exact", "lissa",
        "identity", "kfac", "ekfac", or one you registered.
    damping: None for the method's default rule per block (the paper's ``0.1 * mean_i ||g_i||^2 / d`` for
        all but kfac/ekfac, which use ``0.1 * mean eigenvalue``); a number for every block; a sequence or a
        mapping block -> number for one value per block. Finite and > 0.
    chunk_size: training rows processed at once (memory O(chunk_size * d + n_query * d) per block).
    dtype: compute dtype, "float32" or "float64"; None: float32, or float64 when the gradients are float64
        (float16/bfloat16 gradients are always accumulated in float32).
    device: compute device ("cpu", "cuda", "cuda:1"); None: where the training gradients are.
    normalize: divide every score by the preconditioned norms of its two gradients,
        ``score[k, j] / sqrt(|s_k| |q_j|)`` with ``s_k = g_k^T P g_k`` and ``q_j = v_j^T P v_j`` (P the
        method's inverse): cosine similarity after preconditioning, as TrackStar (Chang et al., ICLR 2025)
        does; with identity it is the cosine of the raw gradients. The sign convention is kept.
    mean_query: score against the mean of the query gradients (the influence on the mean query loss, the
        paper's "influence on the validation loss"); the result has one column.
    options: the method's own options (LiSSA: iterations, scale, batch_size, seed), validated by it.
    remove_top: remove the training gradients' top-r principal directions of every block from training and
        query gradients before the method (Bergson's style-subspace removal; :mod:`datainf.remedies`). 0: none.
    adam_moments: a file of the LoRA parameters' Adam second moments (``optimizer_second_moments.safetensors``,
        saved by ``datainf finetune`` beside each checkpoint): gradients are divided by ``sqrt(v) + eps``, then
        scaled to unit norm (TrackStar / LESS). None: raw gradients.
    damping_scale: a multiplier of every block's damping (the rule's or the given one): the damping as a knob
        (a grid of 0.001-10 x the paper's rule, :data:`datainf.remedies.DAMPING_GRID`).
    damping_rule: None for the method's rule, or "rank": ``0.1 * mean ||g||^2 / min(n, d)`` per block
        (:func:`datainf.remedies.rank_damping`); used where no damping is given.
    """

    method: str = "datainf"
    damping: float | tuple[float, ...] | Mapping[str, float] | None = None
    chunk_size: int = 2048
    dtype: str | None = None
    device: str | None = None
    normalize: bool = False
    mean_query: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    remove_top: int = 0
    adam_moments: str | None = None
    damping_scale: float = 1.0
    damping_rule: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.method, str):
            raise DataInfError(f"method must be a name, got {self.method!r}")
        get_method(self.method)
        set_ = object.__setattr__
        set_(self, "damping", _damping_value(self.damping))
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise DataInfError(f"chunk_size must be >= 1, got {self.chunk_size!r}")
        set_(self, "dtype", _dtype_name(self.dtype))
        if self.device is not None:
            set_(self, "device", str(self.device))
        set_(self, "normalize", bool(self.normalize))
        set_(self, "mean_query", bool(self.mean_query))
        if not isinstance(self.options, Mapping):
            raise DataInfError(f"options must be a mapping of the method's options, got {self.options!r}")
        set_(self, "options", dict(self.options))
        parse_options(self.method, self.options)  # an unknown or bad option fails here, by name
        if isinstance(self.remove_top, bool) or not isinstance(self.remove_top, int) or self.remove_top < 0:
            raise DataInfError(f"remove_top must be a whole number of directions >= 0, got {self.remove_top!r}")
        if self.adam_moments is not None:
            set_(self, "adam_moments", str(self.adam_moments))
        scale = self.damping_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
            raise DataInfError(f"damping_scale must be a finite number > 0 (1: the rule as it is), got {scale!r}")
        set_(self, "damping_scale", float(scale))
        rules = ("rank",)
        if self.damping_rule is not None and self.damping_rule not in rules:
            raise DataInfError(f"damping_rule must be one of {list(rules)} (or none, for the method's rule), got "
                               f"{self.damping_rule!r}")
        if get_method(self.method).needs_curvature and (self.remove_top or self.adam_moments is not None):
            raise DataInfError(f"method '{self.method}' fits its curvature from the model's activations, which "
                               "remove_top and the Adam normalization do not change; use them with datainf, exact, "
                               "lissa or identity")

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return None if self.dtype is None else _DTYPES[self.dtype]

    def method_options(self) -> Any:
        """The method's options dataclass (or None for a method without options)."""
        return parse_options(self.method, self.options)

    def replace(self, **changes: Any) -> ScoreArguments:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; :meth:`from_dict` reads it back."""
        out = dataclasses.asdict(self)
        out["damping"] = list(self.damping) if isinstance(self.damping, tuple) else self.damping
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScoreArguments:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise DataInfError(f"score arguments have no field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**dict(data))


@dataclass
class ScoreResult:
    """Scores and everything that produced them.

    scores: ``(n_train, n_query)`` for influence (one column with ``mean_query``) or ``(n_train,)`` for
        self-influence. ``score[k, j]`` is the first-order change of query j's loss when training example k
        is up-weighted: positive = harmful, negative = helpful.
    arguments: the :class:`ScoreArguments` used.
    kind: "influence" or "self_influence".
    damping: the lambda each block used (blocks whose training gradients are all zero are left out).
    diagnostics: per block, what the method reports (LiSSA: scale, last relative change, residual).
    seconds: wall time of the scoring, the fit of the method's state included.
    curvature_seconds: the part of ``seconds`` (or, for a cached state, of the run that made it) spent
        fitting the method's state (:meth:`Estimator.fit`: K-FAC / EK-FAC curvature, DataInf's and exact's
        d x d matrices).
    world_size: number of processes that shared the blocks.
    """

    scores: Tensor
    arguments: ScoreArguments
    kind: str
    damping: dict[str, float]
    diagnostics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    curvature_seconds: float = 0.0
    world_size: int = 1

    @property
    def method(self) -> str:
        return self.arguments.method

    def settings(self) -> dict[str, Any]:
        """Everything but the scores, JSON-able."""
        return {"kind": self.kind, "arguments": self.arguments.to_dict(), "shape": list(self.scores.shape),
                "damping": dict(self.damping), "diagnostics": self.diagnostics, "seconds": self.seconds,
                "curvature_seconds": self.curvature_seconds, "world_size": self.world_size}


#: the fields of ScoreArguments a variant spec may set (the others belong to the call: device, chunk size, ...)
SPEC_FIELDS = ("damping", "normalize", "remove_top", "damping_scale", "damping_rule", "dtype")


def arguments_from_spec(spec: str, **fields: Any) -> ScoreArguments:
    """One :class:`ScoreArguments` from a short text, as experiments and ``--variant`` name a scored variant:
    ``METHOD`` or ``METHOD:KEY=VALUE,KEY=VALUE`` (a bare ``KEY`` is ``KEY=true``), each key one of
    :data:`SPEC_FIELDS` or an option of the method (e.g. ``lissa:iterations=50``), each value converted to the
    field's type. E.g. ``"ekfac:damping_scale=10"``, ``"identity:normalize"``, ``"datainf:remove_top=2"``.
    ``fields``: more ScoreArguments fields (the caller's: mean_query, device ...). Refused with one line
    naming the spec and what is allowed."""
    method, _, rest = str(spec).partition(":")
    method = method.strip()
    options_class = get_method(method).options
    hints = typing.get_type_hints(ScoreArguments)
    option_hints = typing.get_type_hints(options_class) if options_class else {}
    allowed = [*SPEC_FIELDS, *allowed_options(method)]
    values: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for pair in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, text = pair.partition("=")
        key, text = key.strip(), (text.strip() if sep else "true")
        if key not in allowed or not text:
            raise DataInfError(f"variant '{spec}': '{pair}' is not KEY[=VALUE] with KEY one of {', '.join(allowed)}")
        try:
            if key in SPEC_FIELDS:
                values[key] = value_of(text, hints[key] if key != "damping" else float)
            else:
                options[key] = value_of(text, option_hints[key])
        except ValueError:
            raise DataInfError(f"variant '{spec}': '{text}' is not a valid value for '{key}'") from None
    return ScoreArguments(method=method, options=options, **{**fields, **values})


__all__ = ["SPEC_FIELDS", "ScoreArguments", "ScoreResult", "arguments_from_spec"]
