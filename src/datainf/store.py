"""On-disk store of per-example gradients: resumable, atomic per chunk, memory-mapped on read.

A store is a directory holding the per-example gradients of one dataset under one model + adapter + task,
so that scoring never recomputes them::

    STORE/
      manifest.json     format version, library version, blocks (names + shapes, in order), storage dtype,
                        n_examples, chunk_size, fingerprints {model, adapter, task, dataset}, meta, complete,
                        and (projected stores only) projection {dim, seed, kind, blocks: {name: {shape, full_shape}}}
      chunks/00000/     one folder per chunk of examples: one ``bNNNN.npy`` per block (the chunk's rows,
                        flattened to (rows, d), in the storage dtype), ``sq_norms.npy`` ((rows, n_blocks)
                        float64 squared norms of each example's gradient per block, from the float32 (float64)
                        values) and ``chunk.json`` (the chunk's own manifest: its index, its row range, and for
                        every file its size, shape, dtype and sha256)
      records.jsonl     (optional) the examples themselves, one JSON object a line, in row order, when they
                        are plain JSON (texts, chat messages, labels): what `explain`, `top` and `report` show
      lock              present while a writer holds the store: {"pid", "host", "token"}
      .writer.lock      the OS lock (``filelock``) under which a writer reads, takes over or releases ``lock``

A chunk is written into ``chunks/.NNNNN.tmp-<pid>``, fsynced, then renamed to ``chunks/NNNNN``: it appears
whole or not at all. Re-running :meth:`GradientStore.create` with the same settings resumes the store;
:meth:`GradientStore.missing_chunks` lists what is left to compute.

Integrity: :meth:`GradientStore.open` checks every chunk cheaply (its chunk.json names this chunk and its
rows, every file has the size, shape and dtype it was written with; no chunk folder lies beyond
``n_examples``; a complete store lacks none), reading a chunk file checks its sha256 the first time this
store object touches it, and :meth:`GradientStore.verify` (``datainf store verify``) checks everything,
squared norms included. A failure names the chunk. Resuming (:meth:`GradientStore.create` on an existing
store) checks every stored chunk's checksums and moves a bad one aside to ``chunks/.corrupt-NNNNN-<time>``
(nothing is deleted), so the rerun recomputes just that chunk. Stores written before chunk manifests
existed (no ``integrity`` key in manifest.json) are still read, with a warning: only their sizes and
shapes can be checked.

Fingerprints (short sha256 hex strings) identify what the gradients depend on: :func:`fingerprint_model`,
:func:`fingerprint_dataset`, :func:`fingerprint_task`.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import logging
import math
import mmap
import os
import re
import shutil
import socket
import time
import uuid
import warnings
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from datainf import atomic
from datainf.adapters import adapter_parameters
from datainf.errors import DataInfError
from datainf.version import __version__

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
DTYPES = ("float32", "float16", "bfloat16", "float64")
FINGERPRINT_KEYS = ("model", "adapter", "task", "dataset")
RECORDS_FILE = "records.jsonl"
#: a chunk's own manifest, inside its folder
CHUNK_MANIFEST = "chunk.json"
#: the checksum of every chunk file (recorded as the manifest's ``integrity``)
CHECKSUM = "sha256"
#: the OS lock guarding the JSON ``lock`` file (never deleted while the store lives)
WRITER_LOCK = ".writer.lock"
#: how long a writer waits for another's short critical section on the lock
LOCK_TIMEOUT_S = 60.0
_CHUNK_NAME = re.compile(r"^\d{5}$")
_NUMPY_STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "float64": np.float64}
_TORCH_STORAGE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                  "float64": torch.float64}
#: ``dtype`` default of the readers: float32 rows, float64 for a float64 store
AUTO = "auto"
_FLOAT16_MAX = 65504.0


# --------------------------------------------------------------------------------------------------
# small file helpers
# --------------------------------------------------------------------------------------------------


def _save_npy(path: Path, array: np.ndarray) -> dict[str, Any]:
    """One file of a chunk (flushed to disk by the chunk's atomic.new_directory(fsync=True)); returns what
    its chunk.json records: size in bytes, shape, dtype and sha256 of the bytes written."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    data = buffer.getbuffer()
    with open(path, "wb") as f:
        f.write(data)
    return {"bytes": len(data), "shape": list(array.shape), "dtype": array.dtype.str,
            CHECKSUM: hashlib.sha256(data).hexdigest()}


def _file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, CHECKSUM).hexdigest()


def _npy_header(path: Path) -> tuple[tuple[int, ...], str, int]:
    """(shape, dtype str, data offset) of a .npy file, from its header alone."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        return tuple(int(x) for x in shape), dtype.str, f.tell()


def _map_npy(path: Path, shape: tuple[int, int], dtype: np.dtype) -> np.ndarray | None:
    """Memory-map a .npy file this store wrote, when its header says exactly what we expect (version 1.0,
    C order, ``dtype``, ``shape``, data to the end of the file); None otherwise (the caller uses np.load).
    np.load parses the header with ast and builds an np.memmap, ~0.5 ms per file: at 10^4-10^5 chunk files
    per pass that costs more than reading them."""
    with open(path, "rb") as f:
        head = f.read(10)
        if len(head) < 10 or head[:8] != b"\x93NUMPY\x01\x00":
            return None
        length = int.from_bytes(head[8:10], "little")
        header = f.read(length).decode("latin1")
        offset = 10 + length
        size = os.fstat(f.fileno()).st_size
        expected = f"'descr': '{dtype.str}', 'fortran_order': False, 'shape': ({shape[0]}, {shape[1]}), }}"
        if not header.startswith("{" + expected) or size - offset != shape[0] * shape[1] * dtype.itemsize:
            return None
        if size == offset:
            return np.empty(shape, dtype=dtype)
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(buffer, dtype=dtype, count=shape[0] * shape[1], offset=offset).reshape(shape)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


# --------------------------------------------------------------------------------------------------
# the lock
# --------------------------------------------------------------------------------------------------


def _writer_lock(store: Path, timeout: float = LOCK_TIMEOUT_S) -> Any:
    """The OS lock (fcntl/msvcrt through ``filelock``) held while the JSON lock is read and replaced."""
    import filelock

    return filelock.FileLock(str(store / WRITER_LOCK), timeout=timeout)


def _acquire_lock(store: Path) -> dict[str, Any]:
    """Take STORE/lock, or take over a stale one (dead pid on this host). Returns its content.

    The check and the (over)write happen under the OS lock STORE/.writer.lock, so two writers can never both
    see a stale lock and both take it; the JSON file keeps who holds the store (for messages, and for the
    ranks of a distributed job, which join with its token)."""
    import filelock

    lock = store / "lock"
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "token": uuid.uuid4().hex}
    try:
        with _writer_lock(store):
            held = None
            if lock.exists():
                try:
                    held = json.loads(lock.read_text(encoding="utf-8"))
                    pid, host = int(held["pid"]), str(held["host"])
                except (OSError, ValueError, KeyError, TypeError):
                    raise DataInfError(
                        f"store {store} is locked by an unknown writer (unreadable {lock}); "
                        f"remove {lock} if no process is writing this store"
                    ) from None
                if host == mine["host"] and not _pid_alive(pid):
                    logger.warning("store %s: taking over a stale lock of process %d (no longer running)",
                                   store, pid)
                else:
                    raise DataInfError(
                        f"store {store} is being written by process {pid} on host {host}; "
                        f"wait for it or remove {lock} if that process is gone"
                    )
            atomic.write_text(lock, json.dumps(mine), fsync=True)  # replaces a stale lock in one rename
    except filelock.Timeout:
        raise DataInfError(
            f"store {store}: another process has held {store / WRITER_LOCK} for {LOCK_TIMEOUT_S:g} s; "
            "is a writer of this store stuck?"
        ) from None
    return mine


def _release_lock(lock: Path, token: str) -> None:
    """Remove the lock file if it is still ours (called on close, on exit and at garbage collection)."""
    def ours() -> bool:
        try:
            held = json.loads(lock.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        # (a forked child carries the token but is not the holder)
        return isinstance(held, dict) and held.get("token") == token and held.get("pid") == os.getpid()

    if not ours():
        return
    try:
        with _writer_lock(lock.parent, timeout=10):
            if ours():
                lock.unlink(missing_ok=True)
    except Exception:  # noqa: BLE001 - at interpreter exit or on a read-only store: ours alone, so remove it
        lock.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------


class StoredBlock:
    """One block of a store as a row source: rows are read from memory-mapped chunk files on demand.

    ``shape == (n_examples, d)`` (d = prod(block_shape)), ``dtype`` is the dtype ``__getitem__`` returns,
    ``device`` is cpu. ``block[rows]`` takes a slice, an int, or a 1-D LongTensor / ndarray / list of row
    indices and returns a tensor ``(rows, d)`` (``(d,)`` for an int), touching only the chunks it needs.
    Can be passed to :func:`datainf.influence` directly.
    """

    def __init__(self, store: GradientStore, name: str, dtype: torch.dtype):
        self.store = store
        self.name = name
        self.block_shape = store.block_shapes[name]
        self.shape = (store.n_examples, math.prod(self.block_shape))
        self.dtype = dtype
        self.device = torch.device("cpu")
        self._file = store._block_file(name)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"StoredBlock({self.name!r}, shape={self.shape}, dtype={self.dtype}, store={str(self.store.path)!r})"

    def _chunk(self, index: int) -> np.ndarray:
        """The chunk's rows of this block, memory-mapped: (rows_in_chunk, d) in the storage dtype."""
        return self.store._mapped(index, self._file)

    def _to_torch(self, array: np.ndarray) -> Tensor:
        t = torch.from_numpy(np.array(array))  # copies only the requested rows out of the memory map
        if self.store.storage_dtype == "bfloat16":
            t = t.view(torch.int16).view(torch.bfloat16)
        return t.to(self.dtype)

    def _copy_rows(self, out: Tensor, array: np.ndarray) -> None:
        """``out[:] = rows`` straight from the memory map: one pass that converts as it copies (no
        intermediate copies, no fresh allocation), the streaming read's hot loop."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns that the (read-only) map is not writable; we only read
            t = torch.from_numpy(np.ascontiguousarray(array))
        if self.store.storage_dtype == "bfloat16":
            t = t.view(torch.int16).view(torch.bfloat16)
        out.copy_(t)

    def sq_norms(self) -> Tensor:
        """The stored squared norm of every example's gradient in this block, float64 (n,): computed when the
        store was written from the float32 (float64) values, so scoring needs no pass over the rows for it.
        They stand for this block's rows, so (with the store's ``checksums`` on) the rows' files are checked
        against their sha256 as a read of them would be: a damaged block is refused, not scored by its old
        norms."""
        if self.store.checksums:
            for c in range(self.store.num_chunks):
                self.store._checked_file(c, self._file)
        return self.store._sq_norms_table()[:, self.store.block_names.index(self.name)]

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
            out = torch.empty(max(stop - start, 0), d, dtype=self.dtype)
            pos = start
            while pos < stop:
                c = pos // size
                end = min(stop, (c + 1) * size)
                self._copy_rows(out[pos - start : end - start], self._chunk(c)[pos - c * size : end - c * size])
                pos = end
            return out
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


# --------------------------------------------------------------------------------------------------
# the store
# --------------------------------------------------------------------------------------------------


def _check_spec(
    path: Path,
    blocks: Mapping[str, tuple[int, ...]],
    n_examples: int,
    fingerprints: Mapping[str, str],
    chunk_size: int,
    dtype: str,
    meta: Mapping[str, Any] | None,
) -> dict[str, tuple[int, ...]]:
    """Validate create()'s arguments; returns the block shapes as tuples of ints."""
    if not isinstance(blocks, Mapping) or not blocks:
        raise DataInfError(f"store {path}: blocks must be a non-empty mapping name -> shape")
    shapes = {}
    for name, shape in blocks.items():
        if not isinstance(name, str) or not name:
            raise DataInfError(f"store {path}: block names must be non-empty strings, got {name!r}")
        dims = tuple(shape) if isinstance(shape, Iterable) else (shape,)
        if not all(isinstance(s, (int, np.integer)) and s >= 1 for s in dims):
            raise DataInfError(f"store {path}: block '{name}' has shape {shape!r}; use a tuple of positive ints")
        shapes[name] = tuple(int(s) for s in dims)
    if not isinstance(n_examples, (int, np.integer)) or n_examples < 1:
        raise DataInfError(f"store {path}: n_examples must be an int >= 1, got {n_examples!r}")
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise DataInfError(f"store {path}: chunk_size must be an int >= 1, got {chunk_size!r}")
    if dtype not in DTYPES:
        raise DataInfError(f"store {path}: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not isinstance(fingerprints, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in fingerprints.items()
    ):
        raise DataInfError(f"store {path}: fingerprints must map names (model, adapter, task, dataset) to strings")
    try:
        json.dumps(dict(meta or {}))
    except (TypeError, ValueError) as e:
        raise DataInfError(f"store {path}: meta must be JSON-serialisable ({e})") from None
    return shapes


class GradientStore:
    """A directory of per-example gradients (see the module docstring for the layout).

    Attributes: ``path``, ``manifest`` (the parsed manifest.json), ``n_examples``, ``chunk_size``,
    ``num_chunks``, ``block_names`` (in order), ``block_shapes`` (name -> per-example shape),
    ``storage_dtype`` ("float32", "float16", "bfloat16" or "float64"), ``fingerprints``, ``complete``.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], *, writable: bool, lock_token: str | None = None,
                 checksums: bool = True):
        """Use :meth:`create` or :meth:`open`."""
        _validate_manifest(path, manifest)
        self.path = path
        self.manifest = manifest
        self.n_examples = int(manifest["n_examples"])
        self.chunk_size = int(manifest["chunk_size"])
        self.num_chunks = -(-self.n_examples // self.chunk_size)
        self.block_names = [b["name"] for b in manifest["blocks"]]
        self.block_shapes = {b["name"]: tuple(b["shape"]) for b in manifest["blocks"]}
        self.storage_dtype = str(manifest["dtype"])
        self.fingerprints = dict(manifest["fingerprints"])
        self._writable = writable
        self.lock_token = lock_token
        #: check each chunk file's sha256 the first time it is read through this object
        self.checksums = checksums
        self._verified: set[tuple[int, str]] = set()
        self._chunk_info: dict[int, dict[str, Any] | None] = {}
        self._created: dict[str, bool] | None = None  # what create() made, for discard_if_unused()
        self._release = None
        if lock_token is not None:
            self._release = weakref.finalize(self, _release_lock, path / "lock", lock_token)

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete", False))

    @property
    def has_checksums(self) -> bool:
        """Whether the store was written with chunk manifests (every chunk has a chunk.json with checksums)."""
        return self.manifest.get("integrity") == CHECKSUM

    @property
    def projection(self) -> dict[str, Any] | None:
        """How the gradients were projected (dim, seed, kind, blocks), or None for full gradients."""
        return self.manifest.get("projection")

    def __repr__(self) -> str:
        done = self.num_chunks - len(self.missing_chunks())
        return (
            f"GradientStore({str(self.path)!r}, n_examples={self.n_examples}, blocks={len(self.block_names)}, "
            f"dtype={self.storage_dtype}, chunks {done}/{self.num_chunks})"
        )

    # ---------------------------------------------------------------- opening

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        blocks: Mapping[str, tuple[int, ...]],
        n_examples: int,
        fingerprints: Mapping[str, str],
        chunk_size: int = 256,
        dtype: str = "float32",
        meta: Mapping[str, Any] | None = None,
        projection: Mapping[str, Any] | None = None,
    ) -> GradientStore:
        """Create a store for writing, or reopen an existing one made with the same settings (resume).

        Args:
            path: the store directory (created if needed; an existing one must be a store or empty).
            blocks: block name -> per-example parameter shape, in the order scores should sum them.
            n_examples: number of examples (rows) of the dataset.
            fingerprints: e.g. {"model": ..., "adapter": ..., "task": ..., "dataset": ...}; a reopened
                store must match every one.
            chunk_size: examples per chunk (the unit of writing and of resuming).
            dtype: storage dtype, "float32", "float16", "bfloat16" or "float64".
            meta: free JSON-serialisable information kept in the manifest (not compared on resume).
            projection: how the gradients were projected (``datainf.gradients.projection_layout``: dim, seed,
                kind and each block's full and projected shape), kept as the manifest's ``projection`` and
                compared on resume; None (the default) for full gradients (no key is written).
        Returns:
            a writable store holding STORE/lock until :meth:`close` (or the end of a ``with`` block).
        """
        path = Path(path)
        blocks = _check_spec(path, blocks, n_examples, fingerprints, chunk_size, dtype, meta)
        if path.exists() and not path.is_dir():
            raise DataInfError(f"store {path} is a file, not a directory; choose a new --store directory")
        made_dir = not path.exists()
        if path.is_dir() and not (path / "manifest.json").exists():
            stray = [p.name for p in path.iterdir() if p.name not in ("lock", "chunks", WRITER_LOCK)]
            if stray:
                raise DataInfError(
                    f"{path} exists and is not a gradient store (no manifest.json, holds {stray[:3]}); "
                    "choose a new --store directory"
                )
        path.mkdir(parents=True, exist_ok=True)
        lock = _acquire_lock(path)
        try:
            wanted = {
                "format_version": FORMAT_VERSION,
                "library_version": __version__,
                "blocks": [{"name": k, "shape": list(v)} for k, v in blocks.items()],
                "dtype": dtype,
                "n_examples": int(n_examples),
                "chunk_size": int(chunk_size),
                "fingerprints": dict(fingerprints),
                "meta": dict(meta or {}),
                "integrity": CHECKSUM,
                "complete": False,
            }
            if projection is not None:
                wanted["projection"] = json.loads(json.dumps(dict(projection)))
            manifest_path = path / "manifest.json"
            fresh = not manifest_path.exists()
            if not fresh:
                manifest = _read_manifest(path)
                _compare(path, manifest, wanted)
            else:
                manifest = wanted
                atomic.write_json(manifest_path, manifest, fsync=True)
            chunks = path / "chunks"
            made_chunks = not chunks.exists()
            chunks.mkdir(exist_ok=True)
            for tmp in chunks.glob(".*.tmp-*"):
                logger.info("store %s: removing %s left by an interrupted write", path, tmp.name)
                shutil.rmtree(tmp, ignore_errors=True)
            store = cls(path, manifest, writable=True, lock_token=lock["token"])
            store._created = {"dir": made_dir, "manifest": fresh, "chunks": made_chunks}
            if not fresh:
                store._set_aside_bad_chunks()
        except BaseException:
            _release_lock(path / "lock", lock["token"])
            raise
        return store

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, allow_incomplete: bool = False,
             checksums: bool = True) -> GradientStore:
        """Open a store read-only (no lock). Refuses an unfinished store unless ``allow_incomplete``.

        Every chunk is checked cheaply (see the module docstring); a bad one is refused by name.
        ``checksums=False`` skips the sha256 check of each chunk file on its first read.
        """
        path = Path(path)
        manifest = _read_manifest(path)
        store = cls(path, manifest, writable=False, checksums=checksums)
        problems = store._layout_problems(checksums=False)
        if problems:
            raise DataInfError(_problems_message(path, problems))
        if not store.has_checksums:
            logger.warning("store %s was written by an older datainf, without chunk checksums: only sizes and "
                           "shapes are checked; recompute it in a new --store directory to get them", path)
        if not store.complete and not allow_incomplete:
            missing = store.missing_chunks()
            raise DataInfError(
                f"store {path} is incomplete ({store.num_chunks - len(missing)} of {store.num_chunks} chunks "
                "written, not finalized); rerun the command that computes it to resume, or open it with "
                "allow_incomplete=True"
            )
        return store

    @classmethod
    def join(cls, path: str | os.PathLike[str], lock_token: str) -> GradientStore:
        """Open for writing a store whose lock another process of the same job holds (distributed writing).

        The process that called :meth:`create` (rank 0) shares its ``lock_token``; the others join with it and
        may then write their own chunks. A joined store never releases the lock: its creator does.
        """
        path = Path(path)
        lock = path / "lock"
        try:
            held = json.loads(lock.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            held = None
        if not isinstance(held, dict) or held.get("token") != lock_token:
            raise DataInfError(
                f"store {path}: the lock is not held by this job (missing or another writer's {lock}); "
                "open it with GradientStore.create on rank 0 first and pass its lock_token"
            )
        return cls(path, _read_manifest(path), writable=True)

    def discard_if_unused(self) -> bool:
        """Remove what :meth:`create` made when no chunk and no records were written (a run refused before
        its first chunk leaves nothing behind). Only a writer of a store it created itself does so; returns
        whether it did."""
        made = self._created
        if not self._writable or not made or not made["manifest"]:
            return False
        chunks = self.path / "chunks"
        if (self.path / RECORDS_FILE).exists() or (chunks.is_dir() and any(chunks.iterdir())):
            return False
        (self.path / "manifest.json").unlink(missing_ok=True)
        if made["chunks"] and chunks.is_dir():
            chunks.rmdir()
        self.close()
        if made["dir"]:
            (self.path / WRITER_LOCK).unlink(missing_ok=True)
            try:
                self.path.rmdir()
            except OSError:
                pass  # something else appeared meanwhile: not ours to remove
        return True

    def close(self) -> None:
        """Release the writer's lock. Reading stays possible afterwards; writing does not."""
        self._writable = False
        if self._release is not None:
            self._release()

    def __enter__(self) -> GradientStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- layout

    def _chunk_dir(self, index: int) -> Path:
        return self.path / "chunks" / f"{index:05d}"

    def _block_file(self, name: str) -> str:
        return f"b{self.block_names.index(name):04d}.npy"

    def _check_index(self, index: int) -> int:
        if not isinstance(index, (int, np.integer)) or not 0 <= index < self.num_chunks:
            raise DataInfError(
                f"store {self.path}: chunk index {index!r} is out of range; it has chunks 0..{self.num_chunks - 1}"
            )
        return int(index)

    def chunk_rows(self, index: int) -> range:
        """The examples chunk ``index`` holds: ``range(index * chunk_size, min(n, (index + 1) * chunk_size))``."""
        index = self._check_index(index)
        return range(index * self.chunk_size, min(self.n_examples, (index + 1) * self.chunk_size))

    def missing_chunks(self) -> list[int]:
        """Indices of the chunks not written yet, ascending."""
        return [i for i in range(self.num_chunks) if not self._chunk_dir(i).is_dir()]

    # ---------------------------------------------------------------- integrity

    def _expected_files(self, index: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """File name -> (shape, numpy dtype str) of what chunk ``index`` must hold."""
        rows = len(self.chunk_rows(index))
        storage = np.dtype(_NUMPY_STORAGE[self.storage_dtype]).str
        out = {self._block_file(name): ((rows, math.prod(self.block_shapes[name])), storage)
               for name in self.block_names}
        out["sq_norms.npy"] = ((rows, len(self.block_names)), np.dtype(np.float64).str)
        return out

    def _expected_file(self, index: int, file: str) -> tuple[tuple[int, int], str]:
        """(shape, numpy dtype str) of one file of chunk ``index`` (what :meth:`_expected_files` lists, without
        building the whole table: this is on the streaming read's path)."""
        rows = len(self.chunk_rows(index))
        if file == "sq_norms.npy":
            return (rows, len(self.block_names)), np.dtype(np.float64).str
        try:
            j = int(file[1:5]) if file.startswith("b") and file.endswith(".npy") and len(file) == 9 else -1
        except ValueError:
            j = -1
        if not 0 <= j < len(self.block_names):
            raise DataInfError(f"store {self.path}: chunk {index} has no file {file!r}")
        return ((rows, math.prod(self.block_shapes[self.block_names[j]])),
                np.dtype(_NUMPY_STORAGE[self.storage_dtype]).str)

    def _read_chunk_manifest(self, index: int) -> dict[str, Any] | None:
        """The chunk's chunk.json (None when it has none); raises _ChunkProblem when it is unreadable."""
        if index in self._chunk_info:
            return self._chunk_info[index]
        file = self._chunk_dir(index) / CHUNK_MANIFEST
        if not file.exists():
            info = None
        else:
            try:
                info = json.loads(file.read_text(encoding="utf-8"))
                if not isinstance(info, dict) or not isinstance(info.get("files"), dict):
                    raise ValueError("not a chunk manifest")
            except (OSError, ValueError, UnicodeDecodeError) as e:
                raise _ChunkProblem(f"its {CHUNK_MANIFEST} is unreadable ({e})") from None
        self._chunk_info[index] = info
        return info

    def _chunk_problem(self, index: int, *, checksums: bool) -> str | None:
        """What is wrong with the written chunk ``index`` (None if nothing): its chunk.json must name this chunk
        and its rows, and list exactly the expected files with the sizes, shapes and dtypes they have; with
        ``checksums`` every file's sha256 is checked too. A chunk without chunk.json (an old store) has its
        .npy headers and sizes checked instead."""
        folder = self._chunk_dir(index)
        rows = self.chunk_rows(index)
        expected = self._expected_files(index)
        try:
            info = self._read_chunk_manifest(index)
        except _ChunkProblem as e:
            return str(e)
        if info is None:
            if self.has_checksums:
                return f"has no {CHUNK_MANIFEST} (damaged, or copied from an older store)"
            for name, (shape, dtype) in expected.items():
                file = folder / name
                if not file.is_file():
                    return f"lacks {name}"
                try:
                    got_shape, got_dtype, offset = _npy_header(file)
                except (OSError, ValueError, EOFError) as e:
                    return f"{name} is not a readable .npy file ({str(e).splitlines()[0][:120]})"
                if (got_shape, got_dtype) != (shape, dtype):
                    return f"{name} holds {got_dtype} {got_shape}, expected {dtype} {shape}"
                size = file.stat().st_size
                want = offset + math.prod(shape) * np.dtype(dtype).itemsize
                if size != want:
                    return f"{name} has {size} bytes, expected {want} (truncated or overwritten)"
            return None
        recorded = info.get("chunk")
        recorded_rows = info.get("rows")
        if recorded != index:
            return (f"holds chunk {recorded} (examples {_span(recorded_rows)}), not chunk {index}: chunk folders "
                    "were swapped, renamed or copied")
        if recorded_rows != [rows.start, rows.stop]:
            raise _ManifestProblem(
                f"chunk {index} holds examples {_span(recorded_rows)}, but manifest.json (n_examples="
                f"{self.n_examples}, chunk_size={self.chunk_size}) puts examples {_span([rows.start, rows.stop])} "
                "in it: manifest.json was edited or belongs to another store"
            )
        files = info["files"]
        if set(files) != set(expected):
            return f"{CHUNK_MANIFEST} lists files {sorted(files)}, expected {sorted(expected)}"
        for name, (shape, dtype) in expected.items():
            entry = files[name]
            file = folder / name
            if not isinstance(entry, dict) or (list(shape), dtype) != (entry.get("shape"), entry.get("dtype")):
                return f"{name} was written as {entry.get('dtype')} {entry.get('shape')}, expected {dtype} {list(shape)}"
            if not file.is_file():
                return f"lacks {name}"
            size = file.stat().st_size
            if size != entry.get("bytes"):
                return f"{name} has {size} bytes, {entry.get('bytes')} when it was written (truncated or overwritten)"
            if checksums and _file_digest(file) != entry.get(CHECKSUM):
                return f"{name} does not match its {CHECKSUM} checksum (its bytes changed after it was written)"
        return None

    def _layout_problems(self, *, checksums: bool) -> list[tuple[int | None, str]]:
        """Problems of the store's chunks as (chunk index or None for the manifest, text), cheapest first."""
        problems: list[tuple[int | None, str]] = []
        chunks = self.path / "chunks"
        if chunks.is_dir():
            beyond = sorted(int(p.name) for p in chunks.iterdir()
                            if _CHUNK_NAME.match(p.name) and int(p.name) >= self.num_chunks)
            if beyond:
                problems.append((None, f"chunk folder chunks/{beyond[0]:05d} lies beyond the {self.num_chunks} "
                                       f"chunks that manifest.json (n_examples={self.n_examples}, chunk_size="
                                       f"{self.chunk_size}) gives: manifest.json was edited or belongs to "
                                       "another store"))
        for i in range(self.num_chunks):
            if not self._chunk_dir(i).is_dir():
                if self.complete:
                    problems.append((i, "is missing, but the store is marked complete"))
                continue
            try:
                problem = self._chunk_problem(i, checksums=checksums)
            except _ManifestProblem as e:
                problems.append((None, str(e)))
                continue
            if problem is not None:
                problems.append((i, problem))
        return problems

    def verify(self) -> list[StoreProblem]:
        """Check everything: every chunk (as :meth:`open` does, plus every file's sha256 and every example's
        squared norms recomputed from its stored gradients) and records.jsonl. Returns one line per problem,
        each naming its chunk (``.chunk``: its index, None for a problem of the manifest or records; empty when
        the store is sound)."""
        problems = self._layout_problems(checksums=True)
        bad = {i for i, _ in problems}
        for i in range(self.num_chunks):
            if i in bad or None in bad or not self._chunk_dir(i).is_dir():
                continue
            problem = self._norms_problem(i)
            if problem is not None:
                problems.append((i, problem))
        lines = [StoreProblem(_problem_line(i, text), chunk=i) for i, text in problems]
        if not self.complete:
            missing = self.missing_chunks()
            lines.append(StoreProblem(f"the store is not finished: {len(missing)} of {self.num_chunks} chunks "
                                      "are not written yet"))
        try:
            self.records()
        except DataInfError as e:
            lines.append(StoreProblem(str(e).replace(f"store {self.path}: ", "")))
        return lines

    def _norms_problem(self, index: int) -> str | None:
        """Whether sq_norms.npy agrees with the chunk's stored gradients (up to the storage rounding)."""
        try:
            sq = np.asarray(self._mapped(index, "sq_norms.npy", verify=False), dtype=np.float64)
            tol = {"float64": 1e-9, "float32": 1e-4, "float16": 2e-2, "bfloat16": 6e-2}[self.storage_dtype]
            for j, name in enumerate(self.block_names):
                stored = self._to_work(self._mapped(index, self._block_file(name), verify=False))
                if not bool(torch.isfinite(stored).all()):
                    return f"{self._block_file(name)} holds a NaN or infinite value"
                got = (stored.double() ** 2).sum(dim=1).numpy()
                scale = np.maximum(np.abs(sq[:, j]), 1e-30)
                off = np.abs(got - sq[:, j]) > tol * scale + 1e-30
                if off.any():
                    k = int(np.flatnonzero(off)[0])
                    return (f"sq_norms.npy disagrees with {self._block_file(name)} (example "
                            f"{self.chunk_rows(index).start + k}: {sq[k, j]:.6g} recorded, {got[k]:.6g} stored)")
        except DataInfError as e:
            return str(e)
        return None

    def _to_work(self, array: np.ndarray) -> Tensor:
        t = torch.from_numpy(np.array(array))
        if self.storage_dtype == "bfloat16":
            t = t.view(torch.int16).view(torch.bfloat16)
        return t.to(torch.float64 if self.storage_dtype == "float64" else torch.float32)

    def _checked_file(self, index: int, file: str, *, verify: bool | None = None) -> Path:
        """The path of a file of chunk ``index``, refused when it is missing and, the first time this object
        touches it and ``checksums`` is on (or ``verify``), when its bytes do not match their sha256."""
        path = self._chunk_dir(index) / file
        if not path.is_file():
            rows = self.chunk_rows(index)
            if self._chunk_dir(index).is_dir():
                raise self._chunk_error(index, f"lacks {file}")
            raise DataInfError(
                f"chunk {index} (examples {rows.start}..{rows.stop - 1}) of store {self.path} is not "
                "written yet; finish computing the store (rerun the same command to resume)"
            )
        verify = self.checksums if verify is None else verify
        if verify and (index, file) not in self._verified:
            try:
                info = self._read_chunk_manifest(index)
            except _ChunkProblem as e:
                raise self._chunk_error(index, str(e)) from None
            entry = (info or {}).get("files", {}).get(file)
            if info is not None and (not isinstance(entry, dict) or _file_digest(path) != entry.get(CHECKSUM)):
                raise self._chunk_error(
                    index, f"{file} does not match its {CHECKSUM} checksum (its bytes changed after it was written)")
            self._verified.add((index, file))
        return path

    def _mapped(self, index: int, file: str, *, verify: bool | None = None) -> np.ndarray:
        """A file of chunk ``index``, memory-mapped, checked against what the chunk must hold (and, the
        first time this object reads it and ``checksums`` is on, against its sha256)."""
        path = self._checked_file(index, file, verify=verify)
        shape, dtype = self._expected_file(index, file)
        try:
            # the header this store wrote is parsed by hand and the data mapped directly (np.load's header
            # parsing and np.memmap cost more than reading a small chunk file); np.load is the fallback
            array = _map_npy(path, shape, np.dtype(dtype))
            if array is None:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            if isinstance(e, OSError) and e.errno == errno.ENOMEM:
                raise  # the memory map was refused (address space or memory exhausted): not a bad chunk
            reason = (str(e).splitlines() or [type(e).__name__])[0][:120]
            raise self._chunk_error(index, f"{file} is unreadable ({reason})") from None
        if tuple(array.shape) != shape or array.dtype.str != dtype:
            raise self._chunk_error(index, f"{file} holds {array.dtype.str} {tuple(array.shape)}, expected {dtype} {shape}")
        return array

    def _chunk_error(self, index: int, text: str) -> DataInfError:
        return DataInfError(_problems_message(self.path, [(index, text)]))

    def _set_aside_bad_chunks(self) -> list[int]:
        """On resume: check every written chunk (checksums included) and move each bad one aside to
        ``chunks/.corrupt-NNNNN-<time>`` (logged, never deleted), so that it is computed again."""
        bad = []
        for i in range(self.num_chunks):
            if not self._chunk_dir(i).is_dir():
                continue
            try:
                problem = self._chunk_problem(i, checksums=True)
            except _ManifestProblem as e:
                problem = str(e)
            if problem is None:
                continue
            stamp = time.strftime("%Y%m%dT%H%M%S")
            aside = self.path / "chunks" / f".corrupt-{i:05d}-{stamp}-{os.getpid()}"
            os.rename(self._chunk_dir(i), aside)
            self._chunk_info.pop(i, None)
            logger.warning("store %s: chunk %d %s; moved it to chunks/%s and computing it again",
                           self.path, i, problem, aside.name)
            bad.append(i)
        if bad and self.complete:
            self.manifest = {**self.manifest, "complete": False}
            atomic.write_json(self.path / "manifest.json", self.manifest, fsync=True)
        return bad

    # ---------------------------------------------------------------- writing

    def write_chunk(self, index: int, grads: Mapping[str, Tensor]) -> None:
        """Write the gradients of chunk ``index`` atomically.

        Args:
            index: chunk index, 0 <= index < num_chunks; must not be written yet.
            grads: block name -> tensor ``(rows_in_chunk, *block_shape)`` (or ``(rows_in_chunk, d)``) for
                every block of the store; any floating dtype, any device; values must be finite.
        """
        if not self._writable:
            raise DataInfError(
                f"store {self.path} is not open for writing (opened read-only or closed); use GradientStore.create"
            )
        index = self._check_index(index)
        rows = self.chunk_rows(index)
        if self._chunk_dir(index).exists():
            raise DataInfError(
                f"store {self.path}: chunk {index} is already written; write only missing_chunks()"
            )
        if not isinstance(grads, Mapping) or set(grads) != set(self.block_names):
            given = sorted(grads) if isinstance(grads, Mapping) else type(grads).__name__
            raise DataInfError(
                f"store {self.path}, chunk {index}: expected blocks {self.block_names}, got {given}"
            )
        arrays, sq = {}, np.empty((len(rows), len(self.block_names)), dtype=np.float64)
        for j, name in enumerate(self.block_names):
            g = grads[name]
            shape = self.block_shapes[name]
            d = math.prod(shape)
            if not isinstance(g, Tensor) or not g.is_floating_point():
                raise DataInfError(f"store {self.path}, chunk {index}: block '{name}' must be a floating torch.Tensor")
            if tuple(g.shape) not in ((len(rows), *shape), (len(rows), d)):
                raise DataInfError(
                    f"store {self.path}, chunk {index}: block '{name}' has shape {tuple(g.shape)}; expected "
                    f"{(len(rows), *shape)} (chunk {index} holds examples {rows.start}..{rows.stop - 1})"
                )
            work = torch.float64 if self.storage_dtype == "float64" else torch.float32
            g32 = g.detach().to(device="cpu", dtype=work).reshape(len(rows), d).contiguous()
            bad = ~torch.isfinite(g32).all(dim=1)
            if bool(bad.any()):
                k = rows.start + int(bad.nonzero()[0])
                raise DataInfError(
                    f"store {self.path}: block '{name}', example {k} has a NaN or infinite gradient; "
                    "drop that example or fix the loss that produced it"
                )
            sq[:, j] = (g32.double() ** 2).sum(dim=1).numpy()
            arrays[name] = self._encode(name, g32, rows)
        self._commit(index, arrays, sq)

    def _encode(self, name: str, g32: Tensor, rows: range) -> np.ndarray:
        """float32 (float64) rows (r, d) -> the storage array (float32, float16, bfloat16 bits as uint16, or
        float64 for a float64 store)."""
        if self.storage_dtype in ("float32", "float64"):
            return g32.numpy()
        if self.storage_dtype == "float16":
            too_big = (g32.abs() > _FLOAT16_MAX).any(dim=1)
            if bool(too_big.any()):
                k = rows.start + int(too_big.nonzero()[0])
                raise DataInfError(
                    f"store {self.path}: block '{name}', example {k} has gradient entries beyond float16's "
                    f"range (|x| > {_FLOAT16_MAX:g}); create the store with dtype='bfloat16' or 'float32'"
                )
            return g32.to(torch.float16).numpy()
        return g32.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)

    def _commit(self, index: int, arrays: Mapping[str, np.ndarray], sq: np.ndarray) -> None:
        rows = self.chunk_rows(index)
        with atomic.new_directory(self._chunk_dir(index), fsync=True) as tmp:
            files = {}
            for name, array in arrays.items():
                files[self._block_file(name)] = _save_npy(tmp / self._block_file(name), array)
            files["sq_norms.npy"] = _save_npy(tmp / "sq_norms.npy", sq)
            info = {"format": "datainf-chunk", "chunk": index, "rows": [rows.start, rows.stop],
                    "checksum": CHECKSUM, "files": files}
            (tmp / CHUNK_MANIFEST).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")

    def write_records(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Keep the examples (plain JSON objects, one per row, in row order) beside their gradients, atomically.

        Refused unless there is exactly one record per example; a record that JSON cannot write is refused
        by its row number.
        """
        if not self._writable:
            raise DataInfError(f"store {self.path} is not open for writing; records are written by its creator")
        lines = []
        for i, record in enumerate(records):
            try:
                lines.append(json.dumps(record, ensure_ascii=False, allow_nan=False))
            except (TypeError, ValueError) as e:
                raise DataInfError(f"store {self.path}: record {i} cannot be written as JSON ({e})") from None
        if len(lines) != self.n_examples:
            raise DataInfError(f"store {self.path}: {len(lines)} records for {self.n_examples} examples")
        text = "\n".join(lines) + "\n"
        atomic.write_text(self.path / RECORDS_FILE, text, fsync=True)
        data = text.encode("utf-8")
        self._records_digest = {"bytes": len(data), CHECKSUM: hashlib.sha256(data).hexdigest()}

    def records(self) -> list[dict[str, Any]] | None:
        """The examples kept by :meth:`write_records` (None if the store has none), one per row."""
        path = self.path / RECORDS_FILE
        if not path.is_file():
            if self.manifest.get("records"):
                raise DataInfError(f"store {self.path}: {RECORDS_FILE} is missing; rerun `datainf grads` to rewrite it")
            return None
        try:
            data = path.read_bytes()
            digest = self.manifest.get("records")
            if isinstance(digest, dict) and hashlib.sha256(data).hexdigest() != digest.get(CHECKSUM):
                raise DataInfError(f"store {self.path}: {RECORDS_FILE} does not match its {CHECKSUM} checksum (edited "
                                   "after it was written); rerun `datainf grads` to rewrite it")
            out = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
        except (OSError, ValueError, UnicodeDecodeError) as e:
            if isinstance(e, DataInfError):
                raise
            raise DataInfError(f"store {self.path}: {RECORDS_FILE} is unreadable ({e}); rerun `datainf grads`") from None
        if len(out) != self.n_examples:
            raise DataInfError(f"store {self.path}: {RECORDS_FILE} holds {len(out)} records for {self.n_examples} "
                               "examples; rerun `datainf grads` in a new --store directory")
        return out

    def finalize(self) -> None:
        """Check that every chunk is present and mark the store complete (atomic manifest rewrite)."""
        if not self._writable:
            raise DataInfError(f"store {self.path} is not open for writing; use GradientStore.create to finish it")
        missing = self.missing_chunks()
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
            raise DataInfError(
                f"store {self.path} cannot be finalized: {len(missing)} of {self.num_chunks} chunks are missing "
                f"({shown}); write them first"
            )
        needed = [self._block_file(n) for n in self.block_names] + ["sq_norms.npy"]
        for i in range(self.num_chunks):
            absent = [f for f in needed if not (self._chunk_dir(i) / f).is_file()]
            if absent:
                raise DataInfError(
                    f"store {self.path}: chunk folder {self._chunk_dir(i)} lacks {absent}; delete that folder "
                    "and rerun to recompute it"
                )
        problems = self._layout_problems(checksums=False)
        if problems:
            raise DataInfError(_problems_message(self.path, problems))
        self.manifest = {**self.manifest, "complete": True}
        digest = getattr(self, "_records_digest", None)
        if digest is not None:
            self.manifest["records"] = digest
        atomic.write_json(self.path / "manifest.json", self.manifest, fsync=True)

    # ---------------------------------------------------------------- reading

    def _read_dtype(self, dtype: torch.dtype | str | None) -> torch.dtype:
        if dtype == AUTO:
            return torch.float64 if self.storage_dtype == "float64" else torch.float32
        out = _TORCH_STORAGE[self.storage_dtype] if dtype is None else dtype
        if not out.is_floating_point:
            raise DataInfError(f"store {self.path}: read dtype must be a floating torch dtype, got {dtype}")
        return out

    def block(self, name: str, *, dtype: torch.dtype | str | None = AUTO) -> StoredBlock:
        """A memory-mapped row source over block ``name``: shape (n_examples, d); rows come back in
        ``dtype`` (default float32, or float64 for a float64 store; None for the storage dtype)."""
        if name not in self.block_shapes:
            raise DataInfError(f"store {self.path} has no block '{name}'; it has {self.block_names}")
        return StoredBlock(self, name, self._read_dtype(dtype))

    def blocks(self, *, dtype: torch.dtype | str | None = AUTO) -> dict[str, StoredBlock]:
        """Every block as a row source, in manifest order; pass it straight to :func:`datainf.influence`."""
        return {name: self.block(name, dtype=dtype) for name in self.block_names}

    def load(self, name: str, *, dtype: torch.dtype | str | None = AUTO) -> Tensor:
        """Block ``name`` read into memory: (n_examples, *block_shape)."""
        b = self.block(name, dtype=dtype)
        return b[:].reshape(self.n_examples, *self.block_shapes[name])

    def _sq_norms_table(self) -> Tensor:
        """All blocks' squared norms as one float64 (n_examples, n_blocks) table, read once per store object
        (complete stores only: the table of an unfinished store would go stale)."""
        table = getattr(self, "_sq_table", None)
        if table is None:
            table = torch.stack(list(self.sq_norms().values()), dim=1)
            if self.complete and not self._writable:
                self._sq_table = table
        return table

    def sq_norms(self) -> dict[str, Tensor]:
        """Squared gradient norm of every example per block, name -> float64 tensor (n_examples,), computed
        from the float32 values before any down-cast to the storage dtype."""
        parts = []
        for i in range(self.num_chunks):
            if not self._chunk_dir(i).is_dir():
                raise DataInfError(f"store {self.path}: chunk {i} is not written yet; finish computing the store")
            parts.append(np.array(self._mapped(i, "sq_norms.npy")))
        sq = torch.from_numpy(np.concatenate(parts, axis=0))
        return {name: sq[:, j].clone() for j, name in enumerate(self.block_names)}


class StoreProblem(str):
    """One line of :meth:`GradientStore.verify`; ``chunk`` is the bad chunk's index (None: the manifest,
    the records, or an unfinished store), which a rerun of `datainf grads` recomputes."""

    chunk: int | None

    def __new__(cls, text: str, chunk: int | None = None) -> StoreProblem:
        out = super().__new__(cls, text)
        out.chunk = chunk
        return out


class _ChunkProblem(Exception):
    """A chunk that cannot be trusted (internal: becomes a DataInfError naming the chunk)."""


class _ManifestProblem(Exception):
    """manifest.json disagrees with the chunks (internal)."""


def _span(rows: Any) -> str:
    if isinstance(rows, list) and len(rows) == 2 and all(isinstance(r, int) for r in rows):
        return f"{rows[0]}..{rows[1] - 1}"
    return repr(rows)


def _problem_line(index: int | None, text: str, path: Path | None = None) -> str:
    where = f"store {path}: " if path is not None else ""
    if index is None:
        return f"{where}{text}"
    return f"{where}chunk {index} (chunks/{index:05d}) {text}"


def _problems_message(path: Path, problems: list[tuple[int | None, str]]) -> str:
    """One line for a store's problems: the first few, and what to do."""
    shown = "; ".join(_problem_line(i, t) for i, t in problems[:3])
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    if all(i is not None for i, _ in problems):
        hint = ("rerun `datainf grads` with the same settings: it moves the bad chunks aside and recomputes just "
                "them (`datainf store verify` checks every checksum)")
    else:
        hint = "recompute the store in a new --store directory (`datainf grads`)"
    return f"store {path}: {shown}{more}; {hint}"


def _validate_manifest(path: Path, manifest: Any) -> None:
    """Refuse a manifest whose fields cannot describe a store (edited or damaged), in one line."""
    def bad(what: str) -> DataInfError:
        return DataInfError(f"store {path}: manifest.json {what}; it was edited or damaged: recompute the store "
                            "in a new --store directory (`datainf grads`)")

    if not isinstance(manifest, dict):
        raise bad("is not a JSON object")

    def positive_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 1

    for key in ("n_examples", "chunk_size"):
        if not positive_int(manifest.get(key)):
            raise bad(f"has {key}={manifest.get(key)!r} (an integer >= 1 is needed)")
    blocks = manifest.get("blocks")
    if not isinstance(blocks, list) or not blocks:
        raise bad("has no list of blocks")
    names = set()
    for b in blocks:
        if not isinstance(b, dict) or not isinstance(b.get("name"), str) or not b["name"] or b["name"] in names:
            raise bad(f"has a bad block entry {str(b)[:80]}")
        names.add(b["name"])
        shape = b.get("shape")
        if not isinstance(shape, list) or not shape or not all(positive_int(x) for x in shape):
            raise bad(f"has block '{b['name']}' with shape {shape!r}")
    if manifest.get("dtype") not in DTYPES:
        raise bad(f"has dtype {manifest.get('dtype')!r}, not one of {', '.join(DTYPES)}")
    fps = manifest.get("fingerprints")
    if not isinstance(fps, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in fps.items()):
        raise bad("has no mapping of fingerprints")
    if not isinstance(manifest.get("meta", {}), dict) or not isinstance(manifest.get("complete", False), bool):
        raise bad("has a bad 'meta' or 'complete' entry")
    if manifest.get("integrity") not in (None, CHECKSUM):
        raise bad(f"names an unknown integrity check {manifest.get('integrity')!r}")


def _read_manifest(path: Path) -> dict[str, Any]:
    file = path / "manifest.json"
    if not file.is_file():
        raise DataInfError(f"{path} is not a gradient store (no manifest.json); check the --store path")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise DataInfError(f"store {path}: manifest.json is unreadable ({e}); delete the store and recompute") from None
    if not isinstance(manifest, dict):
        raise DataInfError(f"store {path}: manifest.json is not a JSON object; delete the store and recompute")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataInfError(
            f"store {path} has format version {manifest.get('format_version')!r}, this library reads "
            f"{FORMAT_VERSION}; recompute it in a new --store directory"
        )
    for key in ("blocks", "dtype", "n_examples", "chunk_size", "fingerprints"):
        if key not in manifest:
            raise DataInfError(f"store {path}: manifest.json lacks '{key}'; delete the store and recompute")
    _validate_manifest(path, manifest)
    return manifest


def projection_label(manifest: Mapping[str, Any] | None) -> str:
    """A manifest's projection in words: "none" or "k=64, seed 0"."""
    p = (manifest or {}).get("projection")
    return "none" if not p else f"k={p.get('dim')}, seed {p.get('seed')}"


def _compare(path: Path, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    """Refuse to resume a store made with different settings, naming the first item that differs."""
    hint = "use a new --store directory or delete it"
    if old.get("projection") != new.get("projection"):
        raise DataInfError(f"store {path} was made with a different projection ({projection_label(old)} != "
                           f"{projection_label(new)}); {hint}")
    old_names = [b["name"] for b in old["blocks"]]
    new_names = [b["name"] for b in new["blocks"]]
    if old_names != new_names:
        raise DataInfError(f"store {path} was made with different blocks ({old_names} != {new_names}); {hint}")
    for a, b in zip(old["blocks"], new["blocks"]):
        if list(a["shape"]) != list(b["shape"]):
            raise DataInfError(
                f"store {path} was made with a different shape of block '{a['name']}' "
                f"({tuple(a['shape'])} != {tuple(b['shape'])}); {hint}"
            )
    for key, what in (("dtype", "storage dtype"), ("n_examples", "number of examples"), ("chunk_size", "chunk_size")):
        if old[key] != new[key]:
            raise DataInfError(f"store {path} was made with a different {what} ({old[key]} != {new[key]}); {hint}")
    old_fp, new_fp = old["fingerprints"], new["fingerprints"]
    keys = [k for k in FINGERPRINT_KEYS if k in old_fp or k in new_fp]
    keys += sorted((set(old_fp) | set(new_fp)) - set(keys))
    for key in keys:
        if old_fp.get(key) != new_fp.get(key):
            raise DataInfError(
                f"store {path} was made with a different {key} (fingerprint {old_fp.get(key)} != "
                f"{new_fp.get(key)}); {hint}"
            )


# --------------------------------------------------------------------------------------------------
# fingerprints
# --------------------------------------------------------------------------------------------------

_SAMPLE = 1024
#: the module PEFT keeps beside a trained ``modules_to_save`` copy: re-initialized at every load, never used
PEFT_REINITIALIZED = "original_module"
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "_diffusers_version", "_commit_hash"}


def _short(h: Any) -> str:
    return h.hexdigest()[:16]


def _tensor_bytes(t: Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes()


def _json_default(x: Any) -> Any:
    """JSON stand-ins for values json cannot write: arrays and tensors by content hash, sets sorted."""
    if isinstance(x, Tensor):
        return {"tensor": str(x.dtype), "shape": list(x.shape), "sha256": hashlib.sha256(_tensor_bytes(x)).hexdigest()}
    if isinstance(x, np.ndarray):
        data = np.ascontiguousarray(x).tobytes()
        return {"ndarray": str(x.dtype), "shape": list(x.shape), "sha256": hashlib.sha256(data).hexdigest()}
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, (bytes, bytearray)):
        return {"bytes": hashlib.sha256(bytes(x)).hexdigest()}
    if isinstance(x, (set, frozenset)):
        return sorted(x, key=repr)
    if isinstance(x, Path):
        return str(x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.asdict(x)
    if hasattr(x, "to_dict"):
        return x.to_dict()
    if hasattr(x, "tobytes") and hasattr(x, "size") and hasattr(x, "mode"):  # a PIL image
        return {"image": x.mode, "size": list(x.size), "sha256": hashlib.sha256(x.tobytes()).hexdigest()}
    raise TypeError(f"cannot fingerprint a value of type {type(x).__name__}")


def _stable_json(x: Any) -> str:
    return json.dumps(x, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default)


def _config_dict(model: torch.nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is None:
        return {}
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        return {"repr": type(config).__name__}
    return {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}


def fingerprint_model(model: torch.nn.Module) -> dict[str, str]:
    """Fingerprints of a model's base weights and of its adapter.

    Returns:
        {"model": ..., "adapter": ...}, 16 hex characters each.
        "model" hashes the config (without paths and library versions) and, for every frozen parameter,
        its name, shape, dtype, first and last 1024 values and its float64 sum (cheap even for 13B models);
        PEFT's ``original_module`` copies of ``modules_to_save`` heads are left out (they get fresh random
        weights at every adapter load and take no part in the forward pass).
        "adapter" hashes every adapter parameter's (:func:`datainf.adapters.adapter_parameters`: the
        trainable ones, or PEFT's LoRA ones of a model loaded for inference) name, shape, dtype and full
        bytes, plus the PEFT
        config (rank, alpha, target modules) when the model has one.
    """
    if not isinstance(model, torch.nn.Module):
        raise DataInfError(f"fingerprint_model expects a torch.nn.Module, got {type(model).__name__}")
    base, adapter = hashlib.sha256(), hashlib.sha256()
    try:
        base.update(_stable_json(_config_dict(model)).encode())
        peft_config = getattr(model, "peft_config", None)
        if peft_config is not None:  # without inference_mode: loading for inference or training is the same adapter
            configs = {name: {k: v for k, v in (c.to_dict() if hasattr(c, "to_dict") else dict(c)).items()
                              if k != "inference_mode"} for name, c in dict(peft_config).items()}
            adapter.update(_stable_json(configs).encode())
    except TypeError as e:
        raise DataInfError(f"fingerprint_model: the model's config cannot be written as JSON ({e})") from None
    adapter_names = set(adapter_parameters(model))
    for name, p in model.named_parameters():
        if name not in adapter_names and PEFT_REINITIALIZED in name.split("."):
            continue  # PEFT's copy of a modules_to_save head: freshly initialized at every load, never used
        if p.device.type == "meta":
            raise DataInfError(f"fingerprint_model: parameter '{name}' is on the meta device; load the weights first")
        header = f"{name}|{tuple(p.shape)}|{p.dtype}|".encode()
        if name in adapter_names:
            adapter.update(header)
            adapter.update(_tensor_bytes(p))
        else:
            flat = p.detach().reshape(-1)
            base.update(header)
            base.update(_tensor_bytes(flat[:_SAMPLE]))
            base.update(_tensor_bytes(flat[-_SAMPLE:]))
            base.update(repr(float(flat.sum(dtype=torch.float64))).encode())
    return {"model": _short(base), "adapter": _short(adapter)}


def fingerprint_dataset(records: Iterable[Any]) -> str:
    """Fingerprint of a dataset: the stable JSON (sorted keys) of every record, in order (16 hex chars).

    Records may be dicts, sequences, strings, numbers, dataclasses; tensors, arrays, bytes and PIL images
    inside them are hashed by content.
    """
    h = hashlib.sha256()
    count = 0
    for k, record in enumerate(records):
        try:
            h.update(_stable_json(record).encode())
        except TypeError as e:
            raise DataInfError(f"fingerprint_dataset: record {k} cannot be fingerprinted ({e})") from None
        h.update(b"\n")
        count += 1
    h.update(f"n={count}".encode())
    return _short(h)


def fingerprint_task(task_description: str | Mapping[str, Any]) -> str:
    """Fingerprint of whatever defines the loss (task name, prompt template, label words, ...): 16 hex chars."""
    if not isinstance(task_description, (str, Mapping)):
        raise DataInfError(
            f"fingerprint_task expects a string or a dict, got {type(task_description).__name__}"
        )
    try:
        text = _stable_json(task_description)
    except TypeError as e:
        raise DataInfError(f"fingerprint_task: the task description cannot be fingerprinted ({e})") from None
    return _short(hashlib.sha256(text.encode()))
