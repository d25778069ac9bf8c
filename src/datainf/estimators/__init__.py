"""Influence estimators on per-block gradients: pure tensor math, no models, disks or processes.

Notation (see docs/math.md). For one block l (one parameter tensor of the adapter) the training gradients
are the rows of ``G`` (n x d), the query gradients the rows of ``V`` (m x d), and

* ``H = G^T G / n``                        the empirical Fisher of the block,
* ``lambda = 0.1 * mean_i ||g_i||^2 / d``  the paper's damping rule (per block, unless given),
* ``score[k, j] = - v_j^T (H + lambda I)^{-1} g_k``, summed over blocks.

Sign convention, the same for every method: ``score[k, j]`` is the first-order change of query j's loss
when training example k is up-weighted. Positive = harmful (raises the query's loss), negative = helpful.

Methods differ only in how they apply ``(H + lambda I)^{-1}``; each is one module here registering an
:class:`Estimator` (:mod:`.registry`): ``datainf`` (:mod:`.datainf`), ``exact`` (:mod:`.exact`), ``lissa``
(:mod:`.lissa`), ``identity`` (:mod:`.identity`), ``kfac`` and ``ekfac`` (:mod:`.kfac`). Every call goes
through one path: :class:`ScoreArguments` in, :func:`score` / :func:`score_self`, :class:`ScoreResult` out;
:func:`influence` and :func:`self_influence` are the same path returning just the tensor.

Training gradients are read in chunks of rows, so they may be memory-mapped row sources larger than RAM:
extra memory is O(chunk_size * d + n_query * d) per block (plus d x d or n x n for ``exact``).
"""

from __future__ import annotations

import importlib
import pkgutil
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from datainf.errors import AllBlocksZeroError, DataInfError
from datainf.estimators.arguments import ScoreArguments, ScoreResult, arguments_from_spec
from datainf.estimators.blocks import (
    DAMPING_FACTOR,
    BlockRows,
    Blocks,
    Damping,
    RowSource,
    as_blocks,
    block_scale,
    check_damping,
    check_finite_queries,
    compute_dtype,
    default_damping,
    is_row_source,
    largest_magnitude,
    pair_blocks,
    resolve_damping,
    scaled,
    stream_dots,
)
from datainf.estimators.registry import (
    Estimator,
    FittedState,
    accepted_options,
    get_method,
    method_names,
    options_from_text,
    register,
    unregister,
)


def rank_damping(sq_norms: Tensor, d: int) -> float:
    """The "rank" damping rule (``ScoreArguments.damping_rule="rank"``): ``0.1 * mean_i ||g_i||^2 / min(n, d)``.
    The paper's rule spreads the Fisher's trace over all d directions; when n < d at most n of them hold any
    of it, so this rule spreads it over the directions the training gradients can span (the mean nonzero
    eigenvalue of ``H = G^T G / n`` when G has full rank, times 0.1; the paper's rule when d <= n)."""
    n = int(sq_norms.shape[0])
    return DAMPING_FACTOR * float(sq_norms.double().mean()) / min(n, d)

# the built-in methods, in the order tables list them; any other module of this package registers too
for _name in ("datainf", "exact", "lissa", "identity", "kfac"):
    importlib.import_module(f"{__name__}.{_name}")
for _info in pkgutil.iter_modules(__path__):
    if _info.name not in ("arguments", "blocks", "defaults", "diagnostics", "registry"):
        importlib.import_module(f"{__name__}.{_info.name}")

#: residual above which LiSSA warns that it has not converged (declared in its module, imported above in
#: registration order)
LISSA_RESIDUAL_WARNING = importlib.import_module(f"{__name__}.lissa").RESIDUAL_WARNING
#: the most bytes of preconditioned queries (R per block) held for the one sweep over the training rows of every
#: block (:func:`~datainf.estimators.blocks.stream_dots`); blocks beyond it are scored one by one as before
DEFER_BYTES = 256 << 20


@dataclass
class PartialScores:
    """Scores summed over some blocks (one rank's share, or all of them), before normalization.

    scores: (n, m) or (n,); train_quadratic / query_quadratic: (n,) and (m,) sums of ``g^T P g`` over the
    same blocks (only with ``normalize``); damping / diagnostics: per block; curvature_seconds: time spent
    fitting curvature.
    """

    scores: Tensor | None
    train_quadratic: Tensor | None = None
    query_quadratic: Tensor | None = None
    damping: dict[str, float] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    curvature_seconds: float = 0.0


def _materialize(v: Any) -> Any:
    """Query blocks are small: a row source of queries is read into memory."""
    return v[0 : v.shape[0]] if is_row_source(v) else v


def partial_scores(train_grads: Blocks, query_grads: Blocks | None, arguments: ScoreArguments,
                   curvature: Any = None) -> PartialScores:
    """The sum over the given blocks of each block's scores (``query_grads`` given) or self-influence
    (``query_grads`` None), under ``arguments``. Blocks whose training gradients are all zero are skipped
    with a warning; if every block is, :class:`~datainf.errors.AllBlocksZeroError` is raised."""
    method = get_method(arguments.method)
    opts = arguments.method_options()
    if arguments.normalize and query_grads is None:
        raise DataInfError("normalize=True has no meaning for self-influence (every example has cosine 1 with "
                           "itself); drop normalize, or score against queries")
    train = as_blocks(train_grads, "train_grads")
    query = None if query_grads is None else [(n, _materialize(v)) for n, v in as_blocks(query_grads, "query_grads")]
    pairs = pair_blocks(train, query)
    if query is not None and arguments.mean_query:
        pairs = [(name, g, v.mean(dim=0, keepdim=True)) for name, g, v in pairs]
    lams = resolve_damping(arguments.damping, [name for name, _ in train])
    t0 = time.perf_counter()
    shared = method.prepare(train, curvature, arguments.chunk_size)
    out = PartialScores(None, curvature_seconds=time.perf_counter() - t0 if method.needs_curvature else 0.0)
    zero: list[str] = []
    deferred: list[tuple[BlockRows, Tensor]] = []  # blocks scored -G R^T, in one sweep after the loop
    deferred_bytes = 0
    for (name, g, v), lam in zip(pairs, lams):
        cd = compute_dtype(g, arguments.torch_dtype)
        dev = torch.device(arguments.device) if arguments.device is not None else getattr(
            g, "device", torch.device("cpu"))
        # gradients outside cd's safe range are scaled by a power of two (exact), the scores scaled back
        c = block_scale(g, cd, arguments.chunk_size)
        if c != 1.0 and method.scale_power is None:
            raise DataInfError(
                f"block '{name}': its gradients have scale {largest_magnitude(g):.1e}, beyond {cd}'s safe range "
                f"for method '{method.name}' (which does not say how its scores scale); compute in float64 "
                "(dtype=torch.float64, `datainf score --compute-dtype float64`)"
            )
        b = BlockRows(name, g, cd, dev, arguments.chunk_size, scale=c)
        sq = b.sq_norms()
        V = None
        if v is not None:
            check_finite_queries(name, v)
            V = scaled(v, c, cd, dev)
        if lam is not None:
            lam = lam * c * c
        if lam is None:
            lam = (rank_damping(sq, b.d) if arguments.damping_rule == "rank"
                   else method.default_damping(b, sq, shared))
            if lam == 0.0:
                zero.append(name)
                continue
        lam = lam * arguments.damping_scale  # the damping as a knob (1: the rule or the value as given)
        check_damping(name, lam)
        estimator = method(b, lam, sq, opts, shared)
        back = 1.0 if c == 1.0 else c ** -float(method.scale_power or 0)  # what the scaling multiplied the scores by
        if V is None:
            part = _scaled_back(estimator.self_scores(), back, name, arguments)
        elif arguments.normalize:
            R = estimator.precondition(V)
            part = _scaled_back(-b.dot(R), back, name, arguments)
            tq = _scaled_back(-estimator.self_scores(), back, name, arguments)
            qq = _scaled_back((V * R).sum(dim=1), back, name, arguments)
            out.train_quadratic = tq if out.train_quadratic is None else out.train_quadratic + tq.to(
                out.train_quadratic.dtype)
            out.query_quadratic = qq if out.query_quadratic is None else out.query_quadratic + qq.to(
                out.query_quadratic.dtype)
        elif back == 1.0 and estimator.one_pass and deferred_bytes < DEFER_BYTES:
            # the block's part is -G R^T: its product waits for the one sweep over every such block's rows
            R = estimator.precondition(V)
            deferred.append((b, R))
            deferred_bytes += R.numel() * R.element_size()
            part = None
        else:
            part = _scaled_back(estimator.scores(V), back, name, arguments)
        if part is not None:
            out.scores = part if out.scores is None else out.scores + part.to(out.scores.dtype)
        out.damping[name] = float(lam) / (c * c)
        if estimator.info:
            out.diagnostics[name] = dict(estimator.info)
    if deferred:
        part = -stream_dots(deferred)
        out.scores = part if out.scores is None else out.scores + part.to(out.scores.dtype)
    if zero:  # one line for all of them (at step 0, where LoRA's B = 0, every A block is one)
        warnings.warn(ZeroBlocksWarning(zero), stacklevel=3)
    return out


class ZeroBlocksWarning(UserWarning):
    """Blocks whose training gradients are all zero: they add nothing to any score and are skipped. One
    warning names them all (``blocks``); expected at step 0, where LoRA's B = 0 leaves every A block without
    gradient."""

    def __init__(self, blocks: list[str]):
        self.blocks = list(blocks)
        shown = ", ".join(f"'{b}'" for b in blocks[:3]) + (f" and {len(blocks) - 3} more" if len(blocks) > 3 else "")
        what = f"block {shown}" if len(blocks) == 1 else f"{len(blocks)} blocks ({shown})"
        super().__init__(f"{what}: every training gradient is zero, so {'it adds' if len(blocks) == 1 else 'they add'} "
                         "nothing to any score; skipped (expected at step 0, where LoRA's B = 0 leaves the A blocks "
                         "without gradient)")


def _scaled_back(part: Tensor, back: float, name: str, arguments: ScoreArguments) -> Tensor:
    """A block's scores computed on rescaled gradients, multiplied back by ``back`` (a power of two, exact);
    refused, with the true cause, when the true scores lie beyond the compute dtype's range."""
    if back == 1.0:
        return part
    largest = float(part.abs().max()) * back if part.numel() else 0.0
    info = torch.finfo(part.dtype)
    if largest > info.max or 0.0 < largest < info.tiny / info.eps:
        raise DataInfError(
            f"block '{name}': its '{arguments.method}' scores are of order {largest:.1e}, beyond {part.dtype}'s "
            "range (its gradients lie far from 1); compute in float64 (dtype=torch.float64, `datainf score "
            "--compute-dtype float64`)"
        )
    return (part.double() * back).to(part.dtype)  # back may lie outside part's dtype: multiplied in float64


def finish(partial: PartialScores, arguments: ScoreArguments, kind: str, seconds: float,
           world_size: int = 1, block_order: list[str] | None = None) -> ScoreResult:
    """Normalize (if asked), let the method warn about its diagnostics (an unconverged LiSSA), and wrap the
    scores as a :class:`ScoreResult`."""
    if partial.scores is None:
        raise AllBlocksZeroError("every block has all-zero training gradients; nothing to score")
    scores = partial.scores
    if arguments.normalize:
        tq, qq = partial.train_quadratic, partial.query_quadratic
        denominator = torch.sqrt(tq.abs()[:, None] * qq.abs().to(tq.dtype)[None, :])
        tiny = torch.finfo(scores.dtype).tiny
        scores = scores / denominator.to(scores.dtype).clamp_min(tiny)
    if not bool(torch.isfinite(scores).all()):
        raise DataInfError(
            f"method '{arguments.method}' gave NaN or infinite scores (damping "
            f"{'rule' if arguments.damping is None else arguments.damping}); use a larger damping or "
            "dtype float64"
        )
    get_method(arguments.method).check_diagnostics(partial.diagnostics)  # e.g. LiSSA: not converged
    damping = partial.damping
    if block_order is not None:
        damping = {k: damping[k] for k in block_order if k in damping}
    return ScoreResult(scores=scores, arguments=arguments, kind=kind, damping=damping,
                       diagnostics=partial.diagnostics, seconds=seconds,
                       curvature_seconds=partial.curvature_seconds, world_size=world_size)


def score(train_grads: Blocks, query_grads: Blocks, arguments: ScoreArguments | None = None, *,
          curvature: Any = None) -> ScoreResult:
    """Influence of every training example on every query under ``arguments``: a :class:`ScoreResult`
    whose ``scores`` are ``(n_train, n_query)`` (``(n_train, 1)`` with ``mean_query``).

    train_grads / query_grads: per-block gradients (tensors or row sources), each ``(n, *block_shape)``,
    as a tensor, a sequence or a mapping name -> block. curvature: K-FAC factors or fitted curvature for
    the methods that need it (kfac, ekfac).
    """
    arguments = arguments or ScoreArguments()
    t0 = time.perf_counter()
    partial = partial_scores(train_grads, query_grads, arguments, curvature)
    return finish(partial, arguments, "influence", time.perf_counter() - t0)


def score_self(train_grads: Blocks, arguments: ScoreArguments | None = None, *,
               curvature: Any = None) -> ScoreResult:
    """Self-influence ``score[k] = - sum_l g_{k,l}^T (H_l + lambda_l I)^{-1} g_{k,l}``: ``(n_train,)``.

    The diagonal of the influence of the training set on itself, computed without the n x n matrix
    (datainf and exact use a d x d matrix when d <= n and chunked Gram products otherwise; lissa runs its
    recursion for one chunk of examples at a time). Always <= 0 under this sign convention; a large
    magnitude flags an unusual (often mislabeled) example.
    """
    arguments = arguments or ScoreArguments()
    t0 = time.perf_counter()
    partial = partial_scores(train_grads, None, arguments, curvature)
    return finish(partial, arguments, "self_influence", time.perf_counter() - t0)


def _arguments(method: str, damping: Damping, chunk_size: int, dtype: Any, device: Any, normalize: bool,
               options: dict[str, Any]) -> tuple[ScoreArguments, Any]:
    curvature = options.pop("factors", None)
    if isinstance(dtype, torch.dtype) and dtype not in (torch.float32, torch.float64):
        raise DataInfError(f"dtype must be torch.float32 or torch.float64 (the compute dtype), got {dtype}")
    arguments = ScoreArguments(method=method, damping=damping, chunk_size=chunk_size, dtype=dtype,
                               device=None if device is None else str(device), normalize=normalize,
                               options=options)
    return arguments, curvature


def _fill_legacy_diagnostics(diagnostics: dict[str, Any] | None, result: ScoreResult) -> None:
    if diagnostics is None:
        return
    warnings.warn("the diagnostics= dict is deprecated: call datainf.estimators.score(...) for a ScoreResult "
                  "with .damping, .diagnostics and .seconds", DeprecationWarning, stacklevel=3)
    diagnostics.update(method=result.method, damping=dict(result.damping), seconds=result.seconds)
    if result.diagnostics:  # the method's per-block diagnostics under its name (LiSSA's: diagnostics["lissa"])
        diagnostics[result.method] = result.diagnostics


def influence(
    train_grads: Blocks,
    query_grads: Blocks,
    method: str = "datainf",
    damping: Damping = None,
    *,
    chunk_size: int = 2048,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    normalize: bool = False,
    diagnostics: dict[str, Any] | None = None,
    **options: Any,
) -> Tensor:
    """Influence of every training example on every query, summed over blocks: ``(n_train, n_query)``.

    ``score[k, j] = - sum_l g_{j,l}^T (H_l + lambda_l I)^{-1} g_{k,l}``: the first-order change of query
    j's loss when training example k is up-weighted (the paper's eq. 2). Positive = harmful (raises the
    query's loss), negative = helpful. The same convention for every method.

    Args:
        train_grads: per-block training gradients: a tensor, a sequence of tensors or a mapping
            name -> tensor, each ``(n_train, *block_shape)`` (flattened per example). May be
            memory-mapped row sources: they are read ``chunk_size`` rows at a time.
        query_grads: the same blocks for the queries, each ``(n_query, *block_shape)``. Pass the mean
            validation gradient as a single query for the paper's "influence on the validation loss".
        method: any registered method (``method_names()``): "datainf", "exact", "lissa", "identity",
            "kfac", "ekfac" (the last two with ``factors=``, see :mod:`datainf.estimators.kfac`).
        damping, chunk_size, dtype, device, normalize: as in :class:`ScoreArguments`.
        diagnostics: deprecated; use :func:`score` for a :class:`ScoreResult`.
        **options: the method's options (LiSSA: ``iterations``, ``scale``, ``batch_size``, ``seed``) and
            ``factors=`` (KFACFactors or KFACCurvature) for kfac / ekfac.

    Returns:
        ``(n_train, n_query)`` scores in the compute dtype.
    """
    arguments, curvature = _arguments(method, damping, chunk_size, dtype, device, normalize, dict(options))
    result = score(train_grads, query_grads, arguments, curvature=curvature)
    _fill_legacy_diagnostics(diagnostics, result)
    return result.scores


def self_influence(
    train_grads: Blocks,
    method: str = "datainf",
    damping: Damping = None,
    *,
    chunk_size: int = 2048,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    diagnostics: dict[str, Any] | None = None,
    **options: Any,
) -> Tensor:
    """Self-influence ``score[k] = - sum_l g_{k,l}^T (H_l + lambda_l I)^{-1} g_{k,l}``, shape ``(n_train,)``.

    See :func:`score_self`; arguments as in :func:`influence`.
    """
    arguments, curvature = _arguments(method, damping, chunk_size, dtype, device, False, dict(options))
    result = score_self(train_grads, arguments, curvature=curvature)
    _fill_legacy_diagnostics(diagnostics, result)
    return result.scores


def __getattr__(name: str) -> Any:
    # METHODS / ALL_METHODS follow the registry (a method registered later shows up)
    if name == "ALL_METHODS":
        return method_names()
    if name == "METHODS":
        return tuple(m for m in method_names() if not get_method(m).needs_curvature)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DAMPING_FACTOR",
    "LISSA_RESIDUAL_WARNING",
    "BlockRows",
    "Blocks",
    "Damping",
    "Estimator",
    "FittedState",
    "PartialScores",
    "RowSource",
    "ScoreArguments",
    "ScoreResult",
    "ZeroBlocksWarning",
    "accepted_options",
    "arguments_from_spec",
    "default_damping",
    "finish",
    "get_method",
    "influence",
    "method_names",
    "options_from_text",
    "partial_scores",
    "rank_damping",
    "register",
    "score",
    "score_self",
    "self_influence",
    "unregister",
]

