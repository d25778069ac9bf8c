"""How far each approximate method is from the exact inverse: see :mod:`datainf.estimators.diagnostics`
(it lives beside the methods it compares; this name is kept for existing imports)."""

from __future__ import annotations

from datainf.estimators.diagnostics import approximation_report, datainf_ihvp, diagnosed_methods, exact_ihvp

__all__ = ["approximation_report", "datainf_ihvp", "diagnosed_methods", "exact_ihvp"]
