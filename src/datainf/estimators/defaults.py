"""The one declared place for the methods a command or experiment uses when none is asked for.

Everything else takes its method lists from the registry (:func:`datainf.estimators.method_names`) or from here,
so that no method name is written outside :mod:`datainf.estimators`.
"""

from __future__ import annotations

#: what `store precondition` uses without --method (the inverse is the same for every query)
PRECONDITION_METHOD = "ekfac"
#: the diffusion experiments' table (paper table 2)
DIFFUSION_METHODS = ("datainf", "identity", "exact")
#: the LLM identification experiment's table (paper section 4.3)
LLM_IDENTIFICATION_METHODS = ("datainf", "identity", "exact", "lissa", "ekfac")

__all__ = ["DIFFUSION_METHODS", "LLM_IDENTIFICATION_METHODS", "PRECONDITION_METHOD"]
