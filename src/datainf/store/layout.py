"""What a store's folder holds and where: :class:`StoreLayout` (the manifest's attributes, the chunks and their
rows, the files each chunk must hold) and the cheap checks of a written chunk against its chunk.json."""

from __future__ import annotations

import math
import os
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from datainf.errors import DataInfError, parse_json
from datainf.store.files import CHECKSUM, CHUNK_MANIFEST, CHUNK_NAME, NUMPY_STORAGE, file_digest, npy_header
from datainf.store.locking import release_lock
from datainf.store.manifest import (
    ChunkProblem,
    ManifestProblem,
    problems_message,
    row_span,
    validate_manifest,
)
from datainf.store.metadata import StoreMeta


class StoreLayout:
    """A store's layout, read from its manifest: the base of :class:`datainf.store.GradientStore`.

    Attributes: ``path``, ``manifest`` (the parsed manifest.json), ``n_examples``, ``chunk_size``,
    ``num_chunks``, ``block_names`` (in order), ``block_shapes`` (name -> per-example shape),
    ``storage_dtype`` ("float32", "float16", "bfloat16" or "float64"), ``fingerprints``, ``complete``,
    ``checksums`` (whether reads check each chunk file's sha256 the first time they touch it).
    """

    def __init__(self, path: Path, manifest: dict[str, Any], *, writable: bool, lock_token: str | None = None,
                 checksums: bool = True):
        """Use :meth:`GradientStore.create` or :meth:`GradientStore.open`."""
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
        self._stamps: dict[int, dict[str, list]] = {}  # chunk -> file -> its verified stamp (recorded or new)
        self._unsaved: dict[int, list[str]] = {}  # chunks with new stamps not recorded yet -> their files
        self._unsaved_files: dict[str, list] = {}  # the store's own files (fitted states) -> new stamp to record
        self._fetching: dict[tuple[int, str], Any] = {}  # (chunk, file) -> the background read started for it
        self._reader: Any = None  # the thread pool of those reads, started on the first
        self._fetch_errors: dict[tuple[int, str], BaseException] = {}  # what a batch of those reads found
        self._chunk_info: dict[int, dict[str, Any] | None] = {}
        self._chunk_dirs: dict[int, str] = {}  # chunk -> its folder's path as a string (the pass's hot path)
        self._file_columns: dict[str, tuple[int, str]] | None = None  # file -> (entries per row, numpy dtype str)
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
    def metadata(self) -> StoreMeta:
        """What the manifest says about the gradients (task, labels, collation, dropped rows, ...), typed."""
        return StoreMeta.read(self.manifest.get("meta"), f"store {self.path}")

    @property
    def projection(self) -> dict[str, Any] | None:
        """How the gradients were projected (dim, seed, kind, blocks), or None for full gradients."""
        return self.manifest.get("projection")

    def __repr__(self) -> str:
        done = self.num_chunks - len(self.missing_chunks())
        return (
            f"{type(self).__name__}({str(self.path)!r}, n_examples={self.n_examples}, "
            f"blocks={len(self.block_names)}, dtype={self.storage_dtype}, chunks {done}/{self.num_chunks})"
        )

    # ---------------------------------------------------------------- where things lie

    def _chunk_dir(self, index: int) -> Path:
        return self.path / "chunks" / f"{index:05d}"

    def block_file(self, name: str) -> str:
        """The name of block ``name``'s file inside every chunk folder (``bNNNN.npy``, by its position)."""
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

    # ---------------------------------------------------------------- what a chunk must hold

    def _expected_files(self, index: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """File name -> (shape, numpy dtype str) of what chunk ``index`` must hold."""
        rows = len(self.chunk_rows(index))
        return {file: ((rows, columns), dtype) for file, (columns, dtype) in self._file_table().items()}

    def _expected_file(self, index: int, file: str) -> tuple[tuple[int, int], str]:
        """(shape, numpy dtype str) of one file of chunk ``index`` (what :meth:`_expected_files` lists, without
        building the chunk's whole table: this is on the streaming read's path, once per file)."""
        rows = len(self.chunk_rows(index))
        found = self._file_table().get(file)
        if found is None:
            raise DataInfError(f"store {self.path}: chunk {index} has no file {file!r}")
        return (rows, found[0]), found[1]

    def _file_table(self) -> dict[str, tuple[int, str]]:
        """Every chunk's file name -> (entries per row, numpy dtype str): its blocks in order, then sq_norms.npy;
        built once per object."""
        if self._file_columns is None:
            storage = np.dtype(NUMPY_STORAGE[self.storage_dtype]).str
            table = {self.block_file(name): (math.prod(self.block_shapes[name]), storage) for name in self.block_names}
            table["sq_norms.npy"] = (len(self.block_names), np.dtype(np.float64).str)
            self._file_columns = table
        return self._file_columns

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

    def _chunk_error(self, index: int, text: str) -> DataInfError:
        return DataInfError(problems_message(self.path, [(index, text)]))

    # ---------------------------------------------------------------- whether it does

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
        try:  # the folder listed once (names and types), each file's size by one stat: no Path per file
            present = {e.name: e for e in os.scandir(folder)}
        except OSError:
            present = {}
        for name, (shape, dtype) in expected.items():
            entry = files[name]
            if not isinstance(entry, dict) or (list(shape), dtype) != (entry.get("shape"), entry.get("dtype")):
                return f"{name} was written as {entry.get('dtype')} {entry.get('shape')}, expected {dtype} {list(shape)}"
            found = present.get(name)
            if found is None or not found.is_file():
                return f"lacks {name}"
            size = found.stat().st_size
            if size != entry.get("bytes"):
                return f"{name} has {size} bytes, {entry.get('bytes')} when it was written (truncated or overwritten)"
            if checksums and file_digest(folder / name) != entry.get(CHECKSUM):
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
