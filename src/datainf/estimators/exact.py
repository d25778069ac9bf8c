"""Exact influence of the damped block Fisher: ``(H + lambda I)^{-1}`` by a Cholesky solve, on the cheaper of
the d x d system (d <= n, cost O(n d^2 + d^3)) and the n x n Gram (Woodbury) form (n < d, cost
O(n^2 d + n^3), never a d x d matrix):

``(G^T G / n + lambda I)^{-1} = (I - G^T (n lambda I + G G^T)^{-1} G) / lambda``.

Fitted state (scoring a store): for blocks with ``d <= n`` and ``d <= MAX_FITTED_D`` the Fisher
``H = G^T G / n`` is formed once (:meth:`Exact.fit`; it does not depend on the damping) and cached in the store
(``fitted-exact.safetensors``); each call then factors ``H + lambda I`` (O(d^3), no pass over G) and reads G
once for the scores.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from datainf.errors import DataInfError
from datainf.estimators.blocks import MAX_FITTED_D, fitted_blocks
from datainf.estimators.registry import Estimator, FittedState, register


def cholesky(A: Tensor, what: str) -> Tensor:
    """Lower Cholesky factor of a symmetric positive definite A; a clear error when it is not one."""
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        raise DataInfError(
            f"{what}: the damped matrix is not positive definite in {A.dtype}; "
            "increase the damping or pass dtype=torch.float64"
        )
    return L


#: the largest d x d (or n x n) matrix exact forms per block; beyond it exact refuses instead of exhausting memory
MAX_MATRIX_BYTES = 16 * 2**30


@register
class Exact(Estimator):
    name = "exact"
    summary = "exact inverse of the damped block Fisher (Cholesky; d x d or n x n Gram form)"
    scale_power = 0
    symmetric = True
    state_file = "fitted-exact.safetensors"

    @classmethod
    def state_settings(cls, arguments: Any) -> dict[str, Any]:
        """``H`` is kept in the compute dtype (it does not depend on the damping)."""
        return {"dtype": arguments.dtype}

    @classmethod
    def fit(cls, train: list[tuple[str, Any]], arguments: Any) -> FittedState:
        """``<block>::fisher`` = ``H = G^T G / n`` (compute dtype, as :meth:`BlockRows.fisher` forms it) for every
        block with ``d <= n`` and ``d <= MAX_FITTED_D``."""
        tensors = {}
        n = 0
        for b, _ in fitted_blocks(train, arguments, MAX_FITTED_D, need_d_le_n=True):
            tensors[f"{b.name}::fisher"], n = b.fisher(0.0), b.n
        return FittedState(tensors, {"n_examples": n})

    def _fisher(self) -> Tensor:
        """``H + lambda I`` (d x d): from the fitted state's H when it has this block's, else one pass over G."""
        b, state = self.block, self.shared
        if isinstance(state, FittedState) and b.scale == 1.0 and state.meta.get("n_examples") == b.n:
            H = state.tensors.get(f"{b.name}::fisher")
            if H is not None and tuple(H.shape) == (b.d, b.d):
                A = H.to(device=b.device, dtype=b.dtype).clone()
                A.diagonal().add_(self.damping)
                return A
        return b.fisher(self.damping)

    def setup(self) -> None:
        b = self.block
        self.gram_route = b.d > b.n  # the n x n Gram only when n < d: never for a large store of small blocks
        what = f"exact, block '{b.name}'"
        side = min(b.n, b.d)
        need = side * side * torch.empty((), dtype=b.dtype).element_size()
        if need > MAX_MATRIX_BYTES:
            raise DataInfError(
                f"{what}: the {'n x n Gram' if self.gram_route else 'd x d'} matrix ({side} x {side}) would take "
                f"{need / 2**30:.0f} GiB; project the gradients (datainf grads --project K) or use datainf or ekfac"
            )
        if self.gram_route:
            self.K = b.gram()
            A = self.K.clone()
            A.diagonal().add_(b.n * self.damping)
            self.L = cholesky(A, what)
        else:
            self.L = cholesky(self._fisher(), what)

    def precondition(self, V: Tensor) -> Tensor:
        if not self.gram_route:
            return torch.cholesky_solve(V.T.contiguous(), self.L).T
        C = self.block.dot(V)  # G V^T (n, m)
        Z = torch.cholesky_solve(C, self.L)  # (n lambda I + K)^{-1} G V^T
        U = torch.zeros_like(V)
        for s, gc in self.block.rows():
            U += Z[s].T @ gc
        return (V - U) / self.damping

    @property
    def one_pass(self) -> bool:  # d <= n: scores are -G (V H^{-1})^T, taken in the pass over every block's rows
        return not self.gram_route

    def scores(self, V: Tensor) -> Tensor:
        if not self.gram_route:
            return super().scores(V)
        C = self.block.dot(V)  # one pass over G: scores = -(C - K (n lambda I + K)^{-1} C) / lambda
        return -(C - self.K @ torch.cholesky_solve(C, self.L)) / self.damping

    def self_scores(self) -> Tensor:
        if not self.gram_route:
            return super().self_scores()
        Z = torch.linalg.solve_triangular(self.L, self.K, upper=False)
        return -(self.K.diagonal() - (Z * Z).sum(dim=0)) / self.damping
