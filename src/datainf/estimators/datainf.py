"""DataInf (Kwon et al., ICLR 2024): the inverse of the damped Fisher replaced by the average of the
per-example inverses, each closed-form by Sherman-Morrison.

``(H + lambda I)^{-1} ~ (1/n) sum_i (g_i g_i^T + lambda I)^{-1} = (1/(n lambda)) sum_i (I - g_i g_i^T w_i)``
with ``w_i = 1 / (lambda + ||g_i||^2)``. For all queries at once (V is m x d):
``R = (V - ((G V^T) * w)^T G / n) / lambda`` and ``scores = -G R^T``: two passes over G, O(n m d) time,
never a d x d matrix. Self-influence: ``-(||g_k||^2 - (1/n) sum_i w_i (g_i . g_k)^2) / lambda``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from datainf.estimators.registry import Estimator, register


@register
class DataInf(Estimator):
    name = "datainf"
    summary = "DataInf: average of per-example Sherman-Morrison inverses, O(n d) per block"
    scale_power = 0

    def setup(self) -> None:
        self.w = 1.0 / (self.damping + self.sq_norms)

    def precondition(self, V: Tensor) -> Tensor:
        b = self.block
        U = torch.zeros_like(V)
        for s, gc in b.rows():
            U += ((gc @ V.T) * self.w[s, None]).T @ gc
        return (V - U / b.n) / self.damping

    def _weighted_fisher(self) -> Tensor:
        """``M = sum_i w_i g_i g_i^T`` (d x d), one pass, kept for the block."""
        if getattr(self, "_M", None) is None:
            b, w = self.block, self.w
            M = torch.zeros(b.d, b.d, dtype=b.dtype, device=b.device)
            for s, gc in b.rows():
                M += gc.T @ (gc * w[s, None])
            self._M = M
        return self._M

    def precondition_rows(self, rows: Tensor) -> Tensor:
        """Many rows at once (a whole training set): ``(rows - rows M / n) / lambda`` through the d x d matrix
        M when d <= n (one pass to form it), instead of a pass over G per chunk of rows."""
        b = self.block
        if b.d > b.n:
            return self.precondition(rows)
        return (rows - rows @ self._weighted_fisher() / b.n) / self.damping

    def self_scores(self) -> Tensor:
        b, w = self.block, self.w
        out = torch.zeros(b.n, dtype=b.dtype, device=b.device)
        if b.d <= b.n:  # through the d x d matrix M = sum_i w_i g_i g_i^T
            M = self._weighted_fisher()
            for s, gc in b.rows():
                out[s] = ((gc @ M) * gc).sum(dim=1)
        else:  # through chunks of the n x n Gram matrix
            for s, gc in b.rows():
                for t, gt in b.rows():
                    out[s] += ((gc @ gt.T) ** 2) @ w[t]
        return -(self.sq_norms - out / b.n) / self.damping
