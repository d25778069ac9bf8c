"""The one declared place for the methods a command or experiment uses by role, rather than by name.

Everything outside :mod:`datainf.estimators` takes its method lists from the registry
(:func:`datainf.estimators.method_names`) or from here, so that no method name is written anywhere else.
"""

from __future__ import annotations

#: the paper's method: what the library's low-level calls (influence, the Attributor) use without a method
DEFAULT_METHOD = "datainf"
#: what `score`, `explain` and `datainf.explain` use without --method, by the kind of task the store holds and
#: the question asked: "per_query" (each query's loss), "mean_query" (the mean query loss, `score --mean-query`:
#: the data-cleaning question) and "self" (self-influence). Each is a spec of
#: datainf.estimators.arguments_from_spec ("METHOD" or "METHOD:KEY=VALUE,..."), the most accurate variant
#: measured for that question (docs/results.md, "The defaults and what they measured"):
#: - causal LM: EK-FAC (along the run: identification AUC 0.996, LDS 0.76 vs 0.34 for resemblance);
#: - classifier, per query: the cosine of the gradients (identity normalized: LDS 0.897, the best of 18 variants;
#:   identity 0.894, DataInf 0.870, EK-FAC 0.590, exact 0.248);
#: - classifier, mean query: DataInf with the top training direction removed (mislabel AUC 0.784 +- 0.006 over 3
#:   seeds, LiSSA 0.770; but per-query LDS 0.21: the top direction is what predicts retraining);
#: - classifier, self-influence: DataInf, the paper's method (not measured against the others).
DEFAULTS: dict[str, dict[str, str]] = {
    "causal_lm": {"per_query": "ekfac", "mean_query": "ekfac", "self": "ekfac"},
    "classification": {"per_query": "identity:normalize", "mean_query": "datainf:remove_top=1", "self": "datainf"},
}
#: one line each: what the causal-LM default measured, printed by `explain` beside its answer
DEFAULT_EVIDENCE = {
    "causal_lm": "EK-FAC summed along the run (step 0 + checkpoints) found the right training examples at AUC "
                 "0.996 and predicted retraining at LDS 0.76, against 0.34 for a resemblance control (SmolLM2, "
                 "docs/results.md); from the final adapter alone it measured AUC 0.75 and LDS 0.43",
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


QUESTIONS = ("per_query", "mean_query", "self")


def default_spec(token_level: bool, question: str = "per_query") -> str:
    """What `score` and `explain` use when no method is asked, for a store whose task is (``token_level``) or is
    not over tokens, and a question of :data:`QUESTIONS`: a spec of :func:`datainf.estimators.arguments_from_spec`
    (a method, and the options the measurements chose for it), from :data:`DEFAULTS`."""
    return DEFAULTS[task_kind(token_level)][question]


__all__ = ["DEFAULTS", "DEFAULT_EVIDENCE", "DEFAULT_METHOD", "DIFFUSION_METHODS", "LDS_LEFT_OUT",
           "LLM_IDENTIFICATION_METHODS", "NOT_NORMALIZED", "PLAIN_METHOD", "PRECONDITION_METHOD", "QUESTIONS",
           "REFERENCE_METHOD", "default_spec", "task_kind"]
