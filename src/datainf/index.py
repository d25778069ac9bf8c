"""A top-k index over a gradient store: the most helpful and harmful training examples of a query without a
pass over the store (``datainf index build`` / ``datainf index search``).

Against a store, a method's score is a sum over blocks of inner products (see :func:`datainf.scoring.
precondition_store`): ``score[k, j] = -sum_l scale_l v_{j,l} . g'_{k,l}``, with ``g'`` the stored rows (the
gradients themselves for identity, ``lambda_l P_l g_{k,l}`` in a store preconditioned for the method) and
``scale_l`` 1 for identity, ``1 / lambda_l`` otherwise. So every training example is ONE vector, its blocks
concatenated in the store's order and multiplied by ``-scale_l``: ``x_k = (-scale_l g'_{k,l})_l``, and the
score is the inner product ``x_k . v_j`` with the query's concatenated gradient. With ``normalize`` (identity
only: cosine similarity, TrackStar's normalization) both vectors are divided by their norms.

Scores keep the library's sign (positive = harmful, negative = helpful; :mod:`datainf.ranking`): the harmful
list of a query is the largest inner products with ``v``, the helpful list the largest with ``-v``; a list
holds only the examples of its sign, as ``datainf top`` writes it.

The index is faiss's (an optional dependency: ``pip install 'datainf[index]'``): ``flat`` (``IndexFlatIP``,
exact top-k) or ``ivf`` (``IndexIVFFlat`` with the inner-product metric, its coarse quantizer trained on the
rows; ``nprobe`` lists are searched, approximate). An index folder holds ``index.faiss`` and ``index.json``:
the store it was built from (path, fingerprints, and a digest of its content: the sha256 of every chunk's
files, as the chunks record them), method, normalization, damping and scale per block, and the sha256 of
``index.faiss``. An index whose store changed since is refused with the command that rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from datainf import atomic
from datainf.errors import DataInfError, parse_json
from datainf.estimators.defaults import PLAIN_METHOD
from datainf.ranking import KINDS, hit_rows, query_name
from datainf.scoring import check_pair, preconditioned, query_blocks
from datainf.store import CHUNK_MANIFEST, GradientStore, file_digest
from datainf.version import __version__

INDEX_FORMAT = "datainf-index"
INDEX_VERSION = 1
INDEX_FILE = "index.faiss"
MANIFEST_FILE = "index.json"
#: the files an index folder holds (all written by :func:`save_index`)
INDEX_FILES = (INDEX_FILE, MANIFEST_FILE)
INDEX_KINDS = ("flat", "ivf")
INSTALL_HINT = "install the optional dependency: pip install 'datainf[index]' (or pip install faiss-cpu)"


def load_faiss() -> Any:
    """The faiss module, imported on first use; without it, one clear error saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise DataInfError(f"the top-k index needs faiss, which is not installed; {INSTALL_HINT}") from None
    return faiss


# --------------------------------------------------------------------------------------------------
# what an index is built from
# --------------------------------------------------------------------------------------------------


def store_digest(store: GradientStore) -> str:
    """sha256 of what a store holds: its examples, blocks, fingerprints, preconditioning, and every chunk's
    chunk.json (which records the sha256 of each of the chunk's files). Any rewritten chunk changes it, and it
    is cheap: no gradient is read."""
    h = hashlib.sha256(json.dumps({
        "n": store.n_examples, "blocks": {n: list(s) for n, s in store.block_shapes.items()},
        "fingerprints": dict(store.fingerprints), "dtype": store.storage_dtype,
        "preconditioned": preconditioned(store)}, sort_keys=True, default=str).encode())
    for c in range(store.num_chunks):
        file = Path(store.path) / "chunks" / f"{c:05d}" / CHUNK_MANIFEST
        h.update(f"\n{c}|".encode())
        h.update(file.read_bytes() if file.is_file() else b"missing")
    return h.hexdigest()


@dataclass
class IndexSettings:
    """How a store's rows become index vectors: the method whose scores the index reproduces, whether it
    normalizes, and per block the factor each stored row is multiplied by (``-scale_l``) and the damping."""

    method: str
    normalize: bool
    scale: dict[str, float]
    damping: dict[str, float] | None = None


def index_settings(store: GradientStore, method: str | None = None, normalize: bool = False) -> IndexSettings:
    """The settings for indexing ``store`` with ``method`` (default: the method the store is preconditioned
    for, identity for a plain store); refused (with the command that works) for a method the store's rows do
    not give by an inner product."""
    info = preconditioned(store)
    if info is None:
        method = method or PLAIN_METHOD
        if method != PLAIN_METHOD:
            raise DataInfError(
                f"store {store.path} holds plain gradients, so an index of it reproduces identity scores only; for "
                f"'{method}', precondition it first: `datainf store precondition --method {method} {store.path} "
                f"PRE` then `datainf index build PRE --method {method}`")
        return IndexSettings(PLAIN_METHOD, normalize, {n: 1.0 for n in store.block_names})
    made = info["method"]
    if method is not None and method != made:
        raise DataInfError(f"store {store.path} is preconditioned for '{made}', not '{method}'; build the index "
                           f"with --method {made}, or precondition its source store {info.get('source')} for "
                           f"'{method}'")
    if normalize and made != PLAIN_METHOD:
        raise DataInfError(f"--normalize needs each gradient's preconditioned norm, which store {store.path} "
                           f"(preconditioned for '{made}') does not hold; build the index without --normalize, "
                           f"or with --method identity over its source store {info.get('source')}")
    return IndexSettings(made, normalize, {n: float(info["scale"][n]) for n in store.block_names},
                         dict(info.get("damping") or {}) or None)


def _normalized(x: Tensor) -> Tensor:
    """Rows divided by their norms (a zero row stays zero)."""
    norms = torch.linalg.vector_norm(x.double(), dim=1, keepdim=True)
    return (x.double() / norms.clamp_min(torch.finfo(torch.float64).tiny)).to(x.dtype)


def _vector_rows(store: GradientStore, settings: IndexSettings, rows: slice | np.ndarray) -> np.ndarray:
    """Index vectors of some rows of the store, float32: per block the stored row times ``-scale_l``,
    concatenated in the store's block order (normalized to norm 1 if asked)."""
    blocks = store.blocks(dtype=torch.float32)
    x = torch.cat([blocks[n][rows] * (-settings.scale[n]) for n in store.block_names], dim=1)
    return np.ascontiguousarray((_normalized(x) if settings.normalize else x).numpy(), dtype=np.float32)


def training_vectors(store: GradientStore, settings: IndexSettings) -> np.ndarray:
    """The store's rows as index vectors, (n_examples, d) float32, read chunk by chunk (see
    :func:`_vector_rows`)."""
    d = sum(math.prod(s) for s in store.block_shapes.values())
    out = np.empty((store.n_examples, d), dtype=np.float32)
    for c in range(store.num_chunks):
        rows = store.chunk_rows(c)
        out[rows.start : rows.stop] = _vector_rows(store, settings, slice(rows.start, rows.stop))
    return out


def query_vectors(queries: GradientStore | Mapping[str, Tensor], block_names: Sequence[str],
                  normalize: bool = False) -> np.ndarray:
    """Query gradients as search vectors, (n_query, d) float32: their blocks concatenated in the training
    store's order (normalized to norm 1 if the index is)."""
    grads = query_blocks(queries)
    if set(grads) != set(block_names):
        raise DataInfError("the queries name other blocks than the training store; make both with one model and "
                           "adapter")
    v = torch.cat([grads[n].reshape(grads[n].shape[0], -1).to(torch.float32) for n in block_names], dim=1)
    if normalize:
        v = _normalized(v)
    return np.ascontiguousarray(v.numpy(), dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# building and searching
# --------------------------------------------------------------------------------------------------


def default_nlist(n: int) -> int:
    """IVF lists for n rows: about sqrt(n), with at least 39 rows per list to train on (faiss's minimum)."""
    return max(1, min(int(round(math.sqrt(n))), n // 39))


def empty_index(d: int, kind: str = "flat", nlist: int = 1) -> Any:
    """An empty faiss inner-product index of d numbers a row: ``flat`` or ``ivf`` (``nlist`` lists, untrained)."""
    faiss = load_faiss()
    if kind == "flat":
        return faiss.IndexFlatIP(d)
    if kind == "ivf":
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = 0  # the quantizer's k-means: the same index from the same rows (faiss keeps it alive)
        return index
    raise DataInfError(f"index kind must be one of {', '.join(INDEX_KINDS)}, got {kind!r}")


def _check_nlist(nlist: int, n: int) -> int:
    if not 1 <= nlist <= n:
        raise DataInfError(f"--nlist {nlist}: an IVF index of {n} rows takes 1 to {n} lists")
    return nlist


def build_index(vectors: np.ndarray, kind: str = "flat", nlist: int | None = None) -> Any:
    """A faiss inner-product index of ``vectors`` (n, d): ``flat`` (exact) or ``ivf`` (``nlist`` lists,
    default :func:`default_nlist`; its quantizer trained on the rows)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    if n == 0:
        raise DataInfError("an index needs at least one training example")
    nlist = _check_nlist(nlist or default_nlist(n), n) if kind == "ivf" else 1
    index = empty_index(d, kind, nlist)
    if kind == "ivf":
        index.train(vectors)
    index.add(vectors)
    return index


#: rows an IVF quantizer is trained on, per list (faiss's own cap: it samples this many when given more)
TRAIN_ROWS_PER_LIST = 256


def search(index: Any, queries: np.ndarray, k: int, nprobe: int | None = None
           ) -> dict[str, list[list[tuple[int, float]]]]:
    """The ``k`` most helpful and most harmful rows of every query (``queries`` (m, d) float32): kind ->
    per query a list of (training index, score) best first, holding only rows of the kind's sign (helpful:
    score < 0, harmful: score > 0). ``nprobe``: lists an IVF index searches (default 1)."""
    if k < 1:
        raise DataInfError(f"k must be >= 1, got {k}")
    if nprobe is not None and hasattr(index, "nprobe"):
        index.nprobe = max(1, min(int(nprobe), int(index.nlist)))
    k = min(k, int(index.ntotal))
    q = np.ascontiguousarray(queries, dtype=np.float32)
    out: dict[str, list[list[tuple[int, float]]]] = {}
    for kind in KINDS:
        sign = 1.0 if kind == "harmful" else -1.0  # helpful = the most negative scores = largest with -v
        values, ids = index.search(np.ascontiguousarray(sign * q), k)
        out[kind] = [[(int(i), sign * float(s)) for i, s in zip(row_ids, row_values) if i >= 0 and s > 0]
                     for row_ids, row_values in zip(ids, values)]
    return out


def exhaustive_top(scores: Tensor, k: int) -> dict[str, list[list[int]]]:
    """The exact top-k training indices of every query column of ``scores`` (n, m), per kind, of its sign
    only (what :func:`datainf.ranking.top_examples` lists)."""
    scores = scores[:, None] if scores.ndim == 1 else scores
    out: dict[str, list[list[int]]] = {kind: [] for kind in KINDS}
    for j in range(scores.shape[1]):
        col = scores[:, j].double()
        for kind in KINDS:
            signed = col if kind == "harmful" else -col
            order = torch.argsort(-signed, stable=True)[: min(k, col.numel())]
            out[kind].append([int(i) for i in order if signed[i] > 0])
    return out


def recall_at_k(found: Mapping[str, list[list[tuple[int, float]]]], exact: Mapping[str, list[list[int]]]) -> float:
    """The share of the exact top-k rows (all queries, both kinds) that the index found: 1.0 when every list
    is empty."""
    hit = total = 0
    for kind in KINDS:
        for got, want in zip(found[kind], exact[kind]):
            hit += len({i for i, _ in got} & set(want))
            total += len(want)
    return hit / total if total else 1.0


# --------------------------------------------------------------------------------------------------
# the index folder
# --------------------------------------------------------------------------------------------------


@dataclass
class TopIndex:
    """An index in memory with what its manifest says (:func:`build_store_index`, :func:`load_index`)."""

    index: Any
    settings: IndexSettings
    manifest: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def block_names(self) -> list[str]:
        return list(self.manifest["store"]["blocks"])

    def search(self, queries: GradientStore | Mapping[str, Tensor], k: int, nprobe: int | None = None
               ) -> dict[str, list[list[tuple[int, float]]]]:
        """:func:`search` with query gradients (a store or block -> (m, d) tensors)."""
        return search(self.index, query_vectors(queries, self.block_names, self.settings.normalize), k, nprobe)


def build_store_index(store: GradientStore, *, method: str | None = None, normalize: bool = False,
                      kind: str = "flat", nlist: int | None = None) -> TopIndex:
    """Build an index of ``store`` (see the module docstring) with its manifest."""
    faiss = load_faiss()
    settings = index_settings(store, method, normalize)
    n = store.n_examples
    if n == 0:
        raise DataInfError(f"store {store.path} holds no examples to index")
    d = sum(math.prod(s) for s in store.block_shapes.values())
    nlist = _check_nlist(nlist or default_nlist(n), n) if kind == "ivf" else 1
    index = empty_index(d, kind, nlist)
    t0 = time.perf_counter()
    train_s = 0.0
    if kind == "ivf":  # the quantizer trained on a sample of rows (all of them up to 256 a list)
        rows = np.arange(n)
        if n > TRAIN_ROWS_PER_LIST * nlist:
            rows = np.sort(np.random.default_rng(0).choice(n, TRAIN_ROWS_PER_LIST * nlist, replace=False))
        sample = _vector_rows(store, settings, rows)
        t1 = time.perf_counter()
        index.train(sample)
        train_s = time.perf_counter() - t1
        del sample
    for c in range(store.num_chunks):  # rows added chunk by chunk: one copy of the vectors in memory, faiss's
        rows = store.chunk_rows(c)
        index.add(_vector_rows(store, settings, slice(rows.start, rows.stop)))
    build_s = time.perf_counter() - t0
    manifest = {
        "format": INDEX_FORMAT, "version": INDEX_VERSION, "library_version": __version__,
        "faiss_version": getattr(faiss, "__version__", None), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "kind": kind, "nlist": int(index.nlist) if kind == "ivf" else None, "metric": "inner_product",
        "method": settings.method, "normalize": settings.normalize, "damping": settings.damping,
        "scale": settings.scale,
        "store": {"path": str(store.path), "fingerprints": dict(store.fingerprints), "digest": store_digest(store),
                  "n_examples": store.n_examples, "blocks": list(store.block_names), "dim": d},
        "seconds": {"train": train_s, "build": build_s},
    }
    return TopIndex(index, settings, manifest)


def rebuild_command(manifest: Mapping[str, Any], folder: str | os.PathLike, store: str | os.PathLike | None = None
                    ) -> str:
    """The command that rebuilds the index at ``folder`` as its manifest describes it."""
    parts = ["datainf index build", str(store or manifest["store"]["path"]), "--method", str(manifest["method"]),
             "--kind", str(manifest["kind"])]
    if manifest.get("normalize"):
        parts.append("--normalize")
    if manifest.get("kind") == "ivf" and manifest.get("nlist"):
        parts += ["--nlist", str(manifest["nlist"])]
    return "`" + " ".join(parts + ["--out", str(folder)]) + "`"


def save_index(top: TopIndex, folder: str | os.PathLike) -> Path:
    """Write ``top`` into ``folder`` atomically (the folder appears whole or not at all; an existing one is
    replaced whole: the caller checks it is ours, :func:`is_index_folder`)."""
    faiss = load_faiss()
    folder = Path(folder)
    with atomic.new_directory(folder, replace=True) as tmp:
        faiss.write_index(top.index, str(tmp / INDEX_FILE))
        manifest = {**top.manifest, "index_sha256": file_digest(tmp / INDEX_FILE)}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    top.manifest, top.path = manifest, folder
    return folder


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of an index folder; refused when the folder is not one."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise DataInfError(f"{folder} is not a datainf index (it has no {MANIFEST_FILE}); build one with "
                           "`datainf index build STORE --out FOLDER`")
    manifest = parse_json(path.read_bytes(), str(path), "build the index again with `datainf index build`")
    if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
        raise DataInfError(f"{path} is not a datainf index manifest; build one with `datainf index build`")
    return manifest


def is_index_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a datainf index manifest."""
    try:
        read_manifest(folder)
    except DataInfError:
        return False
    return True


def load_index(folder: str | os.PathLike, store: GradientStore) -> TopIndex:
    """Read an index folder for searching ``store``: refused when its file does not match its sha256, or when
    it was built from another store or from this store before it changed (with the command that rebuilds it)."""
    faiss = load_faiss()
    manifest = read_manifest(folder)
    rebuild = rebuild_command(manifest, folder, store.path)
    if manifest["store"]["fingerprints"] != dict(store.fingerprints) or \
            manifest["store"]["blocks"] != list(store.block_names):
        raise DataInfError(f"index {folder} was built from another store ({manifest['store']['path']}) than "
                           f"{store.path}; build one for it: {rebuild}")
    if manifest["store"]["digest"] != store_digest(store):
        raise DataInfError(f"index {folder} is stale: store {store.path} changed after the index was built from "
                           f"it; rebuild it: {rebuild}")
    file = Path(folder) / INDEX_FILE
    if not file.is_file() or file_digest(file) != manifest.get("index_sha256"):
        raise DataInfError(f"{file} is missing or does not match the sha256 in {MANIFEST_FILE} (its bytes changed "
                           f"after it was written); rebuild it: {rebuild}")
    try:
        index = faiss.read_index(str(file))
    except RuntimeError as e:
        raise DataInfError(f"{file} is unreadable ({str(e).splitlines()[0][:120]}); rebuild it: {rebuild}") from None
    settings = IndexSettings(manifest["method"], bool(manifest["normalize"]), dict(manifest["scale"]),
                             manifest.get("damping"))
    return TopIndex(index, settings, manifest, Path(folder))


def index_rows(found: Mapping[str, list[list[tuple[int, float]]]], *, method: str,
               train_records: Sequence[Mapping[str, Any]] | None = None,
               query_records: Sequence[Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The lists of :func:`search` as the rows ``datainf top`` writes (per query: helpful, then harmful)."""
    m = len(found[KINDS[0]])
    if train_records is not None and found and any(i >= len(train_records) for lists in found.values()
                                                   for hits in lists for i, _ in hits):
        train_records = None  # records that do not cover the store: rows without texts rather than wrong ones
    rows = []
    for j in range(m):
        for kind in KINDS:
            rows += hit_rows(found[kind][j], method=method, query=query_name(j, m), kind=kind,
                             train_records=train_records,
                             query_record=None if query_records is None or len(query_records) != m
                             else query_records[j])
    return rows


def check_queries_store(store: GradientStore, queries: GradientStore) -> None:
    """Refuse a query store that does not belong with the indexed store (another projection, blocks, model,
    adapter or task), or that holds preconditioned training gradients."""
    if preconditioned(queries):
        raise DataInfError(f"{queries.path} holds preconditioned training gradients, not query gradients")
    check_pair(store, queries)


__all__ = ["INDEX_FILE", "INDEX_FILES", "INDEX_FORMAT", "INDEX_KINDS", "MANIFEST_FILE", "IndexSettings", "TopIndex",
           "build_index", "build_store_index", "empty_index", "check_queries_store", "default_nlist", "exhaustive_top",
           "index_rows", "index_settings", "is_index_folder", "load_faiss", "load_index", "query_vectors",
           "read_manifest", "rebuild_command", "recall_at_k", "save_index", "search", "store_digest",
           "training_vectors"]
