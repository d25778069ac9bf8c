"""The one declared place for the methods a command or experiment uses by role, rather than by name.

Everything outside :mod:`datainf.estimators` takes its method lists from the registry
(:func:`datainf.estimators.method_names`) or from here, so that no method name is written anywhere else.
"""

from __future__ import annotations

#: the paper's method: what `score`, `explain`, the Attributor and the library use without a method
DEFAULT_METHOD = "datainf"
#: the exact inverse, the reference approximations are compared with ("pearson_with_exact")
REFERENCE_METHOD = "exact"
#: no preconditioner at all: plain gradient dot products (a plain store's index, TracIn-like scores)
PLAIN_METHOD = "identity"
#: what `store precondition` uses without --method (the inverse is the same for every query)
PRECONDITION_METHOD = "ekfac"
#: the diffusion experiments' table (paper table 2)
DIFFUSION_METHODS = ("datainf", "identity", "exact")
#: the LLM identification experiment's table (paper section 4.3)
LLM_IDENTIFICATION_METHODS = ("datainf", "identity", "exact", "lissa", "ekfac")
#: methods the LLM identification experiment does not also score normalized (one solve per training example)
NOT_NORMALIZED = ("lissa",)
#: registered methods the LDS experiment leaves out by default (kfac: ekfac's cruder sibling)
LDS_LEFT_OUT = ("kfac",)

__all__ = ["DEFAULT_METHOD", "DIFFUSION_METHODS", "LDS_LEFT_OUT", "LLM_IDENTIFICATION_METHODS", "NOT_NORMALIZED",
           "PLAIN_METHOD", "PRECONDITION_METHOD", "REFERENCE_METHOD"]
