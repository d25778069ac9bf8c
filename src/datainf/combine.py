"""One way to combine scores: a weighted sum of scoring terms over the same training set.

A term is (training store, queries, :class:`ScoreArguments`, weight). :func:`combine` scores each term with
:func:`datainf.scoring.score_store` and returns ``sum_t weight_t * scores_t`` as one :class:`CombinedResult`
whose settings carry each term's provenance (the training and query stores' paths and fingerprints, the
weight, the method), so a scores file written by :func:`datainf.scoring.save_scores` says what was summed.

Uses: the sum over a fine-tune's checkpoints weighted by their learning rates (TracIn; ``datainf score
--run-stores``, ``datainf explain --run``), or a difference of two adapters' scores (a debias, weights 1 and
-1). Every term must hold the same training rows under the same loss (:func:`check_summable`); a sum over
different training sets, tokenizations or projections is refused, naming the first thing that differs.
"""

from __future__ import annotations

import math
import os
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from datainf import atomic
from datainf.errors import DataInfError, parse_json
from datainf.estimators import ScoreArguments, ScoreResult
from datainf.scoring import score_store
from datainf.store import GradientStore, projection_label


@dataclass(frozen=True)
class Term:
    """One summand: ``weight * score_store(train, queries, arguments)``. ``queries`` is a query store,
    in-memory query gradients (block -> (n_query, d)), or None for self-influence; ``label`` names the term in
    messages and in the provenance (e.g. the checkpoint folder; default the training store's path)."""

    train: GradientStore
    queries: GradientStore | Mapping[str, Tensor] | None
    arguments: ScoreArguments
    weight: float = 1.0
    label: str | None = None


@dataclass
class CombinedResult(ScoreResult):
    """A :class:`ScoreResult` for a weighted sum of terms: ``scores`` is the sum, ``arguments`` and ``kind``
    are the (shared) first term's, ``seconds`` the total, ``damping`` the first term's; ``terms`` holds each
    term's provenance and ``results`` each term's own result (not saved)."""

    terms: list[dict[str, Any]] = field(default_factory=list)
    results: list[ScoreResult] = field(default_factory=list, repr=False)
    weighting: str = "weights"

    def settings(self) -> dict[str, Any]:
        """The first term's settings, the summed shape and seconds, ``terms`` (the provenance) and the
        ``weighting`` (:data:`WEIGHTINGS`)."""
        return {**super().settings(), "terms": [dict(t) for t in self.terms], "weighting": self.weighting}


#: how :func:`combine` sums its terms' scores S_t with their weights w_t:
#: "weights": sum_t w_t S_t (a run: each checkpoint's learning rate, TracIn's sum);
#: "standardized": sum_t w_t S_t / sd(S_t), each term's scores first divided by their standard deviation over
#: all their entries (a preconditioned score does not shrink as the gradients do, so this evens out the
#: checkpoints' scales). The sd is over every (example, query) entry scored together, so a query's scores
#: depend a little on the other queries of the call (dividing each query's column by its own sd instead
#: measured math AUC 0.894 against 0.917 at the paper's sizes, sentences 0.980 against 0.979);
#: "squared-standardized": sum_t sign(w_t) w_t^2 S_t / sd(S_t) (leans on the early, high-rate checkpoints:
#: identification AUC on math at the paper's sizes 0.917 against 0.836 with "weights"; docs/results.md).
WEIGHTINGS = ("weights", "standardized", "squared-standardized")


def summing_fields(store: GradientStore) -> dict[str, Any]:
    """What the stores of one sum must share, by name: the training examples (dataset fingerprint, count,
    task), the tokenization (every collate setting the store recorded: max_length, loss_tokens,
    chat_template, assistant_turns...), the projection and
    the task fingerprint (which also covers the loss's other settings)."""
    from datainf.data.collate import TextCollator

    meta = store.metadata
    own = meta.collate if isinstance(meta.collate, dict) else {"collate": meta.collate} if meta.collate else {}
    collate = {"loss_tokens": TextCollator.loss_tokens, **own}  # left out when default
    return {"task": meta.task, "dataset fingerprint": store.fingerprints.get("dataset"),
            "number of examples": store.n_examples,
            **{f"tokenization {key}": value for key, value in sorted(collate.items())},
            "projection": store.projection, "task fingerprint": store.fingerprints.get("task")}


def check_summable(stores: Sequence[GradientStore], names: Sequence[str] | None = None) -> None:
    """Refuse to sum scores over training stores that do not hold the same examples under the same loss
    (:func:`summing_fields`), naming both stores, the first field that differs and both values
    (``names``: how to call each store; default its path)."""
    names = [str(s.path) for s in stores] if names is None else [str(n) for n in names]
    if not stores:
        return
    first = summing_fields(stores[0])
    for other, other_name in zip(stores[1:], names[1:]):
        theirs = summing_fields(other)
        for key in {**first, **theirs}:
            a, b = first.get(key), theirs.get(key)
            if a != b:
                if key == "projection" and projection_label({"projection": a}) != projection_label({"projection": b}):
                    a, b = projection_label({"projection": a}), projection_label({"projection": b})
                raise DataInfError(
                    f"stores {names[0]} and {other_name} cannot be summed: their {key} differs ({_shown(a)} in "
                    f"{names[0]}, {_shown(b)} in {other_name}); make every store of the sum from the same "
                    "training file with the same `datainf grads` options")


def _shown(value: Any) -> str:
    return "not recorded (the default)" if value is None else repr(value)


def _provenance(term: Term) -> dict[str, Any]:
    queries = term.queries
    if isinstance(queries, GradientStore):
        query = {"path": str(queries.path), "fingerprints": dict(queries.fingerprints)}
    elif queries is None:
        query = None  # self-influence
    else:
        query = {"in_memory": True, "n_query": int(next(iter(queries.values())).shape[0]) if queries else 0}
    return {"label": term.label or str(term.train.path), "weight": term.weight, "method": term.arguments.method,
            "train_store": {"path": str(term.train.path), "fingerprints": dict(term.train.fingerprints)},
            "queries": query}


def check_weight(weight: Any, where: str) -> float:
    """A term's weight: a finite non-zero number (negative allowed: a difference), else one error naming
    ``where``."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise DataInfError(f"{where}: weight {weight!r} is not a number")
    try:
        number = float(weight)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number) or number == 0:
        raise DataInfError(f"{where}: weight {weight!r} must be a finite non-zero number (NaN or infinity make "
                           "every score NaN or infinite; 0 drops the term)")
    return number


def combine(terms: Sequence[Term], *, allow_mismatch: bool = False, weighting: str = "weights") -> CombinedResult:
    """``sum_t weight_t * score_store(train_t, queries_t, arguments_t)`` as one result with each term's
    provenance (see :class:`CombinedResult`); ``weighting`` (:data:`WEIGHTINGS`) may standardize each term's
    scores first and square the weights. Refused before any scoring: no terms, an unknown weighting, a weight that is not a
    finite non-zero number, terms whose training stores differ in their rows or loss (:func:`check_summable`),
    or whose scores would not add up (self-influence mixed with influence, other query counts or
    ``mean_query``). ``allow_mismatch`` is passed to each :func:`score_store` (a query store made with
    another adapter than its training store)."""
    terms = list(terms)
    if not terms:
        raise DataInfError("combine: no terms to sum; give at least one (store, queries, arguments, weight)")
    if weighting not in WEIGHTINGS:
        raise DataInfError(f"combine: unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
    labels = [t.label or str(t.train.path) for t in terms]
    weights = [check_weight(t.weight, f"term {i} ({label})") for i, (t, label) in enumerate(zip(terms, labels))]
    check_summable([t.train for t in terms], labels)
    shapes = {(t.queries is None, bool(t.arguments.mean_query),
               None if t.queries is None or t.arguments.mean_query else _n_queries(t.queries)) for t in terms}
    if len(shapes) > 1:
        raise DataInfError(f"combine: the terms' scores do not add up (self-influence, mean_query or the number of "
                           f"queries differ: {sorted(shapes, key=repr)}); give every term the same kind of queries")
    t0 = time.perf_counter()
    results = [_scored(t, label, allow_mismatch) for t, label in zip(terms, labels)]
    total = sum(w * s for w, s in _weighted(weighting, weights, results, labels))
    first = results[0]
    provenance = [{**_provenance(t), "weight": w} for t, w in zip(terms, weights)]
    diagnostics: dict[str, Any] = {}
    mismatch = [f"{label}: {x}" for label, r in zip(labels, results) for x in r.diagnostics.get("mismatch", [])]
    if mismatch:
        diagnostics["mismatch"] = mismatch
    return CombinedResult(scores=total.to(first.scores.dtype), arguments=first.arguments, kind=first.kind,
                          damping=dict(first.damping), diagnostics=diagnostics,
                          seconds=time.perf_counter() - t0,
                          curvature_seconds=sum(r.curvature_seconds for r in results),
                          world_size=first.world_size, terms=provenance, results=results, weighting=weighting)


def _weighted(weighting: str, weights: list[float], results: list[ScoreResult], labels: list[str]
              ) -> list[tuple[float, Tensor]]:
    """(weight, float64 scores) of each term under ``weighting`` (:data:`WEIGHTINGS`)."""
    out = []
    for w, r, label in zip(weights, results, labels):
        s = r.scores.double()
        if weighting != "weights":
            sd = float(s.std(correction=0)) if s.numel() else 0.0
            if not sd > 0:
                raise DataInfError(f"combine: the scores of {label} are all equal (standard deviation {sd}); "
                                   f"weighting {weighting!r} divides by it: use weighting 'weights'")
            s = s / sd
        if weighting == "squared-standardized":
            w = math.copysign(w * w, w)
        out.append((w, s))
    return out


def debias_terms(train: GradientStore, queries: GradientStore | Mapping[str, Tensor] | None,
                 base_train: GradientStore, base_queries: GradientStore | Mapping[str, Tensor] | None,
                 arguments: ScoreArguments, weight: float = 1.0) -> list[Term]:
    """DDA's debias (Wu et al., arXiv 2410.01285) as the terms of one :func:`combine` call: the fine-tuned
    model's scores minus the scores at the model before fine-tuning (its "knowledge bias"), ``weight * (S -
    S_base)``. For LoRA the model before fine-tuning is step 0 (checkpoint-0, or ``datainf grads --initial``:
    B = 0, the base model's function). Both training stores must hold the same rows (combine checks)."""
    return [Term(train, queries, arguments, weight, label=f"{train.path} (fine-tuned)"),
            Term(base_train, base_queries, arguments, -weight, label=f"{base_train.path} (before fine-tuning: "
                                                                    "DDA's debias)")]


#: the file that makes a folder of per-checkpoint stores (`datainf grads --run RUN --store S`) one run
RUN_STORES_FILE = "datainf_run.json"
RUN_STORES_FORMAT = "datainf-run-stores"


@dataclass(frozen=True)
class RunStore:
    """One checkpoint's store in a folder of run stores: ``name`` (its subfolder, checkpoint-STEP), the
    adapter it was made with, the checkpoint's step and its weight (learning rate) in the run's sum."""

    name: str
    path: Path
    adapter: str
    step: int
    weight: float


def is_run_stores(folder: str | os.PathLike) -> bool:
    """A folder of per-checkpoint stores written by ``datainf grads --run`` (it holds datainf_run.json)."""
    return (Path(folder) / RUN_STORES_FILE).is_file()


def write_run_stores(folder: str | os.PathLike, run: str | os.PathLike, checkpoints: Sequence[Any]) -> list[RunStore]:
    """Record, atomically, which store of ``folder`` holds which checkpoint of ``run`` (each an (adapter,
    learning_rate, step) triple, :func:`datainf.models.checkpoints.run_checkpoints`): store checkpoint-STEP
    per checkpoint. Returns the stores (not yet made: `datainf grads --run` fills them)."""
    stores = [RunStore(f"checkpoint-{int(step)}", Path(folder) / f"checkpoint-{int(step)}", str(adapter), int(step),
                       check_weight(float(rate), f"{adapter}")) for adapter, rate, step in checkpoints]
    content = {"format": RUN_STORES_FORMAT, "run": str(run),
               "checkpoints": [{"store": r.name, "adapter": r.adapter, "step": r.step, "learning_rate": r.weight}
                               for r in stores]}
    path = Path(folder) / RUN_STORES_FILE
    if path.is_file():
        try:
            if parse_json(path.read_bytes(), str(path)) == content:
                return stores  # the same run: the file stays as it is
        except DataInfError:
            pass  # unreadable: written anew
    Path(folder).mkdir(parents=True, exist_ok=True)
    atomic.write_json(path, content)
    return stores


def read_run_stores(folder: str | os.PathLike) -> list[RunStore]:
    """The checkpoints recorded in a folder of run stores (:func:`write_run_stores`), in step order; one
    error naming the file when it is not one."""
    path = Path(folder) / RUN_STORES_FILE
    if not path.is_file():
        raise DataInfError(f"{folder} is not a folder of run stores (no {RUN_STORES_FILE}); make it with "
                           "`datainf grads --run RUN --store FOLDER`")
    fix = "make it again with `datainf grads --run RUN --store FOLDER`"
    data = parse_json(path.read_bytes(), str(path), fix)
    entries = data.get("checkpoints") if isinstance(data, dict) and data.get("format") == RUN_STORES_FORMAT else None
    if not isinstance(entries, list) or not entries:
        raise DataInfError(f"{path} is not a datainf run-stores file (format {RUN_STORES_FORMAT!r} with a list of "
                           f"checkpoints); {fix}")
    out = []
    for i, e in enumerate(entries):
        if not (isinstance(e, dict) and isinstance(e.get("store"), str) and _CHECKPOINT_NAME.match(e["store"])
                and isinstance(e.get("step"), int)):
            raise DataInfError(f"{path}: checkpoint {i} is not {{'store': 'checkpoint-N', 'step', 'learning_rate', "
                               f"'adapter'}}; {fix}")
        out.append(RunStore(e["store"], Path(folder) / e["store"], str(e.get("adapter")), e["step"],
                            check_weight(e.get("learning_rate"), f"{path}: checkpoint {e['store']}")))
    return sorted(out, key=lambda r: r.step)


_CHECKPOINT_NAME = re.compile(r"^checkpoint-\d+$")


def run_terms(train: str | os.PathLike, queries: str | os.PathLike | Mapping[str, Mapping[str, Tensor]] | None,
              arguments: ScoreArguments) -> list[Term]:
    """The terms of a run's score: for each checkpoint of the run stores ``train``, its store against the
    same checkpoint's queries, weighted by its learning rate. ``queries``: a folder of run stores of the
    queries (made with ``datainf grads --run`` on the same run: paired by checkpoint), query gradients per
    checkpoint name ({"checkpoint-N": block -> (n_query, d)}), or None (self-influence). The two folders must
    hold the same checkpoints with the same weights."""
    stores = read_run_stores(train)
    query_stores: dict[str, Any] = {}
    if isinstance(queries, (str, os.PathLike)):
        theirs = read_run_stores(queries)
        mine = {(r.name, r.weight) for r in stores}
        if mine != {(r.name, r.weight) for r in theirs}:
            only = sorted({r.name for r in stores} ^ {r.name for r in theirs}) or ["(their learning rates differ)"]
            raise DataInfError(f"run stores {train} and {queries} are not of the same run: they differ in "
                               f"{', '.join(only)}; make both with `datainf grads --run` on the same run folder")
        query_stores = {r.name: GradientStore.open(r.path) for r in theirs}
    elif queries is not None:
        missing = [r.name for r in stores if r.name not in queries]
        if missing:
            raise DataInfError(f"no query gradients for checkpoint {missing[0]} of {train}")
        query_stores = dict(queries)
    return [Term(GradientStore.open(r.path), None if queries is None else query_stores[r.name], arguments,
                 r.weight, label=f"{r.path} (adapter {r.adapter})") for r in stores]


_ZERO_BLOCK = "every training gradient is zero"


def _scored(term: Term, label: str, allow_mismatch: bool) -> ScoreResult:
    """``score_store`` of one term; its warnings about blocks whose training gradients are all zero (every A
    block at step 0, where B = 0) become one line for the term instead of one per block."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = score_store(term.train, term.queries, term.arguments, allow_mismatch=allow_mismatch)
    zero = [w for w in caught if _ZERO_BLOCK in str(w.message)]
    for w in caught:
        if w not in zero:
            warnings.warn(w.message, w.category, stacklevel=3)
    count = sum(len(getattr(w.message, "blocks", [None])) for w in zero)
    if zero:
        warnings.warn(f"{label}: {count} blocks have all-zero training gradients and add nothing to its scores "
                      "(expected at step 0, where LoRA's B = 0 leaves the A blocks without gradient); skipped",
                      UserWarning, stacklevel=3)
    return result


def _n_queries(queries: GradientStore | Mapping[str, Tensor]) -> int:
    if isinstance(queries, GradientStore):
        return queries.n_examples
    return int(next(iter(queries.values())).shape[0]) if queries else 0


__all__ = ["RUN_STORES_FILE", "CombinedResult", "RunStore", "Term", "is_run_stores", "read_run_stores",
           "run_terms", "write_run_stores", "debias_terms", "check_summable", "check_weight", "combine",
           "summing_fields", "WEIGHTINGS"]
