"""The store itself: :class:`GradientStore` (create or resume, write chunks, finalize, open, verify, read)."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import shutil
import time
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from datainf import atomic
from datainf.errors import DataInfError, json_lines, parse_json
from datainf.store.blocks import StoredBlock
from datainf.store.files import (
    AUTO,
    CHECKSUM,
    CHUNK_MANIFEST,
    CHUNK_NAME,
    FLOAT16_MAX,
    FORMAT_VERSION,
    MAX_STORAGE_ERROR,
    NUMPY_STORAGE,
    RECORDS_FILE,
    ROUNDING,
    TORCH_STORAGE,
    WRITER_LOCK,
    file_digest,
    map_npy,
    norms_tolerance,
    npy_header,
    save_npy,
    storage_loss,
)
from datainf.store.locking import acquire_lock, release_lock
from datainf.store.manifest import (
    ChunkProblem,
    ManifestProblem,
    StoreProblem,
    check_spec,
    compare_manifests,
    problem_line,
    problems_message,
    read_manifest,
    row_span,
    validate_manifest,
)
from datainf.version import __version__

logger = logging.getLogger(__name__)


def existing_ancestor(path: str | os.PathLike[str]) -> Path:
    """``path`` itself when it exists, else its nearest existing parent folder: the disk it will be written
    on (a folder not created yet lies on its nearest existing ancestor's disk, not the current directory's)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def require_free_space(folder: str | os.PathLike[str], need: int, what: str, remedy: str) -> None:
    """Refuse (DataInfError) when the disk ``folder`` is (or will be) on, that of its nearest existing
    ancestor, has less than ``need`` bytes free; the message says ``what`` needs them and, besides freeing
    space or another disk, the ``remedy``."""
    free = shutil.disk_usage(existing_ancestor(folder)).free
    if need > free:
        raise DataInfError(f"{what} need {_size(need)}, and the disk has {_size(free)} free; free some space, "
                           f"write it on another disk, or {remedy}")


def disk_full(error: BaseException) -> bool:
    """Whether ``error`` says the disk (or the user's quota) is full."""
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def _size(n: int) -> str:
    """Bytes for a message: '1.8 GB', '340 MB', '12 kB'."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} bytes"


class GradientStore:
    """A directory of per-example gradients (see the module docstring for the layout).

    Attributes: ``path``, ``manifest`` (the parsed manifest.json), ``n_examples``, ``chunk_size``,
    ``num_chunks``, ``block_names`` (in order), ``block_shapes`` (name -> per-example shape),
    ``storage_dtype`` ("float32", "float16", "bfloat16" or "float64"), ``fingerprints``, ``complete``.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], *, writable: bool, lock_token: str | None = None,
                 checksums: bool = True):
        """Use :meth:`create` or :meth:`open`."""
        validate_manifest(path, manifest)
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
            self._release = weakref.finalize(self, release_lock, path / "lock", lock_token)

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
        blocks = check_spec(path, blocks, n_examples, fingerprints, chunk_size, dtype, meta)
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
        lock = acquire_lock(path)
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
                manifest = read_manifest(path)
                compare_manifests(path, manifest, wanted)
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
            release_lock(path / "lock", lock["token"])
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
        manifest = read_manifest(path)
        store = cls(path, manifest, writable=False, checksums=checksums)
        problems = store._layout_problems(checksums=False)
        if problems:
            raise DataInfError(problems_message(path, problems))
        if not store.has_checksums:
            logger.warning("store %s was written by an older datainf, without chunk checksums: only sizes and "
                           "shapes are checked; recompute it in a new --store directory to get them", path)
        if not store.complete and not allow_incomplete:
            missing = store.missing_chunks()
            raise DataInfError(
                f"store {path} is incomplete ({store.num_chunks - len(missing)} of {store.num_chunks} chunks "
                "written, not finalized); rerun the command that computes it to resume and finish it (`datainf "
                "grads` with the same arguments, or Attributor.fit with the same data)"
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
            held = parse_json(lock.read_bytes(), str(lock))
        except (OSError, ValueError):
            held = None
        if not isinstance(held, dict) or held.get("token") != lock_token:
            raise DataInfError(
                f"store {path}: the lock is not held by this job (missing or another writer's {lock}); "
                "open it with GradientStore.create on rank 0 first and pass its lock_token"
            )
        return cls(path, read_manifest(path), writable=True)

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

    def bytes_per_example(self, dtype: str | None = None) -> int:
        """Bytes one example takes on disk: its blocks in the storage dtype (or ``dtype``) and its float64
        squared norms."""
        item = np.dtype(NUMPY_STORAGE[dtype or self.storage_dtype]).itemsize
        return sum(math.prod(shape) for shape in self.block_shapes.values()) * item + 8 * len(self.block_names)

    def check_free_space(self, chunks: Iterable[int]) -> None:
        """Refuse, before anything is computed, to write ``chunks`` onto a disk without room for them (a store
        that fills its disk half-way would stop hours in, and leave the disk full for everything else)."""
        rows = sum(len(self.chunk_rows(c)) for c in chunks)
        require_free_space(self.path, rows * self.bytes_per_example(),
                           f"store {self.path}: {rows:,} examples x {_size(self.bytes_per_example())} each",
                           "store float16/bfloat16 (--dtype), or store projected gradients (datainf grads "
                           "--project K; ProjectionSettings in the API)")

    # ---------------------------------------------------------------- integrity

    def _expected_files(self, index: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """File name -> (shape, numpy dtype str) of what chunk ``index`` must hold."""
        rows = len(self.chunk_rows(index))
        storage = np.dtype(NUMPY_STORAGE[self.storage_dtype]).str
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
                np.dtype(NUMPY_STORAGE[self.storage_dtype]).str)

    def _read_chunk_manifest(self, index: int) -> dict[str, Any] | None:
        """The chunk's chunk.json (None when it has none); raises ChunkProblem when it is unreadable."""
        if index in self._chunk_info:
            return self._chunk_info[index]
        file = self._chunk_dir(index) / CHUNK_MANIFEST
        if not file.exists():
            info = None
        else:
            try:
                info = parse_json(file.read_bytes(), CHUNK_MANIFEST)
                if not isinstance(info, dict) or not isinstance(info.get("files"), dict):
                    raise ValueError("not a chunk manifest")
            except (OSError, ValueError, UnicodeDecodeError) as e:
                raise ChunkProblem(f"its {CHUNK_MANIFEST} is unreadable ({e})") from None
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
        except ChunkProblem as e:
            return str(e)
        if info is None:
            if self.has_checksums:
                return f"has no {CHUNK_MANIFEST} (damaged, or copied from an older store)"
            for name, (shape, dtype) in expected.items():
                file = folder / name
                if not file.is_file():
                    return f"lacks {name}"
                try:
                    got_shape, got_dtype, offset = npy_header(file)
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
            return (f"holds chunk {recorded} (examples {row_span(recorded_rows)}), not chunk {index}: chunk folders "
                    "were swapped, renamed or copied")
        if recorded_rows != [rows.start, rows.stop]:
            raise ManifestProblem(
                f"chunk {index} holds examples {row_span(recorded_rows)}, but manifest.json (n_examples="
                f"{self.n_examples}, chunk_size={self.chunk_size}) puts examples {row_span([rows.start, rows.stop])} "
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
            if checksums and file_digest(file) != entry.get(CHECKSUM):
                return f"{name} does not match its {CHECKSUM} checksum (its bytes changed after it was written)"
        return None

    def _layout_problems(self, *, checksums: bool) -> list[tuple[int | None, str]]:
        """Problems of the store's chunks as (chunk index or None for the manifest, text), cheapest first."""
        problems: list[tuple[int | None, str]] = []
        chunks = self.path / "chunks"
        if chunks.is_dir():
            beyond = sorted(int(p.name) for p in chunks.iterdir()
                            if CHUNK_NAME.match(p.name) and int(p.name) >= self.num_chunks)
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
            except ManifestProblem as e:
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
        lines = [StoreProblem(problem_line(i, text), chunk=i) for i, text in problems]
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
            for j, name in enumerate(self.block_names):
                stored = self._to_work(self._mapped(index, self._block_file(name), verify=False))
                if not bool(torch.isfinite(stored).all()):
                    return f"{self._block_file(name)} holds a NaN or infinite value"
                got = (stored.double() ** 2).sum(dim=1).numpy()
                if self.storage_dtype in ROUNDING:  # what rounding each entry to nearest can change, no more
                    allowed = norms_tolerance(sq[:, j], stored.shape[1], self.storage_dtype)
                else:  # the stored values are those whose squared norms were recorded: summation order only
                    tol = {"float64": 1e-9, "float32": 1e-4}[self.storage_dtype]
                    allowed = tol * np.abs(sq[:, j])
                off = np.abs(got - sq[:, j]) > allowed
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
            except ChunkProblem as e:
                raise self._chunk_error(index, str(e)) from None
            entry = (info or {}).get("files", {}).get(file)
            if info is not None and (not isinstance(entry, dict) or file_digest(path) != entry.get(CHECKSUM)):
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
            array = map_npy(path, shape, np.dtype(dtype))
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
        return DataInfError(problems_message(self.path, [(index, text)]))

    def _set_aside_bad_chunks(self) -> list[int]:
        """On resume: check every written chunk (checksums included) and move each bad one aside to
        ``chunks/.corrupt-NNNNN-<time>`` (logged, never deleted), so that it is computed again."""
        bad = []
        for i in range(self.num_chunks):
            if not self._chunk_dir(i).is_dir():
                continue
            try:
                problem = self._chunk_problem(i, checksums=True)
            except ManifestProblem as e:
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
            too_big = (g32.abs() > FLOAT16_MAX).any(dim=1)
            if bool(too_big.any()):
                k = rows.start + int(too_big.nonzero()[0])
                raise DataInfError(
                    f"store {self.path}: block '{name}', example {k} has gradient entries beyond float16's "
                    f"range (|x| > {FLOAT16_MAX:g}); create the store with dtype='bfloat16' or 'float32'"
                )
            stored = g32.to(torch.float16)
        else:
            stored = g32.to(torch.bfloat16)
        self._check_rounding(name, g32, stored, rows)
        if self.storage_dtype == "float16":
            return stored.numpy()
        return stored.view(torch.int16).numpy().view(np.uint16)

    def _check_rounding(self, name: str, g32: Tensor, stored: Tensor, rows: range) -> None:
        """Refuse a block of a chunk that its 16-bit storage dtype would lose, beyond rounding: entries that
        underflow to 0 or to imprecise subnormals (relative error of the block above MAX_STORAGE_ERROR)."""
        error, zeroed = storage_loss(g32, stored)
        if error > MAX_STORAGE_ERROR:
            raise DataInfError(
                f"store {self.path}: block '{name}' (examples {rows.start}..{rows.stop - 1}) underflows in "
                f"{self.storage_dtype}: {zeroed:.0%} of its nonzero entries would be stored as 0 (relative error "
                f"{error:.2g} of the block; its largest entry is {float(g32.abs().max()):.3g}); store it as "
                "float32 (--dtype float32, in a new --store directory)"
            )

    def _commit(self, index: int, arrays: Mapping[str, np.ndarray], sq: np.ndarray) -> None:
        """Write chunk ``index`` whole or not at all; a full disk is one clear refusal (the store stays
        resumable: the chunks written are kept, the half-written one is removed)."""
        try:
            self._write_chunk_files(index, arrays, sq)
        except OSError as e:
            if not disk_full(e):
                raise
            missing = self.missing_chunks()
            rows = sum(len(self.chunk_rows(c)) for c in missing)
            raise DataInfError(
                f"store {self.path}: the disk is full (writing chunk {index}; the {len(missing)} chunks left need "
                f"{_size(rows * self.bytes_per_example())}, the disk has "
                f"{_size(shutil.disk_usage(existing_ancestor(self.path)).free)} free); free some space and "
                f"rerun the same command: it keeps the chunks written ({self.num_chunks - len(missing)} of "
                f"{self.num_chunks}) and resumes"
            ) from None

    def _write_chunk_files(self, index: int, arrays: Mapping[str, np.ndarray], sq: np.ndarray) -> None:
        rows = self.chunk_rows(index)
        with atomic.new_directory(self._chunk_dir(index), fsync=True) as tmp:
            files = {}
            for name, array in arrays.items():
                files[self._block_file(name)] = save_npy(tmp / self._block_file(name), array)
            files["sq_norms.npy"] = save_npy(tmp / "sq_norms.npy", sq)
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
                # ASCII: no raw U+2028, U+0085, ... that a reader splitting lines on more than "\n" would break at
                lines.append(json.dumps(record, ensure_ascii=True, allow_nan=False))
            except (TypeError, ValueError, RecursionError) as e:
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
            where = f"store {self.path}: {RECORDS_FILE} line"
            out = [parse_json(line, f"{where} {n}", "rerun `datainf grads`")
                   for n, line in enumerate(json_lines(data.decode("utf-8")), start=1) if line.strip()]
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
            raise DataInfError(problems_message(self.path, problems))
        self.manifest = {**self.manifest, "complete": True}
        digest = getattr(self, "_records_digest", None)
        if digest is not None:
            self.manifest["records"] = digest
        atomic.write_json(self.path / "manifest.json", self.manifest, fsync=True)

    # ---------------------------------------------------------------- reading

    def _read_dtype(self, dtype: torch.dtype | str | None) -> torch.dtype:
        if dtype == AUTO:
            return torch.float64 if self.storage_dtype == "float64" else torch.float32
        out = TORCH_STORAGE[self.storage_dtype] if dtype is None else dtype
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
