"""Hessian-free influence: no curvature at all, ``score[k, j] = -v_j . g_k`` (the gradient dot product, as in
TracIn-style gradient similarity; the paper's "Hessian-free" baseline)."""

from __future__ import annotations

from torch import Tensor

from datainf.estimators.registry import Estimator, register


@register
class Identity(Estimator):
    name = "identity"
    summary = "Hessian-free: the gradient dot product -v . g_k"
    scale_power = 2
    symmetric = True

    def precondition(self, V: Tensor) -> Tensor:
        return V

    def self_scores(self) -> Tensor:
        self.block.check_rows()  # answered from the norms alone: the rows they describe must still be intact
        return -self.sq_norms
