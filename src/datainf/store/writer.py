"""Writing a store: :class:`StoreWriter` (create or resume under the writer's lock, write chunks, keep the
records, finalize, release)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from abc import abstractmethod
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from datainf import atomic
from datainf.errors import DataInfError, parse_json
from datainf.store.files import (
    CHECKSUM,
    FLOAT16_MAX,
    FORMAT_VERSION,
    MAX_STORAGE_ERROR,
    RECORDS_FILE,
    WRITER_LOCK,
    storage_loss,
)
from datainf.store.locking import acquire_lock, release_lock
from datainf.store.manifest import (
    ManifestProblem,
    check_spec,
    compare_manifests,
    problems_message,
    read_manifest,
)
from datainf.store.verify import StoreVerifier
from datainf.version import __version__

logger = logging.getLogger(__name__)
Writer = TypeVar("Writer", bound="StoreWriter")


class StoreWriter(StoreVerifier):
    """The writing side of :class:`datainf.store.GradientStore`."""

    _created: dict[str, bool] | None = None  # what create() made, for discard_if_unused()
    _records_digest: dict[str, Any] | None = None  # what write_records() wrote, for finalize()

    @classmethod
    def create(
        cls: type[Writer],
        path: str | os.PathLike[str],
        *,
        blocks: Mapping[str, tuple[int, ...]],
        n_examples: int,
        fingerprints: Mapping[str, str],
        chunk_size: int = 256,
        dtype: str = "float32",
        meta: Mapping[str, Any] | None = None,
        projection: Mapping[str, Any] | None = None,
    ) -> Writer:
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
    def join(cls: type[Writer], path: str | os.PathLike[str], lock_token: str) -> Writer:
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

    @property
    def writable(self) -> bool:
        """Whether this store object may write (opened with :meth:`create` or :meth:`join`, not closed)."""
        return bool(self._writable)

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

    def __enter__(self: Writer) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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

    # ---------------------------------------------------------------- chunks

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

    @abstractmethod
    def _commit(self, index: int, arrays: Mapping[str, np.ndarray], sq: np.ndarray) -> None:
        """Write chunk ``index`` (its blocks' storage arrays and its squared norms) whole or not at all. (The
        disk access itself: :class:`datainf.store.GradientStore`.)"""

    # ---------------------------------------------------------------- records, finishing

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
        needed = [self.block_file(n) for n in self.block_names] + ["sq_norms.npy"]
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
        if self._records_digest is not None:
            self.manifest["records"] = self._records_digest
        atomic.write_json(self.path / "manifest.json", self.manifest, fsync=True)
