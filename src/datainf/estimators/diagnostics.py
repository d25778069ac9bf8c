"""How far is each approximate method from exact, per block? A cheap check on a random subsample.

For every block l, a random subsample of ``n_sub`` training examples (rows ``G``, n_s x d) stands in for
the training set: its Fisher ``H = G^T G / n_s`` and damping ``lambda`` (the paper's rule on the
subsample, or the given value) are the target. For each method the inverse-Hessian-vector products
``X = (H + lambda I)^{-1} V`` of a few query vectors ``V`` (m x d: the first ``n_vectors`` query
gradients, or random training gradients of the subsample) are compared with the exact ones, computed by a
dense solve when d <= n_s and by the n_s x n_s Gram (Woodbury) form otherwise:

* ``score_correlation``: Pearson correlation of the scores ``-G X^T`` (n_s x m) with the exact scores;
* ``ihvp_relative_error``: ``||X_method - X_exact|| / ||X_exact||`` per query vector (mean and max).

Methods: ``datainf`` and ``lissa`` run on the subsample; ``kfac`` and ``ekfac`` use the eigenbasis of the
given K-FAC factors (accumulated over the whole training set), ekfac with its eigenvalues corrected on the
subsample so that it targets the same H; they are skipped when no factors are given. A method whose
correlation falls below ``threshold`` is flagged (``"far": True`` and an entry in ``"flags"``) and a
warning names it. Everything returned is JSON-able.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from datainf.errors import DataInfError
from datainf.estimators.blocks import BlockRows, Blocks, Damping, as_blocks, pair_blocks, resolve_damping
from datainf.estimators.kfac import BlockCurvature, KFACCurvature, KFACFactors, fit_curvature, precondition
from datainf.estimators.registry import accepted_options, get_method, method_names, parse_options


def diagnosed_methods() -> tuple[str, ...]:
    """Every registered method except exact (the reference) and identity (which has no curvature to
    compare): the default of :func:`approximation_report`."""
    return tuple(m for m in method_names() if m not in ("exact", "identity"))


def exact_ihvp(G: Tensor, V: Tensor, lam: float) -> Tensor:
    """``(G^T G / n + lambda I)^{-1} v`` for each row of V (m, d); G (n, d). Gram route when n < d."""
    n, d = G.shape
    if n < d:
        K = G @ G.T
        K.diagonal().add_(n * lam)
        return (V - torch.linalg.solve(K, G @ V.T).T @ G) / lam
    H = G.T @ G / n
    H.diagonal().add_(lam)
    return torch.linalg.solve(H, V.T).T


def datainf_ihvp(G: Tensor, V: Tensor, lam: float) -> Tensor:
    """DataInf's ``(1/n) sum_i (g_i g_i^T + lambda I)^{-1} v`` (Sherman-Morrison) for each row of V (m, d)."""
    w = 1.0 / (lam + (G * G).sum(dim=1))
    return (V - ((V @ G.T) * w) @ G / G.shape[0]) / lam


def _pearson(x: Tensor, y: Tensor) -> float:
    x, y = x.flatten() - x.mean(), y.flatten() - y.mean()
    denom = float(x.norm() * y.norm())
    return float((x @ y) / denom) if denom > 0 else float("nan")


def approximation_report(
    train_grads: Blocks,
    query_grads: Blocks | None = None,
    *,
    methods: Sequence[str] | None = None,
    factors: KFACFactors | KFACCurvature | None = None,
    damping: Damping = None,
    n_sub: int = 256,
    n_vectors: int = 4,
    threshold: float = 0.5,
    lissa_iterations: int = 100,
    seed: int = 0,
) -> dict[str, Any]:
    """Per block and method: correlation of scores with exact and relative error of the iHVPs (see above).

    Args:
        train_grads: per-block training gradients, each (n, *block_shape); tensors or row sources.
        query_grads: the same blocks for queries (m, *block_shape); None uses training gradients.
        methods: registered methods other than exact; default :func:`diagnosed_methods` (datainf, lissa,
            kfac, ekfac and any method you registered).
        factors: K-FAC factors (or fitted curvature) for kfac/ekfac; without them these are skipped.
        damping: None for the paper's rule on the subsample; a float, sequence or mapping per block.
        n_sub: training examples sampled per block; n_vectors: query vectors per block.
        threshold: flag a method whose score correlation with exact is below this.
        lissa_iterations, seed: the ``iterations`` and ``seed`` options of every method that declares them
            (LiSSA); each method runs through its own preconditioner, K-FAC/EK-FAC on the given factors.
    Returns:
        ``{"settings": {...}, "blocks": {block: {"n_sub", "d", "damping", "methods": {method:
        {"score_correlation", "ihvp_relative_error": {"mean", "max"}, "far"} or {"skipped": reason}}}},
        "flags": [{"block", "method", "score_correlation"}]}``
    """
    methods = diagnosed_methods() if methods is None else tuple(methods)
    unknown = [m for m in methods if m not in method_names() or m == "exact"]
    if unknown:
        raise DataInfError(f"approximation_report: unknown method(s) {unknown}; choose from "
                           f"{[m for m in method_names() if m != 'exact']}")
    if n_sub < 1 or n_vectors < 1:
        raise DataInfError("approximation_report: n_sub and n_vectors must be >= 1")
    train = as_blocks(train_grads, "train_grads")
    query = None if query_grads is None else as_blocks(query_grads, "query_grads")
    pairs = pair_blocks(train, query)
    lams = resolve_damping(damping, [name for name, _ in train])
    curvature = fit_curvature(factors) if isinstance(factors, KFACFactors) else factors
    gen = torch.Generator().manual_seed(seed)
    report: dict[str, Any] = {
        "settings": {"n_sub": n_sub, "n_vectors": n_vectors, "threshold": threshold, "seed": seed,
                     "lissa_iterations": lissa_iterations, "methods": list(methods)},
        "blocks": {},
        "flags": [],
    }
    for (name, g, v), lam in zip(pairs, lams):
        n, d = g.shape
        rows = torch.randperm(n, generator=gen)[: min(n_sub, n)].sort().values
        G = g[rows].to("cpu", torch.float64)
        if v is None:
            V = G[torch.randperm(G.shape[0], generator=gen)[:n_vectors]]
        else:
            V = v[: min(n_vectors, v.shape[0])].to("cpu", torch.float64)
        if lam is None:
            lam = 0.1 * float((G * G).sum(dim=1).mean()) / d
        entry: dict[str, Any] = {"n_sub": int(G.shape[0]), "d": int(d), "damping": lam, "methods": {}}
        report["blocks"][name] = entry
        if lam <= 0:
            entry["skipped"] = "all sampled gradients are zero"
            continue
        X_exact = exact_ihvp(G, V, lam)
        S_exact = -G @ X_exact.T
        for method in methods:
            X = _method_ihvp(method, name, G, V, lam, curvature, lissa_iterations, seed)
            if X is None:
                entry["methods"][method] = {"skipped": "no K-FAC factors given (pass factors=...)"}
                continue
            err = (X - X_exact).norm(dim=1) / X_exact.norm(dim=1).clamp_min(1e-300)
            corr = _pearson(-G @ X.T, S_exact)
            far = not (corr >= threshold)
            entry["methods"][method] = {
                "score_correlation": corr if math.isfinite(corr) else None,
                "ihvp_relative_error": {"mean": float(err.mean()), "max": float(err.max())},
                "far": far,
            }
            if far:
                report["flags"].append({"block": name, "method": method,
                                        "score_correlation": corr if math.isfinite(corr) else None})
    if report["flags"]:
        listed = ", ".join(f"{f['method']} on '{f['block']}' (r={f['score_correlation']:.2f})"
                           for f in report["flags"][:5])
        warnings.warn(
            f"{len(report['flags'])} approximation(s) far from exact (score correlation < {threshold}): {listed}"
            f"{' ...' if len(report['flags']) > 5 else ''}; their scores rank examples differently from exact "
            "influence (which is not always the better predictor of retraining: see `datainf experiment lds`)",
            stacklevel=2,
        )
    return report


def _method_ihvp(
    method: str, name: str, G: Tensor, V: Tensor, lam: float, curvature: KFACCurvature | None,
    lissa_iterations: int, seed: int,
) -> Tensor | None:
    estimator = get_method(method)
    if not estimator.needs_curvature:  # every such method through its own preconditioner and options
        block = BlockRows(name, G, torch.float64, torch.device("cpu"), 4096)
        opts = parse_options(method, accepted_options(method, iterations=lissa_iterations, seed=seed))
        return estimator(block, lam, (G * G).sum(dim=1), opts, None).precondition(V)
    if curvature is None:
        return None
    b = curvature.block(name)
    if method == "kfac":
        return precondition(b, V, b.eigenvalues("kfac"), lam, name)
    out, inn = b.shape
    if out * inn != G.shape[1]:
        raise DataInfError(f"block '{name}' has {G.shape[1]} entries but its K-FAC factors are {out} x {inn}")
    corrected = ((b.q_s.T @ G.reshape(-1, out, inn) @ b.q_a) ** 2).mean(dim=0)
    sub = BlockCurvature(b.q_a, b.a, b.q_s, b.s, corrected)
    return precondition(sub, V, corrected, lam, name)


__all__ = ["approximation_report", "datainf_ihvp", "diagnosed_methods", "exact_ihvp"]
