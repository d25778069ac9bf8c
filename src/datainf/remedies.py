"""Remedies from the literature, as options of the one scoring path (:func:`datainf.scoring.score_store`).

Each is a field of :class:`~datainf.estimators.ScoreArguments`, so it is validated once, recorded in every
scores file, and composes with every method (see docs/math.md, "Remedies"):

* ``remove_top=r``: remove the training gradients' top-``r`` principal directions from every block, from
  training and query gradients alike, before the method (Bergson's style-subspace removal): per block,
  ``g <- g - V_r V_r^T g`` with ``V_r`` the top-``r`` right singular vectors of the training gradients
  ``G`` (n x d, uncentred, float64). :func:`top_directions`, :func:`remove_directions`.
* ``adam_moments=FILE``: Adam-normalized gradients (TrackStar, arXiv 2410.17413; LESS): every gradient is
  divided elementwise by ``sqrt(exp_avg_sq) + eps`` of its LoRA parameter (the optimizer's second moments,
  :data:`SECOND_MOMENTS_FILE`, saved by ``datainf finetune`` beside each checkpoint) and then scaled to unit
  norm over all blocks. :func:`load_second_moments`, :func:`adam_scales`.
* ``damping_scale`` and ``damping_rule``: the damping as a measured knob, applied where every method gets
  its lambda (:func:`datainf.estimators.partial_scores`): ``lambda_l = damping_scale * rule_l`` with
  ``rule_l`` the method's rule (the paper's ``0.1 mean ||g||^2 / d``) or
  :func:`~datainf.estimators.rank_damping`
  (``damping_rule="rank"``). :data:`DAMPING_GRID` is the grid the evaluation sweeps.
* DDA's debias (Wu et al., arXiv 2410.01285) is a difference of two scores, so it is a
  :func:`datainf.combine.combine` call: :func:`datainf.combine.debias_terms` gives the terms (the fine-tuned model's score
  minus the score at the model before fine-tuning: for LoRA, step 0, where B = 0).

Order when several are asked for: Adam scaling, then the top-``r`` removal (directions of the scaled
training gradients), then the unit norm.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from datainf.errors import DataInfError
from datainf.estimators import ScoreArguments, rank_damping
from datainf.estimators.blocks import chunks

#: the file of LoRA second moments (Adam's exp_avg_sq) that ``datainf finetune`` writes beside each checkpoint
SECOND_MOMENTS_FILE = "optimizer_second_moments.safetensors"
#: Adam's epsilon in ``g / (sqrt(v) + eps)`` (torch.optim.AdamW's default)
ADAM_EPS = 1e-8
#: the damping multipliers the evaluation sweeps (x the method's rule, per block)
DAMPING_GRID = (0.001, 0.01, 0.1, 0.3, 1.0, 3.0, 10.0)
#: the data-driven damping rules ``damping_rule`` accepts (None: the method's own rule)
DAMPING_RULES = ("rank",)
#: rows read at once when a remedy makes a pass over a block
_CHUNK = 1024


class TransformedRows:
    """A row source (``shape``, ``dtype``, ``[rows]``) serving ``fn(rows, index)`` of another one: the
    remedies transform a store's memory-mapped block chunk by chunk instead of copying it."""

    def __init__(self, source: Any, fn: Callable[[Tensor, Any], Tensor], dtype: torch.dtype):
        self.source, self.fn, self._dtype = source, fn, dtype
        self._shape = (int(source.shape[0]), math.prod(tuple(source.shape)[1:]))

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def __getitem__(self, rows: slice | Tensor) -> Tensor:
        x = torch.as_tensor(self.source[rows])
        return self.fn(x.reshape(x.shape[0], -1), rows).to(self._dtype)


def _rows64(g: Any, chunk: int = _CHUNK):
    """(slice, float64 rows) of a block, ``chunk`` rows at a time."""
    n = int(g.shape[0])
    for s in chunks(n, chunk):
        x = torch.as_tensor(g[s])
        yield s, x.reshape(x.shape[0], -1).double()


def top_directions(g: Any, r: int, name: str = "0") -> Tensor:
    """The top-``r`` right singular vectors of a block's training gradients ``G`` (n x d), as (d, r) float64
    columns: from ``G^T G`` (d x d) when d <= n, else from the Gram matrix ``G G^T`` (n x n) as
    ``G^T u_i / s_i``. Directions of zero singular value are dropped (an all-zero block gives none)."""
    n, d = int(g.shape[0]), math.prod(tuple(g.shape)[1:])
    if r >= min(n, d):
        raise DataInfError(f"block '{name}': removing its top {r} directions leaves nothing (it has {n} training "
                           f"rows of {d} entries; at most {min(n, d) - 1} directions can be removed)")
    if d <= n:
        C = torch.zeros(d, d, dtype=torch.float64)
        for _, x in _rows64(g):
            C += x.T @ x
        values, vectors = torch.linalg.eigh(C)
        top = vectors[:, values.argsort(descending=True)[:r]]
        keep = values.sort(descending=True).values[:r] > values.abs().max() * 1e-12
        return top[:, keep]
    K = torch.zeros(n, n, dtype=torch.float64)
    for s, x in _rows64(g):
        for t, y in _rows64(g):
            K[s, t] = x @ y.T
    values, vectors = torch.linalg.eigh(K)
    order = values.argsort(descending=True)[:r]
    values, U = values[order], vectors[:, order]
    keep = values > values.abs().max() * 1e-12 if values.numel() else values > 0
    values, U = values[keep], U[:, keep]
    V = torch.zeros(d, U.shape[1], dtype=torch.float64)
    for s, x in _rows64(g):
        V += x.T @ U[s]
    return V / values.sqrt()


def remove_directions(x: Tensor, V: Tensor) -> Tensor:
    """``x - (x V) V^T`` for rows ``x`` (m, d) and orthonormal columns ``V`` (d, r), in float64."""
    x = x.double()
    return x - (x @ V) @ V.T


def load_second_moments(path: str | os.PathLike) -> dict[str, Tensor]:
    """The second moments in ``path`` (a :data:`SECOND_MOMENTS_FILE`, or a folder holding one), parameter
    name -> tensor of the parameter's shape; one error naming the file when it is missing or unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / SECOND_MOMENTS_FILE
    if not path.is_file():
        raise DataInfError(f"no optimizer second moments at {path}; `datainf finetune` writes {SECOND_MOMENTS_FILE} "
                           "beside the adapter and each checkpoint (fine-tune again, or drop the Adam normalization)")
    try:
        moments = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise DataInfError(f"{path} is not a safetensors file of second moments ({reason})") from None
    for name, v in moments.items():
        if not v.is_floating_point() or not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
            raise DataInfError(f"{path}: second moment '{name}' is not finite and >= 0 everywhere")
    return moments


def adam_scales(moments: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, ...]], source: str = "the moments",
                eps: float = ADAM_EPS) -> dict[str, Tensor]:
    """Per block, the flat (d,) float64 factor ``1 / (sqrt(v) + eps)`` its gradients are multiplied by.
    Every block must have its moment, of the block's size (blocks of a projected store do not: refused)."""
    out = {}
    for name, shape in shapes.items():
        v = moments.get(name)
        d = math.prod(shape)
        if v is None:
            raise DataInfError(f"{source} hold no second moment for block '{name}'; give the file saved with the "
                               "adapter the gradients were taken with")
        if v.numel() != d:
            raise DataInfError(f"{source}: the second moment of block '{name}' has {v.numel()} entries, the block "
                               f"{d} (a projected store cannot be Adam-normalized: project after normalizing)")
        out[name] = 1.0 / (v.reshape(-1).double().sqrt() + eps)
    return out


def uses_gradient_remedies(arguments: ScoreArguments) -> bool:
    """True when ``arguments`` change the gradients themselves (top-r removal, Adam normalization)."""
    return bool(arguments.remove_top) or arguments.adam_moments is not None


def apply_remedies(train: Mapping[str, Any], queries: Mapping[str, Tensor] | None, arguments: ScoreArguments,
                   *, shapes: Mapping[str, tuple[int, ...]] | None = None
                   ) -> tuple[dict[str, Any], dict[str, Tensor] | None]:
    """The training blocks (as :class:`TransformedRows`, read lazily) and query blocks (in memory) after the
    gradient remedies of ``arguments`` (Adam scaling, top-r removal, unit norm; see the module's docstring).
    ``shapes``: each block's parameter shape (default its flattened size). Unchanged when none is asked."""
    train = dict(train)
    qs = None if queries is None else {k: torch.as_tensor(v).reshape(v.shape[0], -1) for k, v in queries.items()}
    if not uses_gradient_remedies(arguments):
        return train, qs
    out_dtype = torch.float64 if any(getattr(g, "dtype", None) == torch.float64 for g in train.values()) else \
        torch.float32
    steps: dict[str, list[Callable[[Tensor], Tensor]]] = {name: [] for name in train}
    scales = None
    if arguments.adam_moments is not None:
        shapes = shapes or {name: (math.prod(tuple(g.shape)[1:]),) for name, g in train.items()}
        scales = adam_scales(load_second_moments(arguments.adam_moments), shapes, str(arguments.adam_moments))
        for name in train:
            steps[name].append(lambda x, c=scales[name]: x.double() * c)

    def staged(name: str) -> TransformedRows:
        todo = tuple(steps[name])  # the steps so far (later ones are appended to steps[name])

        def fn(x: Tensor, _rows: Any) -> Tensor:
            for f in todo:
                x = f(x)
            return x.double()
        return TransformedRows(train[name], fn, torch.float64)

    if arguments.remove_top:
        for name in train:
            V = top_directions(staged(name), int(arguments.remove_top), name)
            steps[name].append(lambda x, V=V: remove_directions(x, V))
    norms = None
    if scales is not None:  # unit norm over all blocks, of every training row and every query
        n = int(next(iter(train.values())).shape[0])
        sq = torch.zeros(n, dtype=torch.float64)
        for name in train:
            for s, x in _rows64(staged(name)):
                sq[s] += (x * x).sum(dim=1)
        norms = sq.sqrt().clamp_min(torch.finfo(torch.float64).tiny)

    def final(name: str) -> TransformedRows:
        todo = tuple(steps[name])

        def fn(x: Tensor, rows: Any) -> Tensor:
            for f in todo:
                x = f(x)
            x = x.double()
            return x if norms is None else x / norms[rows][:, None]
        return TransformedRows(train[name], fn, out_dtype)

    new_train = {name: final(name) for name in train}
    if qs is not None:
        new_q = {}
        for name, v in qs.items():
            x = v.double()
            for f in steps[name]:
                x = f(x)
            new_q[name] = x
        if norms is not None:
            qn = torch.stack([(x * x).sum(dim=1) for x in new_q.values()]).sum(dim=0).sqrt()
            qn = qn.clamp_min(torch.finfo(torch.float64).tiny)
            new_q = {name: x / qn[:, None] for name, x in new_q.items()}
        qs = {name: x.to(out_dtype) for name, x in new_q.items()}
    return new_train, qs


__all__ = ["ADAM_EPS", "DAMPING_GRID", "DAMPING_RULES", "SECOND_MOMENTS_FILE", "TransformedRows", "adam_scales",
           "apply_remedies", "load_second_moments", "rank_damping", "remove_directions",
           "top_directions", "uses_gradient_remedies"]
