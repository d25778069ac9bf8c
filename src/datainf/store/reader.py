"""Reading a store: :class:`StoreReader` (open it, its blocks as row sources, squared norms, records) and the
reading API that :class:`~datainf.store.blocks.StoredBlock` uses (:meth:`~StoreReader.block_file`,
:meth:`~StoreReader.checked_file`, :meth:`~StoreReader.mapped`, :meth:`~StoreReader.sq_norms_table`)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import weakref
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from datainf import atomic
from datainf.errors import DataInfError, json_lines, parse_json
from datainf.store.blocks import StoredBlock
from datainf.store.files import (
    AUTO,
    CHECKSUM,
    RECORDS_FILE,
    STAMP_MARGIN_S,
    TORCH_STORAGE,
    VERIFIED_DIR,
    file_digest,
    file_stamp,
)
from datainf.store.layout import StoreLayout
from datainf.store.manifest import ChunkProblem, problems_message, read_manifest

logger = logging.getLogger(__name__)
Reader = TypeVar("Reader", bound="StoreReader")


class StoreReader(StoreLayout, ABC):
    """The reading side of :class:`datainf.store.GradientStore`."""

    _sq_table: Tensor | None = None  # the squared norms, read once per object of a complete store

    @classmethod
    def open(cls: type[Reader], path: str | os.PathLike[str], *, allow_incomplete: bool = False,
             checksums: bool = True) -> Reader:
        """Open a store read-only (no lock). Refuses an unfinished store unless ``allow_incomplete``.

        Every chunk is checked cheaply (see the module docstring); a bad one is refused by name.
        ``checksums=False`` skips the sha256 check of each chunk file on its first read.
        """
        path = Path(path)
        store = cls(path, read_manifest(path), writable=False, checksums=checksums)
        store._refuse_unreadable(allow_incomplete)
        return store

    def _refuse_unreadable(self, allow_incomplete: bool) -> None:
        """What :meth:`open` refuses: a chunk that is not what the manifest and its chunk.json say, and an
        unfinished store unless ``allow_incomplete``."""
        problems = self._layout_problems(checksums=False)
        if problems:
            raise DataInfError(problems_message(self.path, problems))
        if not self.has_checksums:
            logger.warning("store %s was written by an older datainf, without chunk checksums: only sizes and "
                           "shapes are checked; recompute it in a new --store directory to get them", self.path)
        if not self.complete and not allow_incomplete:
            missing = self.missing_chunks()
            raise DataInfError(
                f"store {self.path} is incomplete ({self.num_chunks - len(missing)} of {self.num_chunks} chunks "
                "written, not finalized); rerun the command that computes it to resume and finish it (`datainf "
                "grads` with the same arguments, or Attributor.fit with the same data)"
            )

    # ---------------------------------------------------------------- chunk files

    def checked_file(self, index: int, file: str, *, verify: bool | None = None) -> Path:
        """The path of a file of chunk ``index``, refused when it is missing and, the first time this object
        touches it and ``checksums`` is on (or ``verify``), when its bytes do not match their sha256 (see
        :meth:`_verify`). Waits for the background read :meth:`prefetch` started for it, if any, and raises
        what that found."""
        fetching = self._fetching.pop((index, file), None)
        if fetching is not None:
            fetching.result()
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
            self._verify(index, file, path)
        return path

    def _verify(self, index: int, file: str, path: Path) -> bool:
        """Check ``file`` of chunk ``index`` against the sha256 its chunk.json records (refused, named, when it
        does not match); returns whether it read the file to do so. A file whose verified stamp (its size,
        mtime, ctime, inode and device, and the sha256 it matched, :data:`~datainf.store.files.VERIFIED_DIR`)
        is unchanged since an earlier check is trusted without reading it; any write to the file changes its
        ctime, so the stamp then no longer matches and the bytes are hashed again. A check is recorded once every
        file of the chunk has one (:meth:`save_verified`), and only for files last changed more than
        ``STAMP_MARGIN_S`` before the check."""
        try:
            info = self._read_chunk_manifest(index)
        except ChunkProblem as e:
            raise self._chunk_error(index, str(e)) from None
        if info is None:  # an old store without checksums: nothing to check
            self._verified.add((index, file))
            return False
        entry = info.get("files", {}).get(file)
        expected = entry.get(CHECKSUM) if isinstance(entry, dict) else None
        before = os.stat(path)
        stamp = [*file_stamp(before), expected]
        if expected is not None and self._recorded(index).get(file) == stamp:
            self._verified.add((index, file))
            return False
        started = time.time_ns()
        if expected is None or file_digest(path) != expected:
            raise self._chunk_error(
                index, f"{file} does not match its {CHECKSUM} checksum (its bytes changed after it was written)")
        self._verified.add((index, file))
        settled = before.st_ctime_ns < started - int(STAMP_MARGIN_S * 1e9)
        if settled and file_stamp(os.stat(path)) == stamp[:-1]:
            self._record(index, info, file, stamp)
        return True

    def _stamp_file(self, index: int) -> Path:
        return self.path / VERIFIED_DIR / f"{index:05d}.json"

    def _recorded(self, index: int) -> dict[str, list]:
        """The verified stamps recorded for chunk ``index`` (file -> stamp), read once; an unreadable record is
        no record (its files are hashed again)."""
        stamps = self._stamps.get(index)
        if stamps is None:
            try:
                data = json.loads(self._stamp_file(index).read_bytes())
                stamps = dict(data["files"]) if data.get("chunk") == index else {}
            except (OSError, ValueError, TypeError, KeyError, AttributeError):
                stamps = {}
            self._stamps[index] = stamps
        return stamps

    def _record(self, index: int, info: dict[str, Any], file: str, stamp: list) -> None:
        """Keep ``file``'s new verified stamp in memory, for :meth:`save_verified`."""
        self._recorded(index)[file] = stamp
        self._unsaved[index] = sorted(info["files"])

    def save_verified(self) -> int:
        """Record the checks this object made (see :meth:`_verify`) for every chunk all of whose files now have
        a stamp, each chunk's record written atomically into the store's ``verified/`` folder; returns how many
        chunks were recorded. Scoring calls it once its scores came out right, so a refused command leaves the
        store as it was; a store on a read-only disk keeps no record (its files are hashed on every first read)."""
        saved = 0
        for index, files in sorted(self._unsaved.items()):
            stamps = self._recorded(index)
            if not set(files) <= set(stamps):
                continue
            try:
                atomic.write_json(self._stamp_file(index), {"format": "datainf-verified", "chunk": index,
                                                            "files": {f: stamps[f] for f in files}})
                saved += 1
            except OSError as e:
                logger.debug("store %s: verified stamps of chunk %d not recorded (%s)", self.path, index, e)
                break
        self._unsaved.clear()
        return saved

    def prefetch(self, index: int, file: str) -> None:
        """Start reading ``file`` of chunk ``index`` in a background thread (one per store object), so that it
        is read while the caller computes on the files before it: its sha256 checked if it needs one (hashing
        reads it into the page cache; hashlib releases the GIL), else the kernel asked to read it ahead
        (``posix_fadvise(WILLNEED)``). :meth:`checked_file` waits for it and raises what it found."""
        key = (index, file)
        if key in self._fetching or (key in self._verified and not hasattr(os, "posix_fadvise")):
            return
        if self._reader is None:
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="datainf-store-read")
            weakref.finalize(self, self._reader.shutdown, wait=False, cancel_futures=True)
        self._fetching[key] = self._reader.submit(self._fetch, index, file)

    def _fetch(self, index: int, file: str) -> None:
        path = self._chunk_dir(index) / file
        if not path.is_file():
            return  # checked_file names what is missing
        if self.checksums and (index, file) not in self._verified and self._verify(index, file, path):
            return
        if hasattr(os, "posix_fadvise"):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    @abstractmethod
    def mapped(self, index: int, file: str, *, verify: bool | None = None) -> np.ndarray:
        """A file of chunk ``index`` (:meth:`block_file` or ``"sq_norms.npy"``), memory-mapped: (rows of the
        chunk, d) in the storage dtype, checked as :meth:`checked_file` checks it and against the shape and
        dtype the chunk must hold. (The disk access itself: :class:`datainf.store.GradientStore`.)"""

    # ---------------------------------------------------------------- blocks

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

    # ---------------------------------------------------------------- squared norms

    def sq_norms_table(self) -> Tensor:
        """All blocks' squared norms as one float64 (n_examples, n_blocks) table, columns in ``block_names``
        order, read once per store object (complete stores only: the table of an unfinished store would go
        stale)."""
        table = self._sq_table
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
            parts.append(np.array(self.mapped(i, "sq_norms.npy")))
        sq = torch.from_numpy(np.concatenate(parts, axis=0))
        return {name: sq[:, j].clone() for j, name in enumerate(self.block_names)}

    # ---------------------------------------------------------------- records

    def records(self) -> list[dict[str, Any]] | None:
        """The examples kept by :meth:`GradientStore.write_records` (None if the store has none), one per row."""
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
