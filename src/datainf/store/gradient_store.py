"""The store itself: :class:`GradientStore`, composed from its concerns (``layout``: where everything lies;
``reader``: open, blocks, squared norms, records; ``verify``: check everything; ``writer``: create or resume,
write chunks, finalize), and the disk access they share, here: the free space a store needs, a chunk's files
written whole or not at all, a chunk file memory-mapped back."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from datainf import atomic
from datainf.errors import DataInfError
from datainf.store import reader as _reader
from datainf.store.files import (
    CHECKSUM,
    CHUNK_MANIFEST,
    STAMP_MARGIN_S,
    file_stamp,
    map_npy,
    npy_data_offset,
    save_npy,
)
from datainf.store.reader import cached_map, keep_map
from datainf.store.writer import StoreWriter


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


class GradientStore(StoreWriter):
    """A directory of per-example gradients (see the package docstring for the layout): open one with
    :meth:`open` (read-only) or :meth:`create` (to write it, or resume writing it).

    Attributes: ``path``, ``manifest`` (the parsed manifest.json), ``n_examples``, ``chunk_size``,
    ``num_chunks``, ``block_names`` (in order), ``block_shapes`` (name -> per-example shape),
    ``storage_dtype`` ("float32", "float16", "bfloat16" or "float64"), ``fingerprints``, ``complete``.

    Its methods, by concern: :class:`~datainf.store.layout.StoreLayout` (chunks, rows, files),
    :class:`~datainf.store.reader.StoreReader` (reading), :class:`~datainf.store.verify.StoreVerifier`
    (:meth:`verify`), :class:`~datainf.store.writer.StoreWriter` (writing); this class adds the disk access.
    """

    # ---------------------------------------------------------------- free space

    def check_free_space(self, chunks: Iterable[int]) -> None:
        """Refuse, before anything is computed, to write ``chunks`` onto a disk without room for them (a store
        that fills its disk half-way would stop hours in, and leave the disk full for everything else)."""
        rows = sum(len(self.chunk_rows(c)) for c in chunks)
        require_free_space(self.path, rows * self.bytes_per_example(),
                           f"store {self.path}: {rows:,} examples x {_size(self.bytes_per_example())} each",
                           "store float16/bfloat16 (--dtype), or store projected gradients (datainf grads "
                           "--project K; ProjectionSettings in the API)")

    # ---------------------------------------------------------------- reading a chunk file

    def _open_chunk_file(self, index: int, file: str) -> tuple[int, str, tuple[int, int], str]:
        """(open fd, path, the shape and numpy dtype str the file must hold) of a file of chunk ``index``, once the
        background read's check of it (and what it found) is in; a missing file refused by name."""
        self._await_fetch((index, file))
        path = self._file_path(index, file)
        shape, dtype = self._expected_file(index, file)
        try:
            return os.open(path, os.O_RDONLY), path, shape, dtype
        except FileNotFoundError:
            raise self._missing_file(index, file) from None

    def mapped(self, index: int, file: str, *, verify: bool | None = None) -> np.ndarray:
        """A file of chunk ``index``, memory-mapped, checked against what the chunk must hold (and, the
        first time this object reads it and ``checksums`` is on, against its sha256): see
        :meth:`StoreReader.mapped <datainf.store.reader.StoreReader.mapped>`."""
        key = (index, file)
        verify = self.checksums if verify is None else verify
        fd, path, shape, dtype = self._open_chunk_file(index, file)
        try:
            st = os.fstat(fd)
            stamp = file_stamp(st)
            array = cached_map(path, stamp)  # kept by an earlier verified read in this process, file unchanged
            if array is not None:
                self._verified.add(key)
            else:
                if verify and key not in self._verified:
                    self._verify(index, file, Path(path), st)
                # the header this store wrote is parsed by hand and the data mapped directly (np.load's header
                # parsing and np.memmap cost more than reading a small chunk file); np.load is the fallback
                array = map_npy(path, shape, np.dtype(dtype), fd=fd, size=st.st_size)
                if array is None:
                    array = np.load(path, mmap_mode="r", allow_pickle=False)
                elif verify and st.st_ctime_ns < time.time_ns() - int(STAMP_MARGIN_S * 1e9):
                    keep_map(path, stamp, array)  # verified and settled (see StoreReader._verify)
        except DataInfError:
            raise  # the file's check refused it, by name
        except (OSError, ValueError, EOFError) as e:
            if isinstance(e, OSError) and e.errno == errno.ENOMEM:
                raise  # the memory map was refused (address space or memory exhausted): not a bad chunk
            reason = (str(e).splitlines() or [type(e).__name__])[0][:120]
            raise self._chunk_error(index, f"{file} is unreadable ({reason})") from None
        finally:
            os.close(fd)
        if tuple(array.shape) != shape or array.dtype.str != dtype:
            raise self._chunk_error(index, f"{file} holds {array.dtype.str} {tuple(array.shape)}, expected {dtype} {shape}")
        return array

    def read_rows(self, index: int, file: str, start: int, stop: int, staging: Tensor | np.ndarray
                  ) -> np.ndarray | None:
        """Rows ``start:stop`` (of the chunk's own rows) of a file of chunk ``index``, read with one ``pread``
        into the first bytes of ``staging`` (a contiguous CPU tensor or numpy array of at least that many bytes; a
        uint8 array is used as it is, saving a view per call) and returned
        as a numpy view of it, (stop - start, d) in the storage dtype; checked as :meth:`mapped` checks (the
        file's sha256 the first time this object touches it with ``checksums`` on; its header against the shape
        and dtype the chunk must hold). None when the file's header is not one this store writes, or when this
        process keeps its maps (:data:`datainf.store.reader.MAX_CACHED_MAPS`): read it with :meth:`mapped`.
        Unlike a memory map, reads from several threads at once scale: a map's page-table set-up serializes on
        the process's address-space lock. A file not yet checked (and without a verified stamp) is read whole into
        ``staging`` when it fits, hashed there and its rows taken from those bytes: the bytes scored are the bytes
        checked, and the file is read once, by the thread that uses it."""
        if _reader.MAX_CACHED_MAPS > 0:
            return None
        key = (index, file)
        fd, path, shape, dtype_str = self._open_chunk_file(index, file)
        dtype = np.dtype(dtype_str)
        try:
            st = os.fstat(fd)
            buffer = staging if isinstance(staging, np.ndarray) and staging.dtype == np.uint8 else (
                torch.as_tensor(staging).view(torch.uint8).numpy())
            whole = 0  # bytes of the whole file read into the staging buffer (to hash them) on its first read
            if self.checksums and key not in self._verified:
                def digest() -> str:  # the file read once, whole, into the staging buffer and hashed there
                    nonlocal whole
                    whole = os.preadv(fd, [buffer[: st.st_size]], 0)
                    return hashlib.sha256(buffer[:whole]).hexdigest()

                self._verify(index, file, path, st, digest=digest if st.st_size <= buffer.nbytes else None)
            rows, row_bytes = stop - start, shape[1] * dtype.itemsize
            if not whole and self.checksums and self.has_checksums and key in self._verified:
                # its bytes matched the sha256 recorded when this store wrote it (now or by an unchanged
                # verified stamp), so its header is the one written for this shape and dtype: no read of it
                offset = st.st_size - shape[0] * row_bytes
            else:
                offset = npy_data_offset(fd, st.st_size, shape, dtype)
            if offset is None:
                return None
            first = offset + start * row_bytes
            if whole:  # the rows are in the bytes just hashed
                if first + rows * row_bytes > whole:
                    raise self._chunk_error(index, f"{file} is shorter than its header says")
                return buffer[first : first + rows * row_bytes].view(dtype).reshape(rows, shape[1])
            out = buffer[: rows * row_bytes]
            if os.preadv(fd, [out], first) != rows * row_bytes:
                raise self._chunk_error(index, f"{file} is shorter than its header says")
        except DataInfError:
            raise
        except (OSError, ValueError) as e:
            reason = (str(e).splitlines() or [type(e).__name__])[0][:120]
            raise self._chunk_error(index, f"{file} is unreadable ({reason})") from None
        finally:
            os.close(fd)
        return out.view(dtype).reshape(rows, shape[1])

    # ---------------------------------------------------------------- writing a chunk's files

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
        """The chunk's folder, staged and renamed into place: one .npy file per block, sq_norms.npy, and the
        chunk.json recording each file's size, shape, dtype and sha256."""
        rows = self.chunk_rows(index)
        with atomic.new_directory(self._chunk_dir(index), fsync=True) as tmp:
            files = {}
            for name, array in arrays.items():
                files[self.block_file(name)] = save_npy(tmp / self.block_file(name), array)
            files["sq_norms.npy"] = save_npy(tmp / "sq_norms.npy", sq)
            info = {"format": "datainf-chunk", "chunk": index, "rows": [rows.start, rows.stop],
                    "checksum": CHECKSUM, "files": files}
            (tmp / CHUNK_MANIFEST).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
