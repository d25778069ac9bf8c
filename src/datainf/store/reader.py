"""Reading a store: :class:`StoreReader` (open it, its blocks as row sources, squared norms, records) and the
reading API that :class:`~datainf.store.blocks.StoredBlock` uses (:meth:`~StoreReader.block_file`,
:meth:`~StoreReader.checked_file`, :meth:`~StoreReader.mapped`, :meth:`~StoreReader.sq_norms_table`)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Sequence
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

#: how many memory-mapped chunk files this process keeps across store objects (:func:`cached_map`), so that a
#: second pass in the same process (a long-lived ``explain`` or API session) re-maps none of them. 0 (the
#: default): keep none, because kept maps hold the store in the process's address space and resident memory,
#: which a memory cap (``ulimit -v``, a container's limit) counts, while the measured gain is small (about 7%
#: of a warm pass's CPU, docs/benchmarks.md); a session with the memory to spare may raise it (below Linux's
#: 65,530 maps per process).
MAX_CACHED_MAPS = 0
_MAPS: OrderedDict[str, tuple[list[int], np.ndarray]] = OrderedDict()
_MAPS_LOCK = threading.Lock()


def cached_map(path: str, stamp: list[int]) -> np.ndarray | None:
    """The map of the chunk file at ``path`` this process kept, when the file's stamp (size, mtime, ctime,
    inode, device: :func:`~datainf.store.files.file_stamp`) is still ``stamp``; only files whose sha256 was
    checked (or whose verified record matched) are kept, so a hit is a verified, unchanged file."""
    with _MAPS_LOCK:
        entry = _MAPS.get(path)
        if entry is None:
            return None
        if entry[0] != stamp:
            del _MAPS[path]  # the file changed: its old map must not be used again
            return None
        _MAPS.move_to_end(path)
        return entry[1]


def keep_map(path: str, stamp: list[int], array: np.ndarray) -> None:
    """Keep ``array``, the map of the verified chunk file at ``path`` with ``stamp``, for :func:`cached_map`
    (the least recently used one is dropped beyond :data:`MAX_CACHED_MAPS`)."""
    if MAX_CACHED_MAPS <= 0:
        return
    with _MAPS_LOCK:
        _MAPS[path] = (stamp, array)
        _MAPS.move_to_end(path)
        while len(_MAPS) > MAX_CACHED_MAPS:
            _MAPS.popitem(last=False)


def forget_maps() -> None:
    """Drop every map :func:`keep_map` kept (tests; a process that wants the address space back)."""
    with _MAPS_LOCK:
        _MAPS.clear()


class _ReadAhead:
    """Background threads running a store's read-ahead jobs, taken in the order they were submitted; a job is
    waited for by its ticket (one condition for all, not a Future and its lock per job: at one job per 1 MB
    chunk file, a ThreadPoolExecutor's per-job bookkeeping cost as much as the job). ``threads`` > 1 lets jobs
    that hash (a store's first read: sha256 releases the interpreter lock) run on several cores at once."""

    def __init__(self, threads: int = 1) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Condition()
        self._finished: set[int] = set()  # tickets of the jobs finished
        self._submitted = 0
        self._errors: dict[int, BaseException] = {}
        self._threads = max(1, threads)
        for _ in range(self._threads):
            threading.Thread(target=self._run, name="datainf-store-read", daemon=True).start()

    def submit(self, job: Callable[..., Any], *args: Any) -> int:
        """Queue ``job(*args)``; returns its ticket for :meth:`wait`."""
        self._submitted += 1
        self._jobs.put((self._submitted, job, args))
        return self._submitted

    def wait(self, ticket: int) -> None:
        """Wait for job ``ticket`` to finish; raise what it raised."""
        with self._done:
            while ticket not in self._finished:
                self._done.wait()
        error = self._errors.pop(ticket, None)
        if error is not None:
            raise error

    def shutdown(self) -> None:
        for _ in range(self._threads):
            self._jobs.put(None)

    def _run(self) -> None:
        while (item := self._jobs.get()) is not None:
            ticket, job, args = item
            del item
            try:
                job(*args)
            except BaseException as e:  # noqa: BLE001  (raised to whoever waits for this job)
                self._errors[ticket] = e
            del job, args
            with self._done:
                self._finished.add(ticket)
                self._done.notify_all()


#: the most background threads a store's read-ahead uses (one per torch thread up to this): more than one only
#: helps while files are hashed (a first read), which is bound by sha256 on each core
MAX_READ_AHEAD_THREADS = 4


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

    def _await_fetch(self, key: tuple[int, str]) -> None:
        """Wait for the background read :meth:`prefetch` started for ``key`` (chunk, file), if any, and raise
        what it found."""
        ticket = self._fetching.pop(key, None)
        if ticket is not None:
            self._reader.wait(ticket)
            error = self._fetch_errors.pop(key, None)  # this file's, from a batch (prefetch_chunk)
            if error is not None:
                raise error

    def _file_path(self, index: int, file: str) -> str:
        """The path of ``file`` of chunk ``index`` as a string (built without pathlib: this is on the pass's
        path, once per file)."""
        folder = self._chunk_dirs.get(index)
        if folder is None:
            folder = self._chunk_dirs[index] = str(self._chunk_dir(index))
        return os.path.join(folder, file)

    def _missing_file(self, index: int, file: str) -> DataInfError:
        """The refusal of a chunk file that is not there (its chunk folder is, or is not written yet)."""
        rows = self.chunk_rows(index)
        if self._chunk_dir(index).is_dir():
            return self._chunk_error(index, f"lacks {file}")
        return DataInfError(
            f"chunk {index} (examples {rows.start}..{rows.stop - 1}) of store {self.path} is not "
            "written yet; finish computing the store (rerun the same command to resume)"
        )

    def checked_file(self, index: int, file: str, *, verify: bool | None = None) -> Path:
        """The path of a file of chunk ``index``, refused when it is missing and, the first time this object
        touches it and ``checksums`` is on (or ``verify``), when its bytes do not match their sha256 (see
        :meth:`_verify`). Waits for the background read :meth:`prefetch` started for it, if any, and raises
        what that found."""
        return Path(self.check_file(index, file, verify=verify))

    def check_file(self, index: int, file: str, *, verify: bool | None = None) -> str:
        """:meth:`checked_file` returning the path as a string (no ``Path`` built: a pass asks this of every
        chunk file)."""
        self._await_fetch((index, file))
        path = self._file_path(index, file)
        try:
            before = os.stat(path)
        except FileNotFoundError:
            raise self._missing_file(index, file) from None
        verify = self.checksums if verify is None else verify
        if verify and (index, file) not in self._verified:
            self._verify(index, file, path, before)
        return path

    def _verify(self, index: int, file: str, path: Path | str, before: os.stat_result | None = None,
                digest: Callable[[], str] | None = None) -> bool:
        """Check ``file`` of chunk ``index`` against the sha256 its chunk.json records (refused, named, when it
        does not match); returns whether it read the file to do so. A file whose verified stamp (its size,
        mtime, ctime, inode and device, and the sha256 it matched, :data:`~datainf.store.files.VERIFIED_DIR`)
        is unchanged since an earlier check is trusted without reading it; any write to the file changes its
        ctime, so the stamp then no longer matches and the bytes are hashed again. A check is recorded once every
        file of the chunk has one (:meth:`save_verified`), and only for files last changed more than
        ``STAMP_MARGIN_S`` before the check. ``before``: the file's stat, when the caller has it; ``digest``: the
        sha256 of the bytes the caller read (its own read, hashed: no second read of the file), else the file's."""
        try:
            info = self._read_chunk_manifest(index)
        except ChunkProblem as e:
            raise self._chunk_error(index, str(e)) from None
        if info is None:  # an old store without checksums: nothing to check
            self._verified.add((index, file))
            return False
        entry = info.get("files", {}).get(file)
        expected = entry.get(CHECKSUM) if isinstance(entry, dict) else None
        before = os.stat(path) if before is None else before
        stamp = [*file_stamp(before), expected]
        if expected is not None and self._recorded(index).get(file) == stamp:
            self._verified.add((index, file))
            return False
        started = time.time_ns()
        if expected is None or (file_digest(path) if digest is None else digest()) != expected:
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

    def recorded_file(self, name: str) -> list | None:
        """The verified stamp recorded for the store's own file ``name`` (a fitted-state cache beside the
        chunks): its size, mtime, ctime, inode, device and the checksum it matched; None when there is none or
        it is unreadable."""
        try:
            data = json.loads((self.path / VERIFIED_DIR / f"{name}.json").read_bytes())
            return list(data["stamp"]) if data.get("file") == name else None
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None

    def note_verified_file(self, name: str, stamp: list) -> None:
        """Keep the new verified stamp of the store's own file ``name`` (see :meth:`recorded_file`), written by
        :meth:`save_verified` once the call succeeded."""
        self._unsaved_files[name] = stamp

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
        for name, stamp in sorted(self._unsaved_files.items()):
            try:
                atomic.write_json(self.path / VERIFIED_DIR / f"{name}.json",
                                  {"format": "datainf-verified", "file": name, "stamp": stamp})
            except OSError as e:
                logger.debug("store %s: verified stamp of %s not recorded (%s)", self.path, name, e)
                break
        self._unsaved_files.clear()
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
            self._reader = _ReadAhead(max(1, min(torch.get_num_threads(), MAX_READ_AHEAD_THREADS)))
            weakref.finalize(self, self._reader.shutdown)
        self._fetching[key] = self._reader.submit(self._fetch, index, file)

    def prefetch_chunk(self, index: int, files: Sequence[str], *, verify: bool = True) -> None:
        """:meth:`prefetch` of several files of chunk ``index`` as one background job (a pass over every block
        asks for a whole chunk folder at a time: one job and one wake-up per folder instead of per file); what
        the job finds about each file is raised by :meth:`checked_file` / :meth:`mapped` of that file.
        ``verify=False``: the job only asks the kernel to read the files ahead, leaving their sha256 to the read
        that uses them (a pass whose workers hash what they read, :meth:`read_rows`)."""
        keys = [(index, f) for f in files if (index, f) not in self._fetching]
        if not keys:
            return
        if (not verify or self._checks_without_hashing(index, keys)) and self._in_page_cache(index, [f for _, f in keys]):
            return  # nothing to read ahead (a warm pass: the job would only cost its thread's time)
        if self._reader is None:
            self._reader = _ReadAhead(max(1, min(torch.get_num_threads(), MAX_READ_AHEAD_THREADS)))
            weakref.finalize(self, self._reader.shutdown)
        ticket = self._reader.submit(self._fetch_each, keys, verify)
        for key in keys:
            self._fetching[key] = ticket

    def _checks_without_hashing(self, index: int, keys: list[tuple[int, str]]) -> bool:
        """Whether the first read of each of these files needs no sha256 pass (checked already by this object,
        checksums off, or a verified stamp recorded for it: comparing the stamp is a ``stat``)."""
        if not self.checksums:
            return True
        recorded = self._recorded(index)
        return all(key in self._verified or key[1] in recorded for key in keys)

    def _in_page_cache(self, index: int, files: Sequence[str]) -> bool:
        """Whether the first, middle and last of ``files`` (of chunk ``index``) are in the page cache, probed with
        a one-byte ``pread`` at the middle and the end of each that may not wait for the disk
        (``RWF_NOWAIT``); False where that is not supported or a file cannot be read (its read says why)."""
        flag = getattr(os, "RWF_NOWAIT", None)
        if flag is None or not files:
            return False
        byte = bytearray(1)
        for file in {files[0], files[len(files) // 2], files[-1]}:
            try:
                fd = os.open(self._file_path(index, file), os.O_RDONLY)
            except OSError:
                return False
            try:
                size = os.fstat(fd).st_size
                for offset in (size // 2, size - 1):
                    if offset >= 0 and os.preadv(fd, [byte], offset, flag) != 1:
                        return False
            except OSError:  # BlockingIOError: those bytes are not in memory
                return False
            finally:
                os.close(fd)
        return True

    def _fetch_each(self, keys: list[tuple[int, str]], verify: bool = True) -> None:
        for index, file in keys:
            try:
                self._fetch(index, file, verify)
            except BaseException as e:  # noqa: BLE001  (raised to whoever reads that file)
                self._fetch_errors[(index, file)] = e

    def _fetch(self, index: int, file: str, verify: bool = True) -> None:
        path = self._file_path(index, file)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return  # checked_file names what is missing
        try:
            if verify and self.checksums and (index, file) not in self._verified and self._verify(
                    index, file, Path(path), os.fstat(fd)):
                return
            if hasattr(os, "posix_fadvise"):
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
            # held block by block ((n_blocks, n) in memory, its transpose returned): each block's column is
            # contiguous, so the per-block reads of a pass (norms, their largest, finiteness) run at full speed
            table = torch.empty(len(self.block_names), self.n_examples, dtype=torch.float64).T
            rows = table.numpy()
            for i in range(self.num_chunks):  # each chunk's table copied once, straight into its rows
                if not self._chunk_dir(i).is_dir():
                    raise DataInfError(f"store {self.path}: chunk {i} is not written yet; finish computing the store")
                span = self.chunk_rows(i)
                rows[span.start : span.stop] = self.mapped(i, "sq_norms.npy")
            if self.complete and not self._writable:
                self._sq_table = table
        return table

    def sq_norms(self) -> dict[str, Tensor]:
        """Squared gradient norm of every example per block, name -> float64 tensor (n_examples,), computed
        from the float32 values before any down-cast to the storage dtype."""
        sq = self.sq_norms_table()
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
