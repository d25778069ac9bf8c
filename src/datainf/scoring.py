"""The one scoring path: a training store (+ queries) and :class:`ScoreArguments` -> :class:`ScoreResult`,
and the one on-disk scores format.

``datainf score``, the Attributor and every experiment go through :func:`score_store`; their results are
written by :func:`save_scores` and read back by :func:`load_scores` (``datainf report``, ``datainf top``).

A scores file is one safetensors file: one tensor per entry (usually a method name; ``(n_train, n_query)``
or ``(n_train,)`` float32 or float64), and in its metadata a JSON document with the format version, every
entry's :meth:`ScoreResult.settings` (method, damping per block, options, seconds), the training store's
and the query store's fingerprints and sizes, and whatever the writer adds (e.g. a fingerprint of the data
file, so a report refuses texts that do not belong to the scores). Old ``.npz`` scores are still read, with
a deprecation message.

K-FAC / EK-FAC curvature of a store is fitted once and cached as ``<store>/kfac.safetensors`` with the
store's fingerprints and the fit's time (:func:`curvature_for`).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from datainf import atomic
from datainf.distributed import distributed_score, is_main_process
from datainf.errors import DataInfError
from datainf.estimators import ScoreArguments, ScoreResult, get_method
from datainf.estimators.kfac import BlockCurvature, KFACCurvature, KFACFactors, curvature_from_gradients
from datainf.store import GradientStore, projection_label
from datainf.version import __version__

SCORES_FORMAT = "datainf-scores"
SCORES_VERSION = 1
CURVATURE_FILE = "kfac.safetensors"
_CURVATURE_FORMAT = "datainf-kfac"
_SUMS_FORMAT = "datainf-kfac-sums"
#: fingerprints that must agree between a training store and a query store
PAIRED_FINGERPRINTS = ("model", "adapter", "task")


# --------------------------------------------------------------------------------------------------
# stores that belong together
# --------------------------------------------------------------------------------------------------


def store_mismatch(train: GradientStore, queries: GradientStore) -> list[str]:
    """What differs between a training store and a query store that should be scored together: block names
    or shapes, and the model / adapter / task fingerprints. An empty list when they belong together."""
    problems = []
    if _projection_key(train.projection) != _projection_key(queries.projection):
        problems.append(f"projection ({projection_label(train.manifest)} vs {projection_label(queries.manifest)})")
    if train.block_names != queries.block_names:
        problems.append(f"blocks ({len(train.block_names)} vs {len(queries.block_names)} blocks, or other names)")
    else:
        for name in train.block_names:
            if tuple(train.block_shapes[name]) != tuple(queries.block_shapes[name]):
                problems.append(f"the shape of block '{name}'")
                break
    for key in PAIRED_FINGERPRINTS:
        a, b = train.fingerprints.get(key), queries.fingerprints.get(key)
        if a is not None and b is not None and a != b:
            problems.append(f"{key} (fingerprint {a} vs {b})")
    return problems


def check_pair(train: GradientStore, queries: GradientStore, *, allow_mismatch: bool = False) -> list[str]:
    """Refuse a query store made with another base model, adapter or task than the training store (one
    line naming what differs); with ``allow_mismatch`` (a deliberate cross-checkpoint comparison) return the
    differences instead, for the caller to record. Different blocks are refused either way."""
    problems = store_mismatch(train, queries)
    if not problems:
        return []
    if problems[0].startswith("projection"):  # scores across two projections mean nothing: always refused
        raise DataInfError(f"query store {queries.path} was made with a different {problems[0]} than {train.path}; "
                           "compute both with the same --project K and --project-seed")
    if problems[0].startswith(("blocks", "the shape")):
        raise DataInfError(f"query store {queries.path} holds other blocks than {train.path} ({problems[0]}); "
                           "make both with one model and adapter")
    if not allow_mismatch:
        raise DataInfError(
            f"query store {queries.path} was made with a different {problems[0]} than {train.path}; make both "
            "with the same model, adapter and task, or pass --allow-mismatch to compare across checkpoints"
        )
    return problems


def _projection_key(p: Mapping[str, Any] | None) -> tuple | None:
    """What must agree between two projections: kind, dim, seed (block shapes are compared on their own)."""
    return None if not p else (p.get("kind"), p.get("dim"), p.get("seed"))


def check_queries(train: GradientStore, queries: Mapping[str, Tensor]) -> None:
    """Refuse in-memory query gradients made with another projection than the training store: queries that
    say how they were projected (``Attributor.gradients`` returns a ``GradientDict``) must say the same, and
    unprojected queries (their blocks have the full shapes) are refused against a projected store."""
    mine = train.projection
    if hasattr(queries, "projection_dict"):
        theirs = queries.projection_dict
        if _projection_key(theirs) != _projection_key(mine):
            raise DataInfError(
                f"the queries were computed with projection {projection_label({'projection': theirs})} but store "
                f"{train.path} with {projection_label(train.manifest)}; compute them with the same projection "
                "(Attributor(..., projection=...) or datainf grads --project K --project-seed S)")
    if mine:
        full = {name: math.prod(b["full_shape"]) for name, b in mine.get("blocks", {}).items()}
        for name, v in queries.items():
            d = math.prod(tuple(v.shape)[1:])
            if name in train.block_shapes and d != math.prod(train.block_shapes[name]) and d == full.get(name):
                raise DataInfError(
                    f"query block '{name}' holds full (unprojected) gradients but store {train.path} is projected "
                    f"({projection_label(train.manifest)}); compute the queries with the same projection")


def query_blocks(queries: GradientStore | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Query gradients in memory, block -> (n_query, d): a store is read whole (queries are few)."""
    if isinstance(queries, GradientStore):
        return {name: queries.block(name)[0 : queries.n_examples] for name in queries.block_names}
    return dict(queries)


# --------------------------------------------------------------------------------------------------
# K-FAC curvature, cached next to the store
# --------------------------------------------------------------------------------------------------


def save_curvature(curvature: KFACCurvature, path: str | os.PathLike, *, fingerprints: Mapping[str, str],
                   fit_seconds: float = 0.0) -> Path:
    """Write the eigendecompositions and EK-FAC eigenvalues as safetensors (atomically), with the
    fingerprints of the store they belong to and the time the fit took."""
    tensors: dict[str, Tensor] = {}
    for name, b in curvature.blocks.items():
        for key in ("q_a", "a", "q_s", "s", "corrected"):
            t = getattr(b, key)
            if t is not None:
                tensors[f"{name}::{key}"] = t.contiguous()
    meta = {"format": _CURVATURE_FORMAT, "version": 1, "blocks": list(curvature.blocks),
            "n_examples": curvature.n_examples, "fingerprints": dict(fingerprints), "fit_seconds": fit_seconds}
    curvature.fingerprints = dict(fingerprints)
    return atomic.save_safetensors(path, tensors, {"datainf": json.dumps(meta)})


def load_curvature(path: str | os.PathLike, *, fingerprints: Mapping[str, str] | None = None
                   ) -> tuple[KFACCurvature, float]:
    """Read a file of :func:`save_curvature`: (curvature, seconds its fit took). With ``fingerprints``, a file
    made for another model, adapter, task or dataset is refused."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DataInfError(f"no K-FAC curvature at {path}: fit it with curvature_for(store)")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("datainf", "{}"))
        if meta.get("format") != _CURVATURE_FORMAT:
            raise DataInfError(f"{path} is not a datainf K-FAC curvature file")
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    saved = meta.get("fingerprints", {})
    for key, value in (fingerprints or {}).items():
        if saved.get(key) != value:
            raise DataInfError(f"{path} was made with a different {key} (fingerprint {saved.get(key)} != {value}); "
                               "delete it to refit the curvature for this store")
    blocks = {name: BlockCurvature(*(tensors[f"{name}::{k}"] for k in ("q_a", "a", "q_s", "s")),
                                   corrected=tensors.get(f"{name}::corrected")) for name in meta["blocks"]}
    return KFACCurvature(blocks, int(meta["n_examples"]), saved), float(meta.get("fit_seconds", 0.0))


def curvature_for(store: GradientStore, *, chunk_size: int = 2048) -> tuple[KFACCurvature, float]:
    """EK-FAC / K-FAC curvature of a store's blocks (eigenbasis from the per-example gradients' Kronecker
    factors, eigenvalues corrected by one pass): loaded from ``<store>/kfac.safetensors`` when its
    fingerprints match the store, else fitted and saved there. Returns (curvature, seconds of the fit)."""
    path = Path(store.path) / CURVATURE_FILE
    if path.exists():
        try:
            return load_curvature(path, fingerprints=store.fingerprints)
        except DataInfError:
            pass  # made for another store content: refit below (the file is ours to replace)
    t0 = time.perf_counter()
    curvature = curvature_from_gradients(store.blocks(), shapes=store.block_shapes, chunk_size=chunk_size)
    seconds = time.perf_counter() - t0
    if is_main_process():
        save_curvature(curvature, path, fingerprints=store.fingerprints, fit_seconds=seconds)
    return curvature, seconds


def save_factor_sums(factors: KFACFactors, path: str | os.PathLike) -> Path:
    """Write raw K-FAC factor sums and counts (safetensors, atomically), e.g. one file per process."""
    tensors = {f"{name}::{key}": t.contiguous() for name in factors.a_sum
               for key, t in (("a_sum", factors.a_sum[name]), ("s_sum", factors.s_sum[name]))}
    meta = {"format": _SUMS_FORMAT, "n_examples": factors.n_examples, "tokens": factors.tokens}
    return atomic.save_safetensors(path, tensors, {"datainf": json.dumps(meta)})


def load_factor_sums(path: str | os.PathLike) -> KFACFactors:
    """Read a file of :func:`save_factor_sums` (to be merged with others, ``KFACFactors.merge``)."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise DataInfError(f"no K-FAC factor sums at {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("datainf", "{}"))
        if meta.get("format") != _SUMS_FORMAT:
            raise DataInfError(f"{path} is not a datainf K-FAC factor-sums file (written by save_factor_sums)")
        out = KFACFactors()
        for name, count in meta["tokens"].items():
            out.add_sums(name, f.get_tensor(f"{name}::a_sum"), f.get_tensor(f"{name}::s_sum"), float(count))
    out.n_examples = int(meta["n_examples"])
    return out


# --------------------------------------------------------------------------------------------------
# scoring a store
# --------------------------------------------------------------------------------------------------


def score_store(
    train: GradientStore,
    queries: GradientStore | Mapping[str, Tensor] | None,
    arguments: ScoreArguments,
    *,
    curvature: Any = None,
    allow_mismatch: bool = False,
) -> ScoreResult:
    """Score a training store against queries (a query store or in-memory gradients; None for
    self-influence) under ``arguments``. Blocks are read memory-mapped, chunk by chunk; under ``torchrun``
    the blocks are split over the ranks (every rank returns the full result). K-FAC methods use the
    store's cached curvature (fitted once) unless ``curvature`` is given; its fit time is in the result.
    A query store made with another model, adapter or task is refused unless ``allow_mismatch``
    (the differences then go into ``result.diagnostics["mismatch"]``)."""
    mismatch: list[str] = []
    if isinstance(queries, GradientStore):
        mismatch = check_pair(train, queries, allow_mismatch=allow_mismatch)
    elif queries is not None:
        check_queries(train, queries)
    fit_seconds = 0.0
    if get_method(arguments.method).needs_curvature and curvature is None:
        t0 = time.perf_counter()
        curvature, fitted = curvature_for(train, chunk_size=arguments.chunk_size)
        fit_seconds = max(fitted, time.perf_counter() - t0)
    t0 = time.perf_counter()
    qgrads = None if queries is None else query_blocks(queries)
    result = distributed_score(train.blocks(), qgrads, arguments, curvature=curvature)
    result.seconds = time.perf_counter() - t0 + fit_seconds
    result.curvature_seconds += fit_seconds
    if mismatch:
        result.diagnostics["mismatch"] = mismatch
    return result


# --------------------------------------------------------------------------------------------------
# the scores file
# --------------------------------------------------------------------------------------------------


@dataclass
class ScoresFile:
    """What a scores file holds: ``scores`` (entry -> tensor), ``settings`` (entry -> the result's
    settings: kind, arguments, damping, seconds, ...), and ``meta`` (stores, data fingerprint, extra)."""

    scores: dict[str, Tensor]
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def n_train(self) -> int:
        return int(next(iter(self.scores.values())).shape[0])


def _store_summary(store: GradientStore | None) -> dict[str, Any] | None:
    if store is None:
        return None
    return {"path": str(store.path), "n_examples": store.n_examples, "fingerprints": dict(store.fingerprints),
            "blocks": len(store.block_names), "task": store.manifest.get("meta", {}).get("task")}


def save_scores(
    path: str | os.PathLike,
    results: Mapping[str, ScoreResult],
    *,
    train_store: GradientStore | None = None,
    query_store: GradientStore | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``results`` (entry name -> ScoreResult) as one scores file, atomically. ``extra`` is kept in
    the metadata (JSON-able: e.g. the data file's fingerprint, the task, the query texts)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise DataInfError(f"scores are written as .safetensors files; name the output {path.with_suffix('.safetensors')}")
    if not results:
        raise DataInfError("save_scores: no results to save")
    meta = {
        "format": SCORES_FORMAT,
        "version": SCORES_VERSION,
        "library_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "entries": {name: r.settings() for name, r in results.items()},
        "train_store": _store_summary(train_store),
        "query_store": _store_summary(query_store),
        **dict(extra or {}),
    }
    tensors = {name: r.scores.detach().to("cpu").contiguous() for name, r in results.items()}
    return atomic.save_safetensors(path, tensors, {"datainf": json.dumps(meta, default=str)})


def load_scores(path: str | os.PathLike) -> ScoresFile:
    """Read a scores file of :func:`save_scores` (or, deprecated, an ``.npz`` of ``datainf score`` before
    0.2 with its ``.json`` beside it)."""
    path = Path(path)
    if not path.is_file():
        raise DataInfError(f"scores file {path} does not exist; make it with `datainf score`")
    if path.suffix == ".npz":
        return _load_npz(path)
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("datainf", "{}"))
            scores = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise DataInfError(f"{path} is not a scores file ({str(e).splitlines()[0]}); make it with `datainf score`") from None
    if meta.get("format") != SCORES_FORMAT:
        raise DataInfError(f"{path} is a safetensors file but not a datainf scores file; make it with `datainf score`")
    entries = meta.pop("entries", {})
    return ScoresFile(scores=scores, settings=entries, meta=meta, path=path)


def _load_npz(path: Path) -> ScoresFile:
    import numpy as np

    warnings.warn(f"{path}: .npz scores are deprecated; rerun `datainf score` to write .safetensors",
                  DeprecationWarning, stacklevel=3)
    try:
        with np.load(path, allow_pickle=False) as f:
            scores = {k: torch.from_numpy(np.array(f[k])) for k in f.files}
    except (OSError, ValueError) as e:
        raise DataInfError(f"{path} is not a scores file ({str(e).splitlines()[0]}); make it with `datainf score`") from None
    side = path.with_suffix(".json")
    meta = json.loads(side.read_text()) if side.is_file() else {}
    settings = {k: dict(v) for k, v in meta.pop("methods", {}).items()}
    return ScoresFile(scores=scores, settings=settings, meta=meta, path=path)


__all__ = [
    "CURVATURE_FILE",
    "SCORES_FORMAT",
    "ScoresFile",
    "check_pair",
    "check_queries",
    "curvature_for",
    "load_curvature",
    "load_factor_sums",
    "load_scores",
    "query_blocks",
    "save_curvature",
    "save_factor_sums",
    "save_scores",
    "score_store",
    "store_mismatch",
]
