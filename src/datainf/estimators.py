"""Influence estimators on per-block gradients: pure tensor math, no models, disks or processes.

Notation (see docs/math.md). For one block l (one parameter tensor of the adapter) the training gradients
are the rows of ``G`` (n x d), the query gradients the rows of ``V`` (m x d), and

* ``H = G^T G / n``                     the empirical Fisher of the block,
* ``lambda = 0.1 * mean_i ||g_i||^2 / d``  the paper's damping rule (per block, unless given),
* ``score[k, j] = - v_j^T (H + lambda I)^{-1} g_k``, summed over blocks.

Sign convention, the same for every method: ``score[k, j]`` is the first-order change of query j's loss
when training example k is up-weighted. Positive = harmful (raises the query's loss), negative = helpful.

Methods differ only in how they apply ``(H + lambda I)^{-1}``:

* ``datainf``  the average of the per-example inverses ``(g_i g_i^T + lambda I)^{-1}``, closed form
  by Sherman-Morrison (Kwon et al., ICLR 2024);
* ``exact``    a Cholesky solve, on the d x d system when d <= n and on the n x n Gram (Woodbury) form
  when n < d;
* ``lissa``    the iteration ``r_j = v + (I - (H + lambda I)/s) r_{j-1}``, whose fixed point is
  ``s (H + lambda I)^{-1} v``;
* ``identity`` no curvature at all (Hessian-free, the gradient dot product).

Training gradients are read in chunks of rows, so they may be memory-mapped tensors larger than RAM:
extra memory is O(chunk_size * d + n_query * d) per block (plus d x d or n x n for ``exact``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from datainf.errors import DataInfError

METHODS = ("datainf", "exact", "lissa", "identity")
#: every method, including the Kronecker-factored ones (which need ``factors=``; see datainf.kfac)
ALL_METHODS = METHODS + ("kfac", "ekfac")

class RowSource(Protocol):
    """Anything that serves rows of an (n, d) matrix without holding it in memory (a gradient store's
    memory-mapped block, say): ``shape == (n, d)``, a floating ``dtype``, and ``source[rows]`` returning a
    torch.Tensor for a slice or a 1-D index tensor of rows."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def __getitem__(self, rows: slice | Tensor) -> Tensor: ...


Block = Tensor | RowSource
Blocks = Block | Sequence[Block] | Mapping[str, Block]
Damping = float | Sequence[float] | Mapping[str, float] | None

#: the paper's damping constant: lambda_l = DAMPING_FACTOR * mean_i ||g_il||^2 / d_l
DAMPING_FACTOR = 0.1


@dataclass(frozen=True)
class LissaOptions:
    """Settings of the LiSSA recursion ``r_j = v + (I - (H + lambda I)/scale) r_{j-1}``.

    iterations: number of steps (the paper used 10; LiSSA converges slowly when the block is
        ill-conditioned, see the ``relative_residual`` diagnostic).
    scale: ``s`` above; ``None`` picks ``1.1 * (lambda_max(H) + lambda)`` per block, with lambda_max
        from 20 power iterations, which guarantees convergence (any s > (lambda_max + lambda)/2 does).
    batch_size: ``None`` uses every training gradient in each step (deterministic); an integer uses a
        random mini-batch of that many per step, as in the original stochastic LiSSA.
    seed: seed of the mini-batch sampling and of the power iteration's start vector.
    """

    iterations: int = 100
    scale: float | None = None
    batch_size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise DataInfError(f"lissa: iterations must be >= 1, got {self.iterations}")
        if self.scale is not None and not (math.isfinite(self.scale) and self.scale > 0):
            raise DataInfError(f"lissa: scale must be a finite number > 0, got {self.scale}")
        if self.batch_size is not None and self.batch_size < 1:
            raise DataInfError(f"lissa: batch_size must be >= 1, got {self.batch_size}")


_LISSA_KEYS = {"iterations", "scale", "batch_size", "seed"}


# --------------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------------


def _is_row_source(x: Any) -> bool:
    return not isinstance(x, Tensor) and hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "__getitem__")


def _as_blocks(grads: Blocks, what: str) -> list[tuple[str, Any]]:
    """Normalise gradients to a list of (name, (n, d) tensor or row source). Rows are not copied."""
    if isinstance(grads, Tensor) or _is_row_source(grads):
        items = [("0", grads)]
    elif isinstance(grads, Mapping):
        items = [(str(k), v) for k, v in grads.items()]
    elif isinstance(grads, Sequence) and not isinstance(grads, (str, bytes)):
        items = [(str(i), v) for i, v in enumerate(grads)]
    else:
        raise DataInfError(
            f"{what}: expected a tensor, a sequence of tensors or a mapping name -> tensor, "
            f"got {type(grads).__name__}"
        )
    if not items:
        raise DataInfError(f"{what}: no blocks given; pass at least one gradient tensor")
    out = []
    for name, t in items:
        if _is_row_source(t):
            if len(t.shape) != 2 or not t.dtype.is_floating_point:
                raise DataInfError(f"{what}: block '{name}' must serve (n, d) floating rows, got {tuple(t.shape)}")
            out.append((name, t))
            continue
        if not isinstance(t, Tensor):
            raise DataInfError(f"{what}: block '{name}' is a {type(t).__name__}, expected a torch.Tensor")
        if t.ndim < 1:
            raise DataInfError(f"{what}: block '{name}' is a scalar; expected shape (n_examples, *block_shape)")
        if not (t.is_floating_point()):
            raise DataInfError(f"{what}: block '{name}' has dtype {t.dtype}; expected a floating-point dtype")
        out.append((name, t.reshape(t.shape[0], math.prod(t.shape[1:]))))
    return out


def _pair_blocks(
    train: list[tuple[str, Tensor]], query: list[tuple[str, Tensor]] | None
) -> list[tuple[str, Tensor, Tensor | None]]:
    """Match train and query blocks by name (mappings) or position (sequences) and check their shapes."""
    n = train[0][1].shape[0]
    for name, g in train:
        if g.shape[0] != n:
            raise DataInfError(
                f"train_grads: block '{name}' has {g.shape[0]} examples but block '{train[0][0]}' has {n}; "
                "every block must hold the same examples"
            )
        if g.shape[1] == 0:
            raise DataInfError(f"train_grads: block '{name}' has no parameters (d = 0)")
    if n == 0:
        raise DataInfError("train_grads: the training set is empty (n_train = 0)")
    if query is None:
        return [(name, g, None) for name, g in train]
    if len(query) != len(train):
        raise DataInfError(
            f"query_grads has {len(query)} blocks but train_grads has {len(train)}; pass the same blocks"
        )
    qmap = dict(query)
    if set(qmap) != {name for name, _ in train}:
        missing = sorted({name for name, _ in train} - set(qmap))
        extra = sorted(set(qmap) - {name for name, _ in train})
        raise DataInfError(
            f"query_grads and train_grads name different blocks: missing from query_grads {missing}, "
            f"not in train_grads {extra}"
        )
    m = query[0][1].shape[0]
    if m == 0:
        raise DataInfError("query_grads: the query set is empty (n_query = 0)")
    pairs = []
    for name, g in train:
        v = qmap[name]
        if v.shape[0] != m:
            raise DataInfError(
                f"query_grads: block '{name}' has {v.shape[0]} examples but block '{query[0][0]}' has {m}"
            )
        if v.shape[1] != g.shape[1]:
            raise DataInfError(
                f"block '{name}': query gradients have {v.shape[1]} entries per example but training "
                f"gradients have {g.shape[1]}; both must come from the same parameter tensor"
            )
        pairs.append((name, g, v))
    return pairs


def _compute_dtype(t: Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """float16/bfloat16 are accumulated in float32 at least; float64 stays float64; `dtype` overrides."""
    if dtype is not None:
        if not dtype.is_floating_point:
            raise DataInfError(f"dtype must be a floating-point dtype, got {dtype}")
        return dtype
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


class _Block:
    """One block's training gradients, read in chunks and cast to the compute dtype on the fly."""

    def __init__(self, name: str, g: Tensor, dtype: torch.dtype, device: torch.device, chunk: int):
        self.name, self.g, self.dtype, self.device, self.chunk = name, g, dtype, device, chunk
        self.n, self.d = g.shape

    def rows(self) -> Iterator[tuple[slice, Tensor]]:
        for s in _chunks(self.n, self.chunk):
            yield s, self.g[s].to(device=self.device, dtype=self.dtype)

    def sq_norms(self) -> Tensor:
        """Squared norm of every example's gradient, (n,); names the first non-finite example."""
        out = torch.empty(self.n, dtype=self.dtype, device=self.device)
        for s, gc in self.rows():
            out[s] = (gc * gc).sum(dim=1)
        bad = ~torch.isfinite(out)
        if bool(bad.any()):
            k = int(bad.nonzero()[0])
            raise DataInfError(
                f"train_grads: block '{self.name}', example {k} has a NaN or infinite value; "
                "drop that example or fix the loss that produced it"
            )
        return out


def _check_finite_queries(name: str, v: Tensor) -> None:
    bad = ~torch.isfinite(v).all(dim=1)
    if bool(bad.any()):
        j = int(bad.nonzero()[0])
        raise DataInfError(
            f"query_grads: block '{name}', example {j} has a NaN or infinite value; "
            "drop that query or fix the loss that produced it"
        )


def _resolve_damping(damping: Damping, names: list[str]) -> list[float | None]:
    """One lambda per block; None means the paper's rule, filled in once the norms are known."""
    if damping is None:
        return [None] * len(names)
    if isinstance(damping, Mapping):
        if set(map(str, damping)) != set(names):
            raise DataInfError(
                f"damping names blocks {sorted(map(str, damping))} but the gradients have {sorted(names)}"
            )
        values = [float(damping[n]) for n in names]
    elif isinstance(damping, Sequence) and not isinstance(damping, (str, bytes)):
        if len(damping) != len(names):
            raise DataInfError(f"damping has {len(damping)} values but there are {len(names)} blocks")
        values = [float(x) for x in damping]
    else:
        values = [float(damping)] * len(names)
    for name, lam in zip(names, values):
        if not (math.isfinite(lam) and lam > 0):
            raise DataInfError(f"damping for block '{name}' is {lam}; it must be a finite number > 0")
    return values


def _rule(sq: Tensor, d: int) -> float:
    return DAMPING_FACTOR * float(sq.mean()) / d


def default_damping(train_grads: Blocks) -> dict[str, float]:
    """The paper's damping rule per block: ``lambda_l = 0.1 * (1/(n d_l)) * sum_i ||g_il||^2``.

    Args:
        train_grads: per-block training gradients, each ``(n, *block_shape)``.
    Returns:
        block name -> lambda (blocks given as a sequence are named "0", "1", ...).
    """
    blocks = _as_blocks(train_grads, "train_grads")
    _pair_blocks(blocks, None)
    out = {}
    for name, g in blocks:
        b = _Block(name, g, _compute_dtype(g, None), getattr(g, "device", torch.device("cpu")), 4096)
        out[name] = _rule(b.sq_norms(), b.d)
    return out


# --------------------------------------------------------------------------------------------------
# per-block methods: each returns the (n, m) score contribution of one block
# --------------------------------------------------------------------------------------------------


def _identity(b: _Block, V: Tensor) -> Tensor:
    out = torch.empty(b.n, V.shape[0], dtype=b.dtype, device=b.device)
    for s, gc in b.rows():
        out[s] = -(gc @ V.T)
    return out


def _datainf(b: _Block, V: Tensor, lam: float, sq: Tensor) -> Tensor:
    """DataInf in matrix form: R = (V - ((G V^T) * w)^T G / n) / lambda, scores = -G R^T.

    With w_i = 1/(lambda + ||g_i||^2) this is, for every query v at once,
    r = (1/(n lambda)) sum_i (v - (g_i . v) w_i g_i) and score_k = -r . g_k. Two passes over G.
    """
    w = 1.0 / (lam + sq)
    U = torch.zeros_like(V)
    for s, gc in b.rows():
        U += ((gc @ V.T) * w[s, None]).T @ gc
    R = (V - U / b.n) / lam
    return _identity(b, R)


def _gram(b: _Block) -> Tensor:
    K = torch.empty(b.n, b.n, dtype=b.dtype, device=b.device)
    for s, gc in b.rows():
        for t, gt in b.rows():
            if t.start < s.start:
                continue
            block = gc @ gt.T
            K[s, t] = block
            K[t, s] = block.T
    return K


def _fisher(b: _Block, lam: float) -> Tensor:
    H = torch.zeros(b.d, b.d, dtype=b.dtype, device=b.device)
    for _, gc in b.rows():
        H += gc.T @ gc
    H /= b.n
    H.diagonal().add_(lam)
    return H


def _cholesky(A: Tensor, what: str) -> Tensor:
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        raise DataInfError(
            f"{what}: the damped matrix is not positive definite in {A.dtype}; "
            "increase the damping or pass dtype=torch.float64"
        )
    return L


def _exact(b: _Block, V: Tensor, lam: float) -> Tensor:
    """Exact: a Cholesky solve on the cheaper of the d x d system and the n x n Gram (Woodbury) form.

    d <= n: scores = -G (H + lambda I)^{-1} V^T, cost O(n d^2 + d^3 + n m d).
    n < d:  with K = G G^T and C = G V^T, scores = -(C - K (n lambda I + K)^{-1} C) / lambda,
            cost O(n^2 d + n^3 + n m d): never forms a d x d matrix.
    """
    if b.d <= b.n:
        L = _cholesky(_fisher(b, lam), f"exact, block '{b.name}'")
        X = torch.cholesky_solve(V.T.contiguous(), L)  # (d, m) = (H + lambda I)^{-1} V^T
        return _identity(b, X.T)
    K = _gram(b)
    C = -_identity(b, V)
    A = K.clone()
    A.diagonal().add_(b.n * lam)
    L = _cholesky(A, f"exact, block '{b.name}'")
    return -(C - K @ torch.cholesky_solve(C, L)) / lam


def _fisher_matvec(b: _Block, X: Tensor, rows: Tensor | None = None) -> Tensor:
    """H X^T as (m, d): X (m, d). With `rows`, H is estimated on that subset of training examples."""
    out = torch.zeros_like(X)
    if rows is None:
        for _, gc in b.rows():
            out += (X @ gc.T) @ gc
        return out / b.n
    gc = b.g[rows].to(device=b.device, dtype=b.dtype)
    return (X @ gc.T) @ gc / len(rows)


def _top_eigenvalue(b: _Block, seed: int, steps: int = 20) -> float:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, b.d, generator=gen, dtype=b.dtype).to(b.device)
    x /= x.norm()
    est = 0.0
    for _ in range(steps):
        y = _fisher_matvec(b, x)
        est = float((y * x).sum())
        norm = y.norm()
        if float(norm) == 0.0:
            return 0.0
        x = y / norm
    return est


def _lissa_solve(
    b: _Block, V: Tensor, lam: float, opts: LissaOptions, info: dict[str, Any] | None
) -> Tensor:
    """LiSSA: iterate r_j = v + r_{j-1} - (H + lambda I) r_{j-1} / s; returns r / s ~ (H + lambda I)^{-1} v.

    V and the result are (m, d).
    """
    scale = opts.scale if opts.scale is not None else 1.1 * (_top_eigenvalue(b, opts.seed) + lam)
    gen = torch.Generator().manual_seed(opts.seed)
    R = V.clone()
    change = float("nan")
    for _ in range(opts.iterations):
        rows = None
        if opts.batch_size is not None and opts.batch_size < b.n:
            rows = torch.randperm(b.n, generator=gen)[: opts.batch_size].sort().values
        step = V - (_fisher_matvec(b, R, rows) + lam * R) / scale
        change = float(step.norm() / R.norm().clamp_min(1e-30))
        R = R + step
        if not bool(torch.isfinite(R).all()):
            raise DataInfError(
                f"lissa, block '{b.name}': the recursion diverged at scale {scale:g}; "
                "leave scale=None or pass a larger scale"
            )
    X = R / scale
    if info is not None:
        residual = _fisher_matvec(b, X) + lam * X - V
        info.update(
            scale=scale,
            last_relative_change=change,
            relative_residual=float(residual.norm() / V.norm().clamp_min(1e-30)),
        )
    return X


# --------------------------------------------------------------------------------------------------
# self-influence: score[k] = - g_k^T (H + lambda I)^{-1} g_k under each method's approximation
# --------------------------------------------------------------------------------------------------


def _self_block(
    b: _Block, method: str, lam: float, sq: Tensor, lissa: LissaOptions, info: dict[str, Any] | None
) -> Tensor:
    out = torch.empty(b.n, dtype=b.dtype, device=b.device)
    if method == "identity":
        return -sq
    if method == "datainf":
        # -(1/lambda) (||g_k||^2 - (1/n) sum_i w_i (g_i . g_k)^2)
        w = 1.0 / (lam + sq)
        if b.d <= b.n:
            M = torch.zeros(b.d, b.d, dtype=b.dtype, device=b.device)
            for s, gc in b.rows():
                M += gc.T @ (gc * w[s, None])
            for s, gc in b.rows():
                out[s] = ((gc @ M) * gc).sum(dim=1)
        else:
            out.zero_()
            for s, gc in b.rows():
                for t, gt in b.rows():
                    out[s] += ((gc @ gt.T) ** 2) @ w[t]
        return -(sq - out / b.n) / lam
    if method == "exact":
        if b.d <= b.n:
            L = _cholesky(_fisher(b, lam), f"exact, block '{b.name}'")
            for s, gc in b.rows():
                out[s] = -(gc * torch.cholesky_solve(gc.T.contiguous(), L).T).sum(dim=1)
            return out
        K = _gram(b)
        A = K.clone()
        A.diagonal().add_(b.n * lam)
        L = _cholesky(A, f"exact, block '{b.name}'")
        Z = torch.linalg.solve_triangular(L, K, upper=False)
        return -(K.diagonal() - (Z * Z).sum(dim=0)) / lam
    if method == "lissa":
        for s, gc in b.rows():
            out[s] = -(gc * _lissa_solve(b, gc, lam, lissa, info)).sum(dim=1)
        return out
    raise AssertionError(method)


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------


def _parse_options(method: str, options: dict[str, Any]) -> LissaOptions:
    if method not in METHODS:
        raise DataInfError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")
    unknown = set(options) - (_LISSA_KEYS if method == "lissa" else set())
    if unknown:
        allowed = sorted(_LISSA_KEYS) if method == "lissa" else "none"
        raise DataInfError(f"method '{method}' takes no option(s) {sorted(unknown)}; allowed: {allowed}")
    return LissaOptions(**options)


def _prepare(
    train_grads: Blocks,
    query_grads: Blocks | None,
    damping: Damping,
    chunk_size: int,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
) -> list[tuple[_Block, Tensor | None, float, Tensor]]:
    if chunk_size < 1:
        raise DataInfError(f"chunk_size must be >= 1, got {chunk_size}")
    train = _as_blocks(train_grads, "train_grads")
    query = None if query_grads is None else _as_blocks(query_grads, "query_grads")
    pairs = _pair_blocks(train, query)
    lams = _resolve_damping(damping, [name for name, _ in train])
    prepared = []
    for (name, g, v), lam in zip(pairs, lams):
        cdtype = _compute_dtype(g, dtype)
        dev = torch.device(device) if device is not None else getattr(g, "device", torch.device("cpu"))
        b = _Block(name, g, cdtype, dev, chunk_size)
        sq = b.sq_norms()
        V = None
        if v is not None:
            _check_finite_queries(name, v)
            V = v.to(device=dev, dtype=cdtype)
        if lam is None:
            lam = _rule(sq, b.d)
            if lam == 0.0:
                warnings.warn(
                    f"block '{name}': every training gradient is zero, so it adds nothing to any score; skipped",
                    stacklevel=3,
                )
                continue
        prepared.append((b, V, lam, sq))
    return prepared


def influence(
    train_grads: Blocks,
    query_grads: Blocks,
    method: str = "datainf",
    damping: Damping = None,
    *,
    chunk_size: int = 2048,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    diagnostics: dict[str, Any] | None = None,
    **options: Any,
) -> Tensor:
    """Influence of every training example on every query, summed over blocks.

    ``score[k, j] = - sum_l g_{j,l}^T (H_l + lambda_l I)^{-1} g_{k,l}``: the first-order change of query
    j's loss when training example k is up-weighted (the paper's eq. 2). Positive = harmful (raises the
    query's loss), negative = helpful. The same convention for every method.

    Args:
        train_grads: per-block training gradients: a tensor, a sequence of tensors or a mapping
            name -> tensor, each ``(n_train, *block_shape)`` (flattened per example). May be
            memory-mapped: they are read ``chunk_size`` rows at a time.
        query_grads: the same blocks for the queries, each ``(n_query, *block_shape)``. Pass the mean
            validation gradient as a single query for the paper's "influence on the validation loss".
        method: "datainf", "exact", "lissa" or "identity" (Hessian-free).
        damping: None for the paper's rule per block, ``0.1 * mean_i ||g_il||^2 / d_l``; a float for
            every block; a sequence or mapping for one value per block. Must be finite and > 0.
        chunk_size: training rows processed at once (memory O(chunk_size * d + n_query * d) per block).
        dtype: compute dtype; default float32 (float16/bfloat16 inputs are upcast), float64 stays float64.
        device: compute device; default the training gradients' device.
        diagnostics: if a dict is given, it is filled with ``{"damping": {block: lambda}, "method": ...}``
            and, for lissa, ``{"lissa": {block: {scale, last_relative_change, relative_residual}}}``.
        **options: lissa only: ``iterations`` (100), ``scale`` (None: automatic), ``batch_size`` (None:
            full batch), ``seed`` (0). See :class:`LissaOptions`.

    Returns:
        ``(n_train, n_query)`` scores in the compute dtype.
    """
    if method in ("kfac", "ekfac"):  # datainf.kfac, with factors=KFACFactors or KFACCurvature as a keyword
        from datainf.kfac import kfac_influence

        return kfac_influence(train_grads, query_grads, method=method, damping=damping, chunk_size=chunk_size,
                              dtype=dtype, device=device, diagnostics=diagnostics, **options)
    lissa = _parse_options(method, options)
    blocks = _prepare(train_grads, query_grads, damping, chunk_size, dtype, device)
    if not blocks:
        raise DataInfError("every block has all-zero training gradients; nothing to score")
    total: Tensor | None = None
    lissa_info: dict[str, Any] = {}
    for b, V, lam, sq in blocks:
        assert V is not None
        if method == "identity":
            part = _identity(b, V)
        elif method == "datainf":
            part = _datainf(b, V, lam, sq)
        elif method == "exact":
            part = _exact(b, V, lam)
        else:
            lissa_info[b.name] = {}
            part = _identity(b, _lissa_solve(b, V, lam, lissa, lissa_info[b.name]))
        total = part if total is None else total + part.to(total.dtype)
    _report(diagnostics, method, blocks, lissa_info)
    assert total is not None
    return total


def self_influence(
    train_grads: Blocks,
    method: str = "datainf",
    damping: Damping = None,
    *,
    chunk_size: int = 2048,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    diagnostics: dict[str, Any] | None = None,
    **options: Any,
) -> Tensor:
    """Self-influence ``score[k] = - sum_l g_{k,l}^T (H_l + lambda_l I)^{-1} g_{k,l}``, shape ``(n_train,)``.

    The diagonal of ``influence(train_grads, train_grads, ...)`` computed without the n x n score matrix:
    datainf and exact use a d x d matrix when d <= n and chunked Gram products otherwise (exact with
    n < d holds the block's n x n Gram matrix, which is smaller than its gradients); lissa runs its
    recursion for one chunk of examples at a time (cost: iterations * n^2 * d). Self-influence is
    always <= 0 under this sign convention; large magnitudes flag unusual (often mislabeled) examples.
    Arguments as in :func:`influence`.
    """
    if method in ("kfac", "ekfac"):  # datainf.kfac, with factors=KFACFactors or KFACCurvature as a keyword
        from datainf.kfac import kfac_self_influence

        return kfac_self_influence(train_grads, method=method, damping=damping, chunk_size=chunk_size,
                                   dtype=dtype, device=device, diagnostics=diagnostics, **options)
    lissa = _parse_options(method, options)
    blocks = _prepare(train_grads, None, damping, chunk_size, dtype, device)
    if not blocks:
        raise DataInfError("every block has all-zero training gradients; nothing to score")
    total: Tensor | None = None
    lissa_info: dict[str, Any] = {}
    for b, _, lam, sq in blocks:
        info = lissa_info.setdefault(b.name, {}) if method == "lissa" else None
        part = _self_block(b, method, lam, sq, lissa, info)
        total = part if total is None else total + part.to(total.dtype)
    _report(diagnostics, method, blocks, lissa_info)
    assert total is not None
    return total


def _report(
    diagnostics: dict[str, Any] | None, method: str, blocks: list, lissa_info: dict[str, Any]
) -> None:
    if method == "lissa" and lissa_info:
        worst = max(lissa_info.items(), key=lambda kv: kv[1].get("relative_residual", 0.0))
        if worst[1].get("relative_residual", 0.0) > 0.1:
            warnings.warn(
                f"lissa has not converged: block '{worst[0]}' has relative residual "
                f"{worst[1]['relative_residual']:.2g}; raise iterations for scores closer to exact (when "
                "n_train < d this overstates the score error: residual outside the gradients' span is unseen)",
                stacklevel=3,
            )
    if diagnostics is None:
        return
    diagnostics["method"] = method
    diagnostics["damping"] = {b.name: lam for b, _, lam, _ in blocks}
    if method == "lissa":
        diagnostics["lissa"] = lissa_info
