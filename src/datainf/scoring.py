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

A method's fitted state (K-FAC / EK-FAC curvature, DataInf's and exact's d x d matrices of small blocks,
:meth:`~datainf.estimators.Estimator.fit`) is fitted once and cached inside the store with the store's
fingerprints, the settings it depends on and the fit's time (:func:`datainf.fitted.fitted_state`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from datainf import atomic
from datainf.distributed import distributed_score
from datainf.errors import DataInfError, parse_json
from datainf.estimators import ScoreArguments, ScoreResult, get_method, method_names
from datainf.estimators.defaults import PLAIN_METHOD
from datainf.estimators.kfac import CURVATURE_FILE, KFACFactors
from datainf.fitted import (  # noqa: F401  (curvature_for, load_/save_curvature: names kept for callers)
    CorruptStateError,
    cache_state,
    curvature_for,
    fitted_state,
    load_curvature,
    save_curvature,
)
from datainf.remedies import apply_remedies, uses_gradient_remedies
from datainf.store import (
    MAX_STORAGE_ERROR,
    GradientStore,
    StoreMeta,
    disk_full,
    projection_label,
    require_free_space,
    storage_loss,
)
from datainf.version import __version__

SCORES_FORMAT = "datainf-scores"
SCORES_VERSION = 1
_SUMS_FORMAT = "datainf-kfac-sums"
#: the name earlier releases gave a corrupt curvature cache's error
CorruptCurvatureError = CorruptStateError
#: fingerprints that must agree between a training store and a query store
PAIRED_FINGERPRINTS = ("model", "adapter", "task")

logger = logging.getLogger(__name__)


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
        if a is not None and b is not None and a != b:  # the query store's first, as the messages name it first
            why = _tokenization_differences(train, queries) if key == "task" else ""
            problems.append(f"{key} (fingerprint {b} in {queries.path}, {a} in {train.path}{why})")
    return problems


def _tokenization_differences(train: GradientStore, queries: GradientStore) -> str:
    """"; its tokenization differs: loss_tokens 'assistant' in the query store, 'all' in the training store"
    (the collate settings of a causal LM task that differ; loss_tokens left out means 'assistant')."""
    def settings(store: GradientStore) -> dict[str, Any]:
        collate = store.metadata.collate or {}
        if not isinstance(collate, Mapping):  # a collate function of the caller's, recorded by its name
            return {"collate": collate}
        return {"loss_tokens": "assistant", **collate} if collate else {}

    mine, theirs = settings(queries), settings(train)
    keys = [k for k in sorted({*mine, *theirs}) if mine.get(k) != theirs.get(k)]
    return ("; its tokenization differs: " + ", ".join(f"{k} {mine.get(k)!r} in the query store, {theirs.get(k)!r} "
                                                       "in the training store" for k in keys)) if keys else ""


def check_pair(train: GradientStore, queries: GradientStore, *, allow_mismatch: bool = False) -> list[str]:
    """Refuse a query store made with another base model, adapter or task than the training store (one
    line naming what differs); with ``allow_mismatch`` (a deliberate cross-checkpoint comparison) return the
    differences instead, for the caller to record. Different blocks are refused either way."""
    train_names, query_names = train.metadata.label_names, queries.metadata.label_names
    if train_names is not None and query_names is not None and train_names != query_names:
        def describe(names: list[str]) -> str:
            return ", ".join(f"{i}={name}" for i, name in enumerate(names))

        raise DataInfError(
            f"query store {queries.path} reads class names as {describe(query_names)} but the training store "
            f"{train.path} as {describe(train_names)}, so their label ids mean different classes; rerun `datainf "
            f"grads` for the queries with --labels-from {train.path}"
        )
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
        fix = ("make the query store with the training store's `datainf grads` options (the same --task and loss "
               "tokens), or pass --allow-mismatch to score a query loss other than the training loss"
               if problems[0].startswith("task") else "make both with the same model, adapter and task, or pass "
               "--allow-mismatch to compare across checkpoints")
        raise DataInfError(f"query store {queries.path} was made with a different {problems[0]} than {train.path}; {fix}")
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
# K-FAC factor sums (from the hooks, per process)
# --------------------------------------------------------------------------------------------------


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
        meta = parse_json((f.metadata() or {}).get("datainf", "{}"), f"{path}'s metadata")
        if not isinstance(meta, dict) or meta.get("format") != _SUMS_FORMAT:
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
    the blocks are split over the ranks (every rank returns the full result). A method with a fitted state
    (K-FAC/EK-FAC curvature, DataInf's and exact's d x d matrices of small blocks) uses the store's cached
    state (fitted once, :func:`datainf.fitted.fitted_state`) unless ``curvature`` is given; its fit time is
    in the result (``curvature_seconds``, ``diagnostics["curvature_fit"]``).
    A query store made with another model, adapter or task is refused unless ``allow_mismatch``
    (the differences then go into ``result.diagnostics["mismatch"]``)."""
    mismatch: list[str] = []
    if isinstance(queries, GradientStore):
        if preconditioned(queries):
            raise DataInfError(f"{queries.path} holds preconditioned training gradients, not query gradients")
        mismatch = check_pair(train, queries, allow_mismatch=allow_mismatch)
    elif queries is not None:
        check_queries(train, queries)
    info = preconditioned(train)
    if info is not None:  # the training side was done once: one streaming pass per call
        result = _score_preconditioned(train, info, queries, arguments)
        if mismatch:
            result.diagnostics["mismatch"] = mismatch
        _save_verified(train, queries)
        return result
    fit_seconds = 0.0
    fit: dict[str, Any] | None = None
    state = None
    remedied = uses_remedies(arguments)
    if remedied:
        check_remedies(train, arguments)
    # a state fitted on the stored gradients under the rule's damping is not these gradients' (or this damping's)
    if curvature is None and not (remedied and not get_method(arguments.method).needs_curvature):
        t0 = time.perf_counter()
        state = fitted_state(train, arguments, save=False)
        now = time.perf_counter() - t0
        if state is not None:
            curvature = state
            fit_seconds = max(state.seconds, now)
            fit = {"fit_seconds": state.seconds, "seconds_now": now, "cached": state.cached,
                   "breakdown": dict(state.meta.get("fit_breakdown") or {})}
    t0 = time.perf_counter()
    qgrads = None if queries is None else query_blocks(queries)
    blocks, qgrads = apply_remedies(train.blocks(), qgrads, arguments, shapes=train.block_shapes)
    inner = arguments.replace(remove_top=0, adam_moments=None) if uses_gradient_remedies(arguments) else arguments
    result = distributed_score(blocks, qgrads, inner, curvature=curvature)
    result.arguments = arguments  # the scores file records every remedy that made them
    result.seconds = time.perf_counter() - t0 + fit_seconds
    result.curvature_seconds += fit_seconds
    if state is not None:  # cached only now that the scores came out right: a refused call leaves the store as it was
        cache_state(train, arguments, state)
    _save_verified(train, queries)
    if mismatch:
        result.diagnostics["mismatch"] = mismatch
    if fit is not None:  # the state's fit: its seconds are in result.seconds, whether fitted now or cached
        result.diagnostics["curvature_fit"] = fit
    return result


def _save_verified(train: GradientStore, queries: Any) -> None:
    """Record the chunk files this call verified (their sha256 matched) in the stores' ``verified/`` stamps, so
    that the next call reads them without hashing them again (any change to a file voids its stamp); only once
    the scores came out right, so a refused call leaves the stores as they were."""
    for store in (train, queries):
        if isinstance(store, GradientStore):
            store.save_verified()


def uses_remedies(arguments: ScoreArguments) -> bool:
    """True when ``arguments`` ask for any remedy (:mod:`datainf.remedies`): top-r removal, Adam
    normalization, a damping multiplier or rule."""
    return (uses_gradient_remedies(arguments) or arguments.damping_scale != 1.0
            or arguments.damping_rule is not None)


def check_remedies(train: GradientStore, arguments: ScoreArguments) -> None:
    """Refuse remedies a store cannot take: Adam normalization of projected gradients (the second moments
    are per parameter entry; project after normalizing)."""
    if arguments.adam_moments is not None and train.projection:
        raise DataInfError(f"store {train.path} holds projected gradients ({projection_label(train.manifest)}); "
                           "Adam normalization divides each parameter entry by its second moment, so it needs "
                           "full gradients: make the store without --project")


# --------------------------------------------------------------------------------------------------
# a preconditioned training store: the query-independent work done once
# --------------------------------------------------------------------------------------------------

def preconditionable() -> tuple[str, ...]:
    """The registered methods whose preconditioner is symmetric and independent of the query
    (``Estimator.symmetric``), so ``v^T P g = v . (P g)``: those a store can be preconditioned for."""
    return tuple(m for m in method_names() if get_method(m).symmetric)


#: the built-in methods of :func:`preconditionable` (kept for callers of earlier releases)
PRECONDITIONABLE = preconditionable()
_NP_STAGING = {"float32": "float32", "float64": "float64", "float16": "float16", "bfloat16": "uint16"}


def preconditioned(store: GradientStore) -> dict[str, Any] | None:
    """What :func:`precondition_store` recorded in a store's manifest (``meta.preconditioned``), or None."""
    return store.metadata.preconditioned


def _stage_encode(t: Tensor, dtype: str, what: str) -> Any:
    if dtype == "float16" and bool((t.abs() > 65504.0).any()):
        raise DataInfError(f"{what}: preconditioned values beyond float16's range; pass dtype='bfloat16' or 'float32'")
    if dtype in ("float16", "bfloat16"):
        stored = t.to(getattr(torch, dtype))
        error, zeroed = storage_loss(t, stored)
        if error > MAX_STORAGE_ERROR:
            raise DataInfError(f"{what}: the preconditioned values underflow in {dtype} ({zeroed:.0%} of the nonzero "
                               f"entries would be stored as 0, relative error {error:.2g}); precondition into "
                               "float32 (--dtype float32)")
        return stored.view(torch.int16).numpy().view("uint16") if dtype == "bfloat16" else stored.numpy()
    return t.to(getattr(torch, dtype)).numpy()


def _stage_decode(a: Any, dtype: str) -> Tensor:
    t = torch.from_numpy(a)
    return t.view(torch.int16).view(torch.bfloat16) if dtype == "bfloat16" else t


#: the file that marks a staging folder as precondition_store's own (what a rerun may remove once its
#: process is dead)
_STAGING_MARKER = "staging.json"
_STAGING_FORMAT = "datainf-precondition-staging"
_STAGED_BLOCK = re.compile(r"^b\d{4}$")
_STAGED_CHUNK = re.compile(r"^\d{5}\.npy$")


def _is_staging(folder: Path) -> bool:
    """Whether ``folder`` is recognisably a staging folder of :func:`precondition_store`: it holds our marker,
    or (written by an older datainf, without it) nothing but ``bNNNN/CCCCC.npy`` files."""
    marker = folder / _STAGING_MARKER
    if marker.is_file():
        try:
            return json.loads(marker.read_text(encoding="utf-8")).get("format") == _STAGING_FORMAT
        except (OSError, ValueError, AttributeError):
            return False
    entries = list(folder.iterdir())
    return all(e.is_dir() and _STAGED_BLOCK.match(e.name) and all(f.is_file() and _STAGED_CHUNK.match(f.name)
                                                                   for f in e.iterdir()) for e in entries)


def _clear_stale_staging(out: Path) -> None:
    """Remove the staging folders an interrupted precondition into ``out`` left beside it (``.OUT.staging-PID``
    whose process is dead on this host, recognisably ours); refuse while another live process stages there."""
    import glob
    import socket

    from datainf.store.locking import pid_alive

    for folder in sorted(out.parent.glob(f".{glob.escape(out.name)}.staging-*")):
        pid = folder.name.rsplit("-", 1)[-1]
        if not folder.is_dir() or not pid.isdigit() or not _is_staging(folder):
            continue  # not ours: left alone
        marker = folder / _STAGING_MARKER
        host = socket.gethostname()
        if marker.is_file():
            host = json.loads(marker.read_text(encoding="utf-8")).get("host", host)
        if host != socket.gethostname() or (int(pid) != os.getpid() and pid_alive(int(pid))):
            raise DataInfError(f"{out} is being preconditioned by process {pid} on host {host} (its rows are staged "
                               f"in {folder}); wait for it to finish, or stop it and rerun this command")
        logger.warning("removing %s, left by an interrupted `datainf store precondition` (process %s)", folder, pid)
        shutil.rmtree(folder)


def _resumable(out: Path, train: GradientStore, arguments: ScoreArguments, dtype: str) -> dict[str, Any] | None:
    """The manifest of the unfinished store at ``out`` when it is this command's own (an interrupted run of
    the same preconditioning of ``train``: it is resumed); None when ``out`` is absent or empty; refused
    otherwise, with the command that works."""
    from datainf.store.manifest import read_manifest

    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    method = arguments.method
    again = f"`datainf store precondition --method {method} {train.path} NEW_FOLDER`"
    try:
        old = read_manifest(out) if out.is_dir() and (out / "manifest.json").is_file() else None
    except DataInfError:
        old = None
    info = StoreMeta.of(old, str(out)).preconditioned if isinstance(old, dict) else None
    if old is None or not isinstance(info, dict):
        raise DataInfError(f"{out} is not empty and is not a preconditioned store; choose a new folder: {again}")
    if old.get("complete"):
        raise DataInfError(f"{out} is not empty: it holds a finished store preconditioned for {info.get('method')} from "
                           f"{info.get('source')}; score it with --method {info.get('method')}, or write a new one: "
                           f"{again}")
    settings = ("blocks", "n_examples", "chunk_size", "projection")
    ours = (info.get("method") == method and dict(info.get("options") or {}) == dict(arguments.options)
            and info.get("source_fingerprints") == dict(train.fingerprints) and old.get("dtype") == dtype
            and all(old.get(key) == train.manifest.get(key) for key in settings))
    if not ours:
        finish = (f"`datainf store precondition --method {info.get('method')} --dtype {old.get('dtype')} "
                  f"{info.get('source')} {out}`")
        raise DataInfError(f"{out} holds an unfinished store preconditioned for {info.get('method')} "
                           f"({old.get('dtype')}) from {info.get('source')}, not what this command writes; finish "
                           f"it with {finish}, or choose a new folder: {again}")
    return old


def precondition_store(
    train: GradientStore,
    out: str | os.PathLike,
    arguments: ScoreArguments,
    *,
    dtype: str | None = None,
    progress: bool = False,
) -> GradientStore:
    """Precompute the query-independent half of a method's scores once: a store at ``out`` holding, per block
    l and training example k, ``lambda_l P_l g_{k,l}`` (``P_l`` the method's symmetric approximation of
    ``(H_l + lambda_l I)^{-1}``; identity: ``g_k`` itself). Every later query is then ONE streaming
    matrix-vector pass: ``score[k, j] = -(1/lambda_l) sum_l v_{j,l} . (lambda_l P_l g_{k,l})``, what
    :func:`score_store` does with such a store (only with the method it was made for, and its damping).

    The factor lambda keeps the stored values on the gradients' scale (``lambda P`` has eigenvalues in
    (0, 1]), so a float16 store stays in range. Methods: identity, exact, kfac, ekfac, datainf (whose
    ``(1/n) sum_i (g_i g_i^T + lambda I)^{-1}`` is symmetric too; through its d x d matrix when d <= n).
    Work: one block at a time (its state: a Cholesky factor, the Kronecker eigenbases, or DataInf's d x d
    matrix), each block's rows staged beside ``out`` (``.OUT.staging-PID``) and then written chunk by chunk
    with the store's usual checks. The new store keeps the source's fingerprints, projection, records and
    meta, and records ``meta.preconditioned`` (method, damping and scale per block, source, seconds).

    Interrupted (killed, disk full), the same call again resumes: it removes the staging folders of dead
    runs into ``out``, stages again, and writes only the chunks ``out`` lacks.
    """
    from datainf.estimators import resolve_damping

    t_start = time.perf_counter()
    method = get_method(arguments.method)
    if not method.symmetric:
        raise DataInfError(f"method '{arguments.method}' cannot be precomputed into a store; choose one of "
                           f"{', '.join(preconditionable())}")
    if arguments.normalize or arguments.mean_query:
        raise DataInfError("precondition_store takes neither normalize nor mean_query (they apply at query time)")
    if uses_remedies(arguments):
        raise DataInfError("precondition_store takes no remedy (remove_top, adam_moments, damping_scale, "
                           "damping_rule): score the store itself with them")
    if preconditioned(train):
        raise DataInfError(f"store {train.path} is already preconditioned; precondition its source store")
    out = Path(out)
    dtype = dtype or train.storage_dtype
    if dtype not in _NP_STAGING:
        raise DataInfError(f"dtype must be one of {', '.join(_NP_STAGING)}, got {dtype!r}")
    resumed = _resumable(out, train, arguments, dtype)
    _clear_stale_staging(out)
    missing = [c for c in range(train.num_chunks) if resumed is None or not (out / "chunks" / f"{c:05d}").is_dir()]
    rows_left = sum(len(train.chunk_rows(c)) for c in missing)
    need = (train.n_examples + rows_left) * train.bytes_per_example(dtype)
    require_free_space(out.parent, need, f"preconditioning {train.path} into {out} (the rows staged beside it, "
                       "then the new store)", "precondition into float16/bfloat16 (--dtype)")
    state = fitted_state(train, arguments, save=False)
    fit_seconds = 0.0 if state is None else state.seconds
    names = train.block_names
    source = train.blocks()
    shared = method.prepare([(n, source[n]) for n in names], state, arguments.chunk_size)
    lams = resolve_damping(arguments.damping, names)
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"  # beside the store, removed at the end
    damping: dict[str, float] = {}
    scale: dict[str, float] = {}
    from tqdm.auto import tqdm

    bar = tqdm(total=len(names), desc="preconditioning blocks", unit="block", disable=not progress)
    try:
        staging.mkdir(parents=True)
        import socket

        (staging / _STAGING_MARKER).write_text(json.dumps({"format": _STAGING_FORMAT, "pid": os.getpid(),
                                                           "host": socket.gethostname(), "out": str(out)}))
        _stage_blocks(method, arguments, source, names, lams, shared, train, staging, dtype, damping, scale, bar)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if disk_full(e):
            raise DataInfError(f"the disk is full: staging the preconditioned rows of {train.path} in {staging} (then "
                               f"writing {out}) needs {_size(need)}; free some space, then rerun the same "
                               "command") from None
        raise
    bar.close()
    if resumed is not None:
        recorded = (StoreMeta.of(resumed, str(out)).preconditioned or {}).get("damping") or {}
        if any(not math.isclose(recorded.get(n, math.nan), damping[n], rel_tol=1e-12) for n in names):
            shutil.rmtree(staging, ignore_errors=True)
            raise DataInfError(f"{out} holds an unfinished store preconditioned with another damping "
                               f"({recorded}); rerun with the --damping it was started with, or choose a new "
                               f"folder: `datainf store precondition --method {arguments.method} {train.path} "
                               "NEW_FOLDER`")
    info = {"method": arguments.method, "options": dict(arguments.options), "damping": damping, "scale": scale,
            "source": str(train.path), "source_fingerprints": dict(train.fingerprints),
            "curvature_seconds": fit_seconds, "seconds": None}
    meta = train.metadata.replace(preconditioned=info)
    try:
        store = GradientStore.create(out, blocks=train.block_shapes, n_examples=train.n_examples,
                                     fingerprints=train.fingerprints, chunk_size=train.chunk_size, dtype=dtype,
                                     meta=meta.to_dict(), projection=train.projection)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        for c in store.missing_chunks():
            store.write_chunk(c, {name: _stage_decode(np.load(staging / f"b{j:04d}" / f"{c:05d}.npy"), dtype)
                                  for j, name in enumerate(names)})
        records = train.records()
        if records is not None:
            store.write_records(records)
        info["seconds"] = time.perf_counter() - t_start
        store.manifest = {**store.manifest, "meta": meta.replace(preconditioned=info).to_dict()}
        store.finalize()
        if state is not None:
            cache_state(train, arguments, state)
    except OSError as e:
        if not disk_full(e):
            raise
        raise DataInfError(f"the disk is full: writing {out} ({e.strerror}); free some space, then rerun the same "
                           "command: it resumes") from None
    finally:
        store.close()
        shutil.rmtree(staging, ignore_errors=True)
    return GradientStore.open(out)


def _size(n: int) -> str:
    """Bytes for a message."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} bytes"


def _stage_blocks(method: Any, arguments: ScoreArguments, source: Mapping[str, Any], names: list[str],
                  lams: list[float | None], shared: Any, train: GradientStore, staging: Path, dtype: str,
                  damping: dict[str, float], scale: dict[str, float], bar: Any) -> None:
    """Block after block: build the method's estimator (its state only for this block), precondition the
    block's rows chunk by chunk, and stage them as ``staging/bNNNN/CCCCC.npy``."""
    from datainf.estimators import BlockRows, block_scale, compute_dtype, scaled

    for j, name in enumerate(names):
        g = source[name]
        cd = compute_dtype(g, arguments.torch_dtype)
        # gradients outside cd's safe range are read scaled by a power of two k (exact): the method's
        # lambda' P' g' is then k times lambda P g, and its damping k^2 times lambda (see scale_power)
        k = block_scale(g, cd, arguments.chunk_size)
        b = BlockRows(name, g, cd, torch.device(arguments.device or "cpu"), arguments.chunk_size, scale=k)
        sq = b.sq_norms()
        lam = lams[j] * k * k if lams[j] is not None else method.default_damping(b, sq, shared)
        if lam == 0.0:  # an all-zero block: its preconditioned rows are zero too
            lam = 1.0
        estimator = method(b, lam, sq, arguments.method_options(), shared)
        factor = 1.0 if arguments.method == PLAIN_METHOD else float(lam)
        damping[name] = float(lam) / (k * k)
        scale[name] = 1.0 if arguments.method == PLAIN_METHOD else 1.0 / damping[name]
        folder = staging / f"b{j:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        out_dtype = torch.float32 if cd != torch.float64 else torch.float64
        for c in range(train.num_chunks):
            rows = train.chunk_rows(c)
            block_rows = scaled(b.g[rows.start : rows.stop], k, cd, b.device)
            pre = estimator.precondition_rows(block_rows) * factor
            if k != 1.0:
                pre = pre.double() / k
            np.save(folder / f"{c:05d}.npy", _stage_encode(pre.to("cpu", out_dtype), dtype,
                                                           f"preconditioning {train.path}: block '{name}', chunk {c}"),
                    allow_pickle=False)
        del estimator
        bar.update(1)


def check_preconditioned(train: GradientStore, arguments: ScoreArguments) -> None:
    """Refuse ``arguments`` a preconditioned ``train`` store cannot be scored with (another method, other
    options or damping, normalized scores), before any query gradient is computed; nothing for a store that
    is not preconditioned."""
    info = preconditioned(train)
    if info is None:
        return
    made = info["method"]
    if uses_remedies(arguments):
        raise DataInfError(f"store {train.path} holds preconditioned gradients; remove_top, the Adam normalization "
                           f"and the damping knobs apply to the original ones: score its source store "
                           f"{info.get('source')}")
    if arguments.method != made:
        raise DataInfError(f"store {train.path} holds gradients preconditioned for '{made}'; score it with method "
                           f"'{made}', or score its source store {info.get('source')} with '{arguments.method}'")
    if arguments.normalize:
        raise DataInfError(f"normalized scores need the original gradients too; score the source store "
                           f"{info.get('source')}")
    if dict(arguments.options) != dict(info.get("options") or {}):
        raise DataInfError(f"store {train.path} was preconditioned with options {info.get('options')}, not "
                           f"{dict(arguments.options)}")
    if arguments.damping is not None:
        wanted = resolve_damping_for(arguments.damping, train.block_names)
        if any(not math.isclose(wanted[n], info["damping"][n], rel_tol=1e-9) for n in train.block_names):
            raise DataInfError(f"store {train.path} was preconditioned with the damping it records "
                               "(meta.preconditioned.damping); score it without --damping, or precondition again")


def _score_preconditioned(train: GradientStore, info: Mapping[str, Any],
                          queries: GradientStore | Mapping[str, Tensor] | None,
                          arguments: ScoreArguments) -> ScoreResult:
    """Scores against a store of :func:`precondition_store`: one streaming pass, ``-scale_l G'_l V_l^T``."""
    from datainf.estimators import BlockRows, block_scale, compute_dtype, scaled

    made = info["method"]
    if queries is None:
        raise DataInfError(f"store {train.path} holds preconditioned gradients: self-influence needs the original "
                           f"ones; score its source store {info.get('source')}")
    check_preconditioned(train, arguments)
    damping = info["damping"]
    t0 = time.perf_counter()
    qgrads = query_blocks(queries)
    if set(qgrads) != set(train.block_names):
        raise DataInfError(f"the queries name other blocks than store {train.path}")
    scores = None
    for name in train.block_names:
        g = train.block(name)
        v = qgrads[name].reshape(qgrads[name].shape[0], -1)
        if arguments.mean_query:
            v = v.mean(dim=0, keepdim=True)
        cd = compute_dtype(g, arguments.torch_dtype)
        dev = torch.device(arguments.device or "cpu")
        # rows and queries outside cd's safe range are scaled by powers of two (exact), undone in float64
        k, q = block_scale(g, cd, arguments.chunk_size), block_scale(v, cd, arguments.chunk_size)
        b = BlockRows(name, g, cd, dev, arguments.chunk_size, scale=k)
        factor = -float(info["scale"][name]) / (k * q)
        part = b.dot(scaled(v, q, cd, dev))
        part = part * factor if k == q == 1.0 else (part.double() * factor).to(cd)
        scores = part if scores is None else scores + part
    assert scores is not None
    return ScoreResult(scores=scores, arguments=arguments, kind="influence", damping=dict(damping),
                       diagnostics={"preconditioned_store": {"method": made, "source": info.get("source")}},
                       seconds=time.perf_counter() - t0)


def resolve_damping_for(damping: Any, names: list[str]) -> dict[str, float]:
    """A ScoreArguments damping as one value per block name."""
    from datainf.estimators import resolve_damping

    return dict(zip(names, resolve_damping(damping, names)))


# --------------------------------------------------------------------------------------------------
# the scores file
# --------------------------------------------------------------------------------------------------


@dataclass
class ScoresFile:
    """What a scores file holds: ``scores`` (entry -> tensor), ``settings`` (entry -> the result's
    settings: kind, arguments, damping, seconds, ...), and ``meta`` (stores, data fingerprint, extra).
    ``provenance``: for an entry that is a weighted sum of terms (:func:`datainf.combine.combine`), each
    term's stores (path and fingerprints), weight and method; other entries, and older files, have none."""

    scores: dict[str, Tensor]
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    provenance: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def n_train(self) -> int:
        return int(next(iter(self.scores.values())).shape[0])


def _store_summary(store: GradientStore | None) -> dict[str, Any] | None:
    if store is None:
        return None
    meta = store.metadata
    return {"path": str(store.path), "n_examples": store.n_examples, "fingerprints": dict(store.fingerprints),
            "blocks": len(store.block_names), "task": meta.task, "labels": meta.labels,
            "dropped_rows": meta.dropped_rows}


def save_scores(
    path: str | os.PathLike,
    results: Mapping[str, ScoreResult],
    *,
    train_store: GradientStore | None = None,
    query_store: GradientStore | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``results`` (entry name -> ScoreResult) as one scores file, atomically. ``extra`` is kept in
    the metadata (JSON-able: e.g. the data file's fingerprint, the task, the query texts). A combined result
    (:func:`datainf.combine.combine`) keeps its terms' provenance in its entry's settings (``terms``)."""
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
            meta = parse_json((f.metadata() or {}).get("datainf", "{}"), f"{path}'s datainf metadata",
                              "make the file with `datainf score`")
            scores = {key: f.get_tensor(key) for key in f.keys()}
    except DataInfError:
        raise
    except (SafetensorError, OSError, ValueError, UnicodeDecodeError, EOFError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise DataInfError(f"{path} is not a scores file ({reason}); make it with `datainf score`") from None
    if not isinstance(meta, dict) or meta.get("format") != SCORES_FORMAT:
        raise DataInfError(f"{path} is a safetensors file but not a datainf scores file; make it with `datainf score`")
    entries = meta.pop("entries", {})
    entries = entries if isinstance(entries, dict) else {}
    _check_scores(path, scores)
    provenance = {name: list(e["terms"]) for name, e in entries.items()
                  if isinstance(e, dict) and isinstance(e.get("terms"), list)}
    return ScoresFile(scores=scores, settings=entries, meta=meta, path=path, provenance=provenance)


def _check_scores(path: Path, scores: Mapping[str, Tensor]) -> None:
    """A scores file holds at least one entry, each (n_train,) or (n_train, n_query) floats, one n_train."""
    if not scores:
        raise DataInfError(f"{path} holds no scores; make it with `datainf score`")
    rows = set()
    for name, t in scores.items():
        if t.ndim not in (1, 2) or not t.is_floating_point() or t.shape[0] == 0:
            raise DataInfError(f"{path}: entry '{name}' is {t.dtype} {tuple(t.shape)}, not (n_train[, n_query]) "
                               "scores; make the file with `datainf score`")
        rows.add(int(t.shape[0]))
    if len(rows) > 1:
        raise DataInfError(f"{path}: entries have different numbers of training rows {sorted(rows)}")


def _load_npz(path: Path) -> ScoresFile:
    import numpy as np

    warnings.warn(f"{path}: .npz scores are deprecated; rerun `datainf score` to write .safetensors",
                  DeprecationWarning, stacklevel=3)
    import zipfile

    try:
        f = np.load(path, allow_pickle=False)
        if not hasattr(f, "files"):
            raise ValueError("a single array, not an archive of scores")
        with f:
            scores = {k: torch.from_numpy(np.array(f[k])) for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise DataInfError(f"{path} is not a scores file ({reason}); make it with `datainf score`") from None
    side = path.with_suffix(".json")
    try:
        meta = parse_json(side.read_bytes(), str(side), "rerun `datainf score`") if side.is_file() else {}
        settings = {k: dict(v) for k, v in meta.pop("methods", {}).items()}
    except DataInfError:
        raise
    except (OSError, ValueError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise DataInfError(f"{side} (the settings beside {path.name}) is unreadable ({e}); rerun `datainf score`") from None
    _check_scores(path, scores)
    return ScoresFile(scores=scores, settings=settings, meta=meta, path=path)


__all__ = [
    "CURVATURE_FILE",
    "SCORES_FORMAT",
    "ScoresFile",
    "check_pair",
    "check_preconditioned",
    "check_queries",
    "curvature_for",
    "load_curvature",
    "load_factor_sums",
    "load_scores",
    "precondition_store",
    "preconditioned",
    "query_blocks",
    "save_curvature",
    "save_factor_sums",
    "save_scores",
    "score_store",
    "store_mismatch",
]
