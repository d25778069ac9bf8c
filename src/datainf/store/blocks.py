"""One block of a store read as rows from memory-mapped chunk files: :class:`StoredBlock`, and what it reads
them through, :class:`BlockSource` (the store's public reading API; :class:`datainf.store.GradientStore` is
one). This module imports nothing else of the store: the store imports it."""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from datainf.errors import DataInfError

#: held while the warnings filter is changed to read a map (catch_warnings is not thread-safe)
_QUIET = threading.Lock()


class BlockSource(Protocol):
    """What a :class:`StoredBlock` reads its rows through: a store's layout and its chunk files."""

    path: Path
    n_examples: int
    chunk_size: int
    num_chunks: int
    block_names: list[str]
    block_shapes: dict[str, tuple[int, ...]]
    storage_dtype: str
    #: whether reads check each chunk file's sha256 the first time they touch it
    checksums: bool

    def block_file(self, name: str) -> str:
        """The file name of block ``name`` inside each chunk folder."""
        ...

    def checked_file(self, index: int, file: str, *, verify: bool | None = None) -> Path:
        """The path of ``file`` of chunk ``index``, refused when missing or (first read) not matching its sha256."""
        ...

    def check_file(self, index: int, file: str, *, verify: bool | None = None) -> str:
        """:meth:`checked_file`, the path as a string."""
        ...

    def mapped(self, index: int, file: str, *, verify: bool | None = None) -> np.ndarray:
        """``file`` of chunk ``index``, memory-mapped and checked: (rows of the chunk, d), storage dtype."""
        ...

    def prefetch(self, index: int, file: str) -> None:
        """Start reading ``file`` of chunk ``index`` in the background (its checksum, the page cache)."""
        ...

    def sq_norms_table(self) -> Tensor:
        """Every example's squared norm per block, float64 (n_examples, n_blocks), columns in block order."""
        ...


class StoredBlock:
    """One block of a store as a row source: rows are read from memory-mapped chunk files on demand.

    ``shape == (n_examples, d)`` (d = prod(block_shape)), ``dtype`` is the dtype ``__getitem__`` returns,
    ``device`` is cpu. ``block[rows]`` takes a slice, an int, or a 1-D LongTensor / ndarray / list of row
    indices and returns a tensor ``(rows, d)`` (``(d,)`` for an int), touching only the chunks it needs.
    Can be passed to :func:`datainf.influence` directly.
    """

    def __init__(self, store: BlockSource, name: str, dtype: torch.dtype):
        self.store = store
        self.name = name
        self.block_shape = store.block_shapes[name]
        self.shape = (store.n_examples, math.prod(self.block_shape))
        self.dtype = dtype
        self.device = torch.device("cpu")
        self._file = store.block_file(name)
        self._column = store.block_names.index(name)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def chunk_rows(self) -> int:
        """Rows per chunk file: a pass over several blocks reads them fastest span by span of this many rows,
        every block's file of a chunk in turn (the order the store's files lie on disk)."""
        return self.store.chunk_size

    @property
    def file(self) -> str:
        """This block's file name inside each chunk folder."""
        return self._file

    def prefetch(self, rows: slice, together: Sequence[StoredBlock] = (), *, verify: bool = True) -> None:
        """Start reading the files that hold ``rows`` (a slice with a start and a stop) in the background, so
        that a later ``block[rows]`` finds them verified and in memory (see ``StoreReader.prefetch``); with
        ``together`` (other blocks of the same store) their files of those chunks too, one job per chunk;
        ``verify=False``: read ahead without hashing (the reads that use the files hash them)."""
        size = self.store.chunk_size
        files = [self._file, *(b.file for b in together)]
        batch = getattr(self.store, "prefetch_chunk", None)
        for c in range(rows.start // size, min(self.store.num_chunks, -(-rows.stop // size))):
            if batch is not None:
                batch(c, files, verify=verify)
            else:
                for f in files:
                    self.store.prefetch(c, f)

    def __repr__(self) -> str:
        return f"StoredBlock({self.name!r}, shape={self.shape}, dtype={self.dtype}, store={str(self.store.path)!r})"

    def _chunk(self, index: int) -> np.ndarray:
        """The chunk's rows of this block, memory-mapped: (rows_in_chunk, d) in the storage dtype."""
        return self.store.mapped(index, self._file)

    def _to_torch(self, array: np.ndarray) -> Tensor:
        t = torch.from_numpy(np.array(array))  # copies only the requested rows out of the memory map
        if self.store.storage_dtype == "bfloat16":
            t = t.view(torch.int16).view(torch.bfloat16)
        return t.to(self.dtype)

    def _copy_rows(self, out: Tensor, array: np.ndarray) -> None:
        """``out[:] = rows`` straight from the memory map: one pass that converts as it copies (no
        intermediate copies, no fresh allocation), the streaming read's hot loop."""
        if array.flags.writeable:  # rows read into a staging buffer
            t = torch.from_numpy(np.ascontiguousarray(array))
        else:  # a read-only map: torch warns that it is not writable (we only read); the filter is global
            with _QUIET, warnings.catch_warnings():  # state, so threads take turns setting and restoring it
                warnings.simplefilter("ignore")
                t = torch.from_numpy(np.ascontiguousarray(array))
        if self.store.storage_dtype == "bfloat16":
            t = t.view(torch.int16).view(torch.bfloat16)
        out.copy_(t)

    def sq_norms(self) -> Tensor:
        """The stored squared norm of every example's gradient in this block, float64 (n,): computed when the
        store was written from the float32 (float64) values, so scoring needs no pass over the rows for it.
        They come from the chunks' ``sq_norms.npy`` (checked against their sha256 like any chunk file); the rows'
        own files are checked when they are read, which every scoring pass does before it returns (an answer from
        the norms alone asks :meth:`check_rows`), so a damaged block is still refused, and a first read is not
        preceded by a separate pass that hashes every file."""
        return self.store.sq_norms_table()[:, self._column]

    def check_rows(self) -> None:
        """Check every file of this block against its sha256 (with the store's ``checksums`` on), as reading its
        rows would: what an answer drawn from :meth:`sq_norms` alone (Hessian-free self-influence) asks first,
        so that a damaged block is refused rather than answered by its norms."""
        if self.store.checksums:
            for c in range(self.store.num_chunks):
                self.store.check_file(c, self._file)

    def read_into(self, rows: slice, out: Tensor, staging: Tensor | np.ndarray | None = None) -> Tensor:
        """Rows ``rows.start:rows.stop`` (within range, step 1) copied into the first rows of ``out`` (a
        contiguous CPU tensor of ``dtype`` with ``d`` columns and at least that many rows), converted as they
        are copied; returns that view of ``out``. A pass reuses one buffer for every chunk instead of a fresh
        one per chunk (whose pages the OS would zero and fault in each time). With ``staging`` (a contiguous
        CPU tensor of at least the rows' stored bytes) the stored rows are read into it with ``pread`` and
        converted from there (what threads reading at once use, see ``GradientStore.read_rows``), else
        converted straight from the file's memory map."""
        start, stop = rows.start, rows.stop
        size = self.store.chunk_size
        view = out[: stop - start]
        read = getattr(self.store, "read_rows", None) if staging is not None else None
        pos = start
        while pos < stop:
            c = pos // size
            end = min(stop, (c + 1) * size)
            target = view[pos - start : end - start]
            raw = read(c, self._file, pos - c * size, end - c * size, staging) if read is not None else None
            self._copy_rows(target, raw if raw is not None else self._chunk(c)[pos - c * size : end - c * size])
            pos = end
        return view

    def __getitem__(self, rows: slice | int | Tensor | np.ndarray | list[int]) -> Tensor:
        n, d = self.shape
        size = self.store.chunk_size
        if isinstance(rows, (int, np.integer)) and not isinstance(rows, bool):
            k = int(rows)
            if not -n <= k < n:
                raise DataInfError(f"block '{self.name}': row {k} is out of range for {n} examples")
            return self[slice(k % n, k % n + 1)][0]
        if isinstance(rows, slice):
            start, stop, step = rows.indices(n)
            if step != 1:
                return self[np.arange(start, stop, step)]
            return self.read_into(slice(start, stop), torch.empty(max(stop - start, 0), d, dtype=self.dtype))
        idx = rows.detach().cpu().numpy() if isinstance(rows, Tensor) else np.asarray(rows)
        if idx.ndim != 1 or not (np.issubdtype(idx.dtype, np.integer) or idx.size == 0):
            raise DataInfError(
                f"block '{self.name}': rows must be a slice, an int or a 1-D integer index, got "
                f"{idx.dtype} with shape {idx.shape}"
            )
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise DataInfError(f"block '{self.name}': row indices must lie in [-{n}, {n}), got {idx.min()}..{idx.max()}")
        idx = idx % n if n else idx
        out = torch.empty(len(idx), d, dtype=self.dtype)
        chunk_of = idx // size
        order = np.argsort(chunk_of, kind="stable")
        bounds = np.flatnonzero(np.diff(chunk_of[order])) + 1
        for group in np.split(order, bounds):
            if group.size == 0:
                continue
            c = int(chunk_of[group[0]])
            out[torch.from_numpy(group)] = self._to_torch(self._chunk(c)[idx[group] - c * size])
        return out
