"""DataInf (Kwon et al., ICLR 2024): the inverse of the damped Fisher replaced by the average of the
per-example inverses, each closed-form by Sherman-Morrison.

``(H + lambda I)^{-1} ~ (1/n) sum_i (g_i g_i^T + lambda I)^{-1} = (1/(n lambda)) sum_i (I - g_i g_i^T w_i)``
with ``w_i = 1 / (lambda + ||g_i||^2)``. For all queries at once (V is m x d):
``R = (V - ((G V^T) * w)^T G / n) / lambda`` and ``scores = -G R^T``: two passes over G, O(n m d) time,
never a d x d matrix. Self-influence: ``-(||g_k||^2 - (1/n) sum_i w_i (g_i . g_k)^2) / lambda``.

Fitted state (scoring a store): for blocks with ``d <= MAX_FITTED_D`` (e.g. projected blocks) the
preconditioner is the fixed d x d matrix ``(I - M_bar) / lambda`` with ``M_bar = (1/n) sum_i w_i g_i g_i^T``;
:meth:`DataInf.fit` forms ``M_bar`` once (one pass), the store caches it (``fitted-datainf.safetensors``, for
the damping and compute dtype it was fitted with), and each query is then ``R = (V - V M_bar) / lambda``
(one d x d product) and one pass over G for the scores, instead of two.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from datainf.estimators.blocks import MAX_FITTED_D, fitted_blocks
from datainf.estimators.registry import Estimator, FittedState, register


@register
class DataInf(Estimator):
    name = "datainf"
    summary = "DataInf: average of per-example Sherman-Morrison inverses, O(n d) per block"
    scale_power = 0
    symmetric = True
    state_file = "fitted-datainf.safetensors"

    @classmethod
    def state_settings(cls, arguments: Any) -> dict[str, Any]:
        """``M_bar`` depends on the damping (through ``w``) and is kept in the compute dtype."""
        return {"damping": arguments.to_dict()["damping"], "dtype": arguments.dtype}

    @classmethod
    def fit(cls, train: list[tuple[str, Any]], arguments: Any) -> FittedState:
        """``<block>::m`` = ``M_bar = (1/n) sum_i w_i g_i g_i^T`` (d x d, compute dtype; chunk products in it,
        summed in float64) for every block with ``d <= MAX_FITTED_D``; ``meta["damping"]``: the lambda each was
        fitted with (scoring uses a block's matrix only under that lambda)."""
        tensors: dict[str, Tensor] = {}
        damping: dict[str, float] = {}
        n = 0
        for b, lam in fitted_blocks(train, arguments, MAX_FITTED_D):
            sq = b.sq_norms()
            lam = cls.default_damping(b, sq, None) if lam is None else lam
            if lam == 0.0:  # an all-zero block: scoring skips it
                continue
            w = 1.0 / (lam + sq)
            M = torch.zeros(b.d, b.d, dtype=torch.float64, device=b.device)
            for s, gc in b.rows():
                M += (gc.T @ (gc * w[s, None])).double()
            tensors[f"{b.name}::m"] = (M / b.n).to(b.dtype)
            damping[b.name], n = float(lam), b.n
        return FittedState(tensors, {"damping": damping, "n_examples": n})

    def setup(self) -> None:
        self.w = 1.0 / (self.damping + self.sq_norms)
        self._mean_m = self._from_state()

    def _from_state(self) -> Tensor | None:
        """This block's ``M_bar`` from the fitted state, when it has one fitted for these rows and this damping."""
        state, b = self.shared, self.block
        if not isinstance(state, FittedState) or b.scale != 1.0 or state.meta.get("n_examples") != b.n:
            return None
        m, lam = state.tensors.get(f"{b.name}::m"), (state.meta.get("damping") or {}).get(b.name)
        if m is None or lam is None or tuple(m.shape) != (b.d, b.d) or not math.isclose(lam, self.damping,
                                                                                         rel_tol=1e-9):
            return None
        return m.to(device=b.device, dtype=b.dtype)

    def precondition(self, V: Tensor) -> Tensor:
        if self._mean_m is not None:  # the fitted d x d matrix: no pass over G
            return (V - V @ self._mean_m) / self.damping
        b = self.block
        U = torch.zeros_like(V)
        for s, gc in b.rows():
            U += ((gc @ V.T) * self.w[s, None]).T @ gc
        return (V - U / b.n) / self.damping

    def _weighted_fisher(self) -> Tensor:
        """``M_bar = (1/n) sum_i w_i g_i g_i^T`` (d x d): the fitted state's, or formed in one pass and kept."""
        if self._mean_m is None:
            b, w = self.block, self.w
            M = torch.zeros(b.d, b.d, dtype=b.dtype, device=b.device)
            for s, gc in b.rows():
                M += gc.T @ (gc * w[s, None])
            self._mean_m = M / b.n
        return self._mean_m

    def precondition_rows(self, rows: Tensor) -> Tensor:
        """Many rows at once (a whole training set): ``(rows - rows M_bar) / lambda`` through the d x d matrix
        when there is one or d <= n (one pass to form it), instead of a pass over G per chunk of rows."""
        b = self.block
        if b.d > b.n and self._mean_m is None:
            return self.precondition(rows)
        return (rows - rows @ self._weighted_fisher()) / self.damping

    def self_scores(self) -> Tensor:
        b, w = self.block, self.w
        out = torch.zeros(b.n, dtype=b.dtype, device=b.device)
        if b.d <= b.n or self._mean_m is not None:  # through the d x d matrix M_bar
            M = self._weighted_fisher()
            for s, gc in b.rows():
                out[s] = ((gc @ M) * gc).sum(dim=1)
        else:  # through chunks of the n x n Gram matrix
            for s, gc in b.rows():
                for t, gt in b.rows():
                    out[s] += ((gc @ gt.T) ** 2) @ w[t]
            out /= b.n
        return -(self.sq_norms - out) / self.damping
