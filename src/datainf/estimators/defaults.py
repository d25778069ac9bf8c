"""The one declared place for the methods a command or experiment uses by role, rather than by name.

Everything outside :mod:`datainf.estimators` takes its method lists from the registry
(:func:`datainf.estimators.method_names`) or from here, so that no method name is written anywhere else.
"""

from __future__ import annotations

#: the paper's method: what the library's low-level calls (influence, the Attributor) use without a method
DEFAULT_METHOD = "datainf"
#: what `score`, `explain` and `datainf.explain` use without --method, by the kind of task the store holds:
#: the most accurate variant measured on that kind (docs/results.md, "The defaults and what they measured"),
#: each a spec of datainf.estimators.arguments_from_spec ("METHOD" or "METHOD:KEY=VALUE,...")
DEFAULT_BY_TASK_KIND = {"causal_lm": "ekfac", "classification": "datainf"}
#: one line each: what the default measured, printed by `explain` beside its answer
DEFAULT_EVIDENCE = {
    "causal_lm": "EK-FAC summed along the run (step 0 + checkpoints) found the right training examples at AUC "
                 "0.996 and predicted retraining at LDS 0.73, against 0.33 for a resemblance control (SmolLM2, "
                 "docs/results.md); from the final adapter alone it measured AUC 0.75 and LDS 0.40",
    "classification": "DataInf: mislabeled-example AUC 0.718 and LDS 0.87 on the MiniLM demo (docs/results.md)",
}
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

def task_kind(token_level: bool) -> str:
    """"causal_lm" for a task whose loss is over tokens (``datainf.tasks.token_level(task)``), else
    "classification" (a label, or one loss, per example)."""
    return "causal_lm" if token_level else "classification"


def default_spec(token_level: bool) -> str:
    """What `score` and `explain` use when no method is asked, for a store whose task is (``token_level``) or is
    not over tokens: a spec of :func:`datainf.estimators.arguments_from_spec` (a method, and the options the
    measurements chose for it), from :data:`DEFAULT_BY_TASK_KIND`."""
    return DEFAULT_BY_TASK_KIND[task_kind(token_level)]


def default_method(token_level: bool) -> str:
    """The method of :func:`default_spec`."""
    return default_spec(token_level).partition(":")[0]


__all__ = ["DEFAULT_BY_TASK_KIND", "DEFAULT_EVIDENCE", "DEFAULT_METHOD", "default_method", "default_spec", "task_kind", "DIFFUSION_METHODS", "LDS_LEFT_OUT", "LLM_IDENTIFICATION_METHODS", "NOT_NORMALIZED",
           "PLAIN_METHOD", "PRECONDITION_METHOD", "REFERENCE_METHOD"]
