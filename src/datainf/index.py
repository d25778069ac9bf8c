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
rows; ``nprobe`` lists are searched, approximate), or ``compact``: each index vector reduced to ``dim`` numbers
(default 768) by a basis learned from the store's rows (per block the top principal directions of a sample
of rows, computed in float64, the ``dim`` with the largest eigenvalues over all blocks kept), held as
float16 (faiss ``IndexScalarQuantizer``); a query is searched for ``candidates x k`` rows per list in the
reduced space, then those rows are read from the store itself and re-ranked by their exact scores (so the
scores it returns are the store's inner products, equal to ``score_store``'s to float32 rounding). Its
recall depends on the rows' spectrum: it is high when a few hundred directions hold nearly all of the
rows' energy (low-rank gradients), and ``index build --check`` measures it. An index folder holds
``index.faiss`` and ``index.json`` (and, for ``compact``, ``basis.safetensors``):
the store it was built from (path, fingerprints, and a digest of its content: the sha256 of every chunk's
files, as the chunks record them), method, normalization, damping and scale per block, and the sha256 of
``index.faiss`` (and of the basis). An index whose store changed since is refused with the command that
rebuilds it. The compact index's re-ranking reads only the candidates' rows, so it does not check the sha256
of the chunk files they lie in (that would read the whole store); their chunk manifests are checked through
the digest, and ``datainf store verify`` checks the bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
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
BASIS_FILE = "basis.safetensors"
#: the files an index folder holds (all written by :func:`save_index`; the basis by a compact index only)
INDEX_FILES = (INDEX_FILE, MANIFEST_FILE, BASIS_FILE)
INDEX_KINDS = ("flat", "ivf", "compact")
#: a compact index's defaults: numbers per example, candidates re-ranked per list (times k), rows of the
#: sample its basis is learned from (measured in docs/benchmarks.md, "The top-k index")
COMPACT_DIM = 768
COMPACT_CANDIDATES = 2
BASIS_SAMPLE = 2048
INSTALL_HINT = "install the optional dependency: pip install 'datainf[index]' (or pip install faiss-cpu)"


def load_faiss() -> Any:
    """The faiss module, imported on first use; without it, one clear error saying how to install it."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its INFO lines (which CPU build it loads)
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
# the compact index: a learned basis, float16 codes, exact re-ranking from the store's rows
# --------------------------------------------------------------------------------------------------


def _offsets(store: GradientStore) -> dict[str, slice]:
    """Where each block lies in a concatenated index vector."""
    out, start = {}, 0
    for name in store.block_names:
        d = math.prod(store.block_shapes[name])
        out[name] = slice(start, start + d)
        start += d
    return out


def _principal(x: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns, (d, r)) of ``x^T x`` for rows ``x`` (s, d) float64,
    through the smaller of the d x d and s x s Gram matrices."""
    s, d = x.shape
    if d <= s:
        values, vectors = torch.linalg.eigh(x.T @ x)
    else:  # x^T x = V L V^T with V = x^T U L^-1/2 from x x^T = U L U^T
        values, u = torch.linalg.eigh(x @ x.T)
        vectors = (x.T @ u) / values.clamp_min(torch.finfo(torch.float64).tiny).sqrt()
    values, vectors = values.flip(0), vectors.flip(1)
    keep = values > values[:1].clamp_min(0) * 1e-12  # directions the sample spans
    return values[keep], vectors[:, keep]


def learn_basis(store: GradientStore, settings: IndexSettings, dim: int, sample: int = BASIS_SAMPLE,
                seed: int = 0) -> tuple[dict[str, Tensor], float]:
    """The compact index's basis: per block the top principal directions (uncentered, float64) of the index
    vectors of ``sample`` random rows, the ``dim`` directions with the largest eigenvalues over all blocks
    kept (a block may keep none). Returns block -> (d_l, r_l) float32 orthonormal columns, and the share of
    the sample's energy the kept directions hold."""
    n = store.n_examples
    rows = np.arange(n) if n <= sample else np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))
    blocks = store.blocks(dtype=torch.float64)
    weight = torch.ones(len(rows), dtype=torch.float64)
    if settings.normalize:  # rows of norm 1: the squared norms the store recorded, summed over blocks
        sq = store.sq_norms_table()[torch.from_numpy(rows)]
        total = sum(sq[:, j] * settings.scale[name] ** 2 for j, name in enumerate(store.block_names))
        weight = 1.0 / torch.as_tensor(total).clamp_min(torch.finfo(torch.float64).tiny).sqrt()
    found: dict[str, tuple[Tensor, Tensor]] = {}
    for name in store.block_names:
        x = blocks[name][rows] * (-settings.scale[name]) * weight[:, None]
        found[name] = _principal(x)
    energy = torch.cat([values for values, _ in found.values()])
    total_energy = float(energy.sum())
    owner = torch.cat([torch.full((len(values),), j) for j, (values, _) in enumerate(found.values())])
    top = torch.argsort(energy, descending=True, stable=True)[:dim]
    kept = float(energy[top].sum()) / total_energy if total_energy > 0 else 1.0
    basis = {}
    for j, (name, (_, vectors)) in enumerate(found.items()):
        r = int((owner[top] == j).sum())
        basis[name] = vectors[:, :r].to(torch.float32).contiguous()
    return basis, kept


def reduce_vectors(x: np.ndarray, basis: Mapping[str, Tensor], offsets: Mapping[str, slice]) -> np.ndarray:
    """Index vectors (m, d) float32 in the reduced space: per block ``x_l @ B_l``, concatenated."""
    parts = [x[:, offsets[name]] @ b.numpy() for name, b in basis.items() if b.shape[1]]
    return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)


def empty_compact(dim: int) -> Any:
    """An empty faiss index of float16 codes of ``dim`` numbers a row, searched by inner product."""
    faiss = load_faiss()
    return faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)


class StoreRows:
    """Exact scores of some training rows, read from the store's own files (the compact index's re-ranking).

    Each chunk file is memory-mapped once and kept (a query touches a few rows of many files), and the rows
    are gathered into buffers kept between calls (a fresh buffer per query would be page-faulted in at a
    fraction of the memory's speed); the files' sha256 is not checked here (see the module docstring)."""

    def __init__(self, store: GradientStore, settings: IndexSettings):
        self.store, self.settings = store, settings
        self.files = [store.block_file(name) for name in store.block_names]
        self.widths = [math.prod(store.block_shapes[name]) for name in store.block_names]
        self.maps: dict[tuple[int, int], np.ndarray] = {}
        self._raw: list[np.ndarray] = []  # per block: gathered rows, storage dtype
        self._wide: list[np.ndarray] = []  # per block: the same rows as float32
        self._stored: list[Tensor] = []  # torch views of both (bfloat16 rows are stored as int16 bits)
        self._widened: list[Tensor] = []
        self._norms: np.ndarray | None = None  # every row's norm (normalized indexes), read once

    #: memory maps kept at most (Linux allows 65,530 a process; a store of 10^6 examples has ~10^5 files)
    MAX_MAPS = 32_768

    def _mapped(self, chunk: int, block: int) -> np.ndarray:
        key = (chunk, block)
        array = self.maps.get(key)
        if array is None:
            if len(self.maps) >= self.MAX_MAPS:
                self.maps.clear()  # unmapped once the gathered rows no longer refer to them
            array = self.maps[key] = self.store.mapped(chunk, self.files[block], verify=False)
        return array

    def _buffers(self, rows: int) -> None:
        """Room for ``rows`` gathered rows per block (grown by doubling, kept)."""
        if self._raw and len(self._raw[0]) >= rows:
            return
        rows = max(rows, 2 * len(self._raw[0]) if self._raw else 0)
        dtype = self._mapped(0, 0).dtype
        self._raw = [np.empty((rows, d), dtype=dtype) for d in self.widths]
        self._wide = [np.empty((rows, d), dtype=np.float32) for d in self.widths]
        raw = [torch.from_numpy(x) for x in self._raw]
        self._stored = [x.view(torch.bfloat16) for x in raw] if self.store.storage_dtype == "bfloat16" else raw
        self._widened = [torch.from_numpy(x) for x in self._wide]

    def scores(self, ids: np.ndarray, queries: np.ndarray) -> np.ndarray:
        """Exact scores (len(ids), m) float64 of training rows ``ids`` (sorted, distinct) against query
        vectors (m, d) float32 (normalized when the index is): per block the stored rows widened to float32
        times the query's block, times ``-scale_l``, summed over blocks in float64."""
        r = len(ids)
        out = np.zeros((r, len(queries)), dtype=np.float64)
        if r == 0:
            return out
        self._buffers(r)
        size = self.store.chunk_size
        chunk_of = ids // size
        bounds = np.flatnonzero(np.diff(chunk_of)) + 1
        groups = [(int(chunk_of[g[0]]), g[0], g[-1] + 1, ids[g] - int(chunk_of[g[0]]) * size)
                  for g in np.split(np.arange(r), bounds)]
        start = 0
        blocks = range(len(self.files))
        for c, lo, hi, local in groups:  # the hot loop: one take per (chunk, block), methods called directly
            maps = [self._mapped(c, b) for b in blocks]
            for array, raw in zip(maps, self._raw):
                array.take(local, 0, raw[lo:hi], "clip")
        for b, (name, d) in enumerate(zip(self.store.block_names, self.widths)):
            wide = self._wide[b][:r]
            self._widened[b][:r].copy_(self._stored[b][:r])  # by torch: numpy's float16 conversion is ~30x slower
            scale = -self.settings.scale[name]
            out += (wide @ queries[:, start : start + d].T) * scale
            start += d
        if self.settings.normalize:  # by the norms the store recorded (of the float32 gradients, as scoring)
            if self._norms is None:
                table = self.store.sq_norms_table().numpy()
                scale = np.array([self.settings.scale[name] ** 2 for name in self.store.block_names])
                self._norms = np.sqrt(table @ scale).clip(min=np.finfo(np.float64).tiny)
            out /= self._norms[ids][:, None]
        return out


def compact_search(index: Any, basis: Mapping[str, Tensor], offsets: Mapping[str, slice], rows: StoreRows,
                   queries: np.ndarray, k: int, candidates: int = COMPACT_CANDIDATES, batch: int = 32
                   ) -> dict[str, list[list[tuple[int, float]]]]:
    """:func:`search` for a compact index: per query ``candidates x k`` rows per list by the reduced
    vectors' inner products, then the top k of their exact scores (read from the store; the candidates of a
    batch of queries are scored against every query of the batch)."""
    if k < 1 or candidates < 1:
        raise DataInfError(f"k and candidates must be >= 1, got {k} and {candidates}")
    n = int(index.ntotal)
    k, wide = min(k, n), min(candidates * k, n)
    out: dict[str, list[list[tuple[int, float]]]] = {kind: [] for kind in KINDS}
    q = np.ascontiguousarray(queries, dtype=np.float32)
    for start in range(0, len(q), batch):
        part = q[start : start + batch]
        reduced = reduce_vectors(part, basis, offsets)
        ids = np.concatenate([index.search(np.ascontiguousarray(sign * reduced), wide)[1].ravel()
                              for sign in (1.0, -1.0)])
        ids = np.unique(ids[ids >= 0])
        exact = rows.scores(ids, part)  # (len(ids), batch)
        for j in range(exact.shape[1]):
            for kind in KINDS:
                signed = exact[:, j] if kind == "harmful" else -exact[:, j]
                order = np.argsort(-signed, kind="stable")[:k]
                out[kind].append([(int(ids[i]), float(exact[i, j])) for i in order if signed[i] > 0])
    return out


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
    #: a compact index's basis (block -> (d_l, r_l)) and the store its candidates are re-ranked from
    basis: dict[str, Tensor] | None = None
    store: GradientStore | None = None
    _rows: StoreRows | None = field(default=None, repr=False)

    @property
    def block_names(self) -> list[str]:
        return list(self.manifest["store"]["blocks"])

    @property
    def kind(self) -> str:
        return str(self.manifest.get("kind", "flat"))

    def search(self, queries: GradientStore | Mapping[str, Tensor], k: int, nprobe: int | None = None,
               candidates: int | None = None) -> dict[str, list[list[tuple[int, float]]]]:
        """:func:`search` with query gradients (a store or block -> (m, d) tensors); a compact index
        re-ranks ``candidates`` x k rows per list (default: its manifest's) by their exact scores."""
        return self.search_vectors(query_vectors(queries, self.block_names, self.settings.normalize), k, nprobe,
                                   candidates)

    def search_vectors(self, vectors: np.ndarray, k: int, nprobe: int | None = None,
                       candidates: int | None = None) -> dict[str, list[list[tuple[int, float]]]]:
        """:meth:`search` with query vectors (m, d) float32 (:func:`query_vectors`)."""
        if self.kind != "compact":
            return search(self.index, vectors, k, nprobe)
        if self.basis is None or self.store is None:
            raise DataInfError("a compact index needs its basis and its store to search (load_index)")
        if self._rows is None:
            self._rows = StoreRows(self.store, self.settings)
        return compact_search(self.index, self.basis, _offsets(self.store), self._rows, vectors, k,
                              candidates or int(self.manifest.get("candidates") or COMPACT_CANDIDATES))


def build_store_index(store: GradientStore, *, method: str | None = None, normalize: bool = False,
                      kind: str = "flat", nlist: int | None = None, dim: int | None = None,
                      candidates: int | None = None, sample: int = BASIS_SAMPLE) -> TopIndex:
    """Build an index of ``store`` (see the module docstring) with its manifest. ``dim``, ``candidates``,
    ``sample``: a compact index's numbers per example, candidates per list (times k) and basis sample."""
    load_faiss()  # refused now if it is missing, before any work
    settings = index_settings(store, method, normalize)
    n = store.n_examples
    if n == 0:
        raise DataInfError(f"store {store.path} holds no examples to index")
    if kind not in INDEX_KINDS:
        raise DataInfError(f"index kind must be one of {', '.join(INDEX_KINDS)}, got {kind!r}")
    d = sum(math.prod(s) for s in store.block_shapes.values())
    if kind == "compact":
        return _build_compact(store, settings, dim or COMPACT_DIM, candidates or COMPACT_CANDIDATES, sample)
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
    manifest = _manifest(store, settings, kind, {"nlist": int(index.nlist) if kind == "ivf" else None},
                         {"train": train_s, "build": build_s})
    return TopIndex(index, settings, manifest)


def _manifest(store: GradientStore, settings: IndexSettings, kind: str, extra: Mapping[str, Any],
              seconds: Mapping[str, float]) -> dict[str, Any]:
    """What an index's index.json records (the sha256 of its files are added by :func:`save_index`)."""
    faiss = load_faiss()
    return {
        "format": INDEX_FORMAT, "version": INDEX_VERSION, "library_version": __version__,
        "faiss_version": getattr(faiss, "__version__", None), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "kind": kind, **extra, "metric": "inner_product",
        "method": settings.method, "normalize": settings.normalize, "damping": settings.damping,
        "scale": settings.scale,
        "store": {"path": str(store.path), "fingerprints": dict(store.fingerprints), "digest": store_digest(store),
                  "n_examples": store.n_examples, "blocks": list(store.block_names),
                  "dim": sum(math.prod(s) for s in store.block_shapes.values())},
        "seconds": dict(seconds),
    }


def _build_compact(store: GradientStore, settings: IndexSettings, dim: int, candidates: int, sample: int
                   ) -> TopIndex:
    """A compact index of ``store``: the basis learned from a sample, every row's reduced vector as float16."""
    if dim < 1 or candidates < 1 or sample < 1:
        raise DataInfError(f"--dim, --candidates and the basis sample must be >= 1, got {dim}, {candidates} and "
                           f"{sample}")
    t0 = time.perf_counter()
    basis, kept = learn_basis(store, settings, dim, sample)
    train_s = time.perf_counter() - t0
    offsets = _offsets(store)
    reduced_dim = sum(b.shape[1] for b in basis.values())
    if reduced_dim == 0:
        raise DataInfError(f"store {store.path}: the sampled rows are all zero, so a compact index has no direction "
                           "to keep; build a flat index (--kind flat)")
    index = empty_compact(reduced_dim)
    for c in range(store.num_chunks):  # reduced chunk by chunk: the full rows are never all in memory
        rows = store.chunk_rows(c)
        index.add(reduce_vectors(_vector_rows(store, settings, slice(rows.start, rows.stop)), basis, offsets))
    build_s = time.perf_counter() - t0
    extra = {"dim": reduced_dim, "candidates": candidates, "basis_sample": min(sample, store.n_examples),
             "energy_kept": kept, "ranks": {name: int(b.shape[1]) for name, b in basis.items()}}
    manifest = _manifest(store, settings, "compact", extra, {"train": train_s, "build": build_s})
    return TopIndex(index, settings, manifest, basis=basis, store=store)


def rebuild_command(manifest: Mapping[str, Any], folder: str | os.PathLike, store: str | os.PathLike | None = None
                    ) -> str:
    """The command that rebuilds the index at ``folder`` as its manifest describes it."""
    parts = ["datainf index build", str(store or manifest["store"]["path"]), "--method", str(manifest["method"]),
             "--kind", str(manifest["kind"])]
    if manifest.get("normalize"):
        parts.append("--normalize")
    if manifest.get("kind") == "ivf" and manifest.get("nlist"):
        parts += ["--nlist", str(manifest["nlist"])]
    if manifest.get("kind") == "compact":
        parts += ["--dim", str(manifest.get("dim")), "--candidates", str(manifest.get("candidates"))]
    return "`" + " ".join(parts + ["--out", str(folder)]) + "`"


def save_index(top: TopIndex, folder: str | os.PathLike) -> Path:
    """Write ``top`` into ``folder`` atomically (the folder appears whole or not at all; an existing one is
    replaced whole: the caller checks it is ours, :func:`is_index_folder`)."""
    faiss = load_faiss()
    folder = Path(folder)
    with atomic.new_directory(folder, replace=True) as tmp:
        faiss.write_index(top.index, str(tmp / INDEX_FILE))
        manifest = {**top.manifest, "index_sha256": file_digest(tmp / INDEX_FILE)}
        if top.basis is not None:
            from safetensors.torch import save_file

            save_file({name: b for name, b in top.basis.items() if b.shape[1]}, str(tmp / BASIS_FILE))
            manifest["basis_sha256"] = file_digest(tmp / BASIS_FILE)
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
    basis = _read_basis(Path(folder), manifest, store, rebuild) if manifest.get("kind") == "compact" else None
    return TopIndex(index, settings, manifest, Path(folder), basis=basis, store=store)


def _read_basis(folder: Path, manifest: Mapping[str, Any], store: GradientStore, rebuild: str) -> dict[str, Tensor]:
    """A compact index's basis, checked against its sha256 and the ranks its manifest records."""
    from safetensors.torch import load_file

    file = folder / BASIS_FILE
    if not file.is_file() or file_digest(file) != manifest.get("basis_sha256"):
        raise DataInfError(f"{file} is missing or does not match the sha256 in {MANIFEST_FILE} (its bytes changed "
                           f"after it was written); rebuild it: {rebuild}")
    saved = load_file(str(file))
    basis = {}
    for name in store.block_names:
        d, r = math.prod(store.block_shapes[name]), int(manifest["ranks"][name])
        b = saved.get(name, torch.zeros(d, 0))
        if tuple(b.shape) != (d, r):
            raise DataInfError(f"{file}: block {name} holds {tuple(b.shape)}, not ({d}, {r}); rebuild it: {rebuild}")
        basis[name] = b.to(torch.float32)
    return basis


def index_for(folder: str | os.PathLike, store: GradientStore, arguments: Any) -> TopIndex:
    """The index at ``folder`` for answering ``arguments`` (a :class:`~datainf.estimators.ScoreArguments`)
    against ``store`` without a pass over it: refused (one message with the command that builds the right
    one) when the index is stale or of another store (:func:`load_index`), or gives another method's or
    normalization's scores (or another damping: a preconditioned store's own), or when the arguments
    ask for what an index cannot give (remedies, method options, the mean query)."""
    from datainf.scoring import check_preconditioned, uses_remedies

    manifest = read_manifest(folder)
    top = load_index(folder, store)
    if arguments.method != top.settings.method or bool(arguments.normalize) != top.settings.normalize:
        index_settings(store, arguments.method, bool(arguments.normalize))  # a store that cannot give it: how to
        wanted = {**manifest, "method": arguments.method, "normalize": bool(arguments.normalize)}
        raise DataInfError(
            f"index {folder} gives {top.settings.method}{' normalized' if top.settings.normalize else ''} scores, "
            f"not {arguments.method}{' normalized' if arguments.normalize else ''}; build one for them: "
            f"{rebuild_command(wanted, Path(folder).with_name(Path(folder).name + '-' + arguments.method), store.path)}"
            f" (or leave out --index)")
    check_preconditioned(store, arguments)
    if arguments.mean_query or uses_remedies(arguments) or arguments.options:
        raise DataInfError(f"index {folder} answers the plain {arguments.method} scores of each query; the mean "
                           "query, remedies, method options and --damping need the full pass: leave out --index")
    return top


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


__all__ = ["BASIS_FILE", "COMPACT_CANDIDATES", "COMPACT_DIM", "INDEX_FILE", "INDEX_FILES", "INDEX_FORMAT", "INDEX_KINDS",
           "MANIFEST_FILE", "IndexSettings", "StoreRows", "TopIndex", "compact_search", "learn_basis", "reduce_vectors",
           "build_index", "build_store_index", "empty_index", "check_queries_store", "default_nlist", "exhaustive_top",
           "index_for", "index_rows", "index_settings", "is_index_folder", "load_faiss", "load_index", "query_vectors",
           "read_manifest", "rebuild_command", "recall_at_k", "save_index", "search", "store_digest",
           "training_vectors"]
