"""The files of a store: names, storage dtypes, and the .npy helpers (write one with its sha256, read a header,
memory-map one)."""

from __future__ import annotations

import hashlib
import io
import math
import mmap
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

FORMAT_VERSION = 1
DTYPES = ("float32", "float16", "bfloat16", "float64")
FINGERPRINT_KEYS = ("model", "adapter", "task", "dataset")
RECORDS_FILE = "records.jsonl"
#: a chunk's own manifest, inside its folder
CHUNK_MANIFEST = "chunk.json"
#: the checksum of every chunk file (recorded as the manifest's ``integrity``)
CHECKSUM = "sha256"
#: the folder of a store's verified stamps (one JSON file per chunk, named like the chunk folder): each file's
#: size, mtime, ctime, inode and device when its sha256 was last checked and matched, so that a later read
#: trusts the check while none of them changed (any write to the file changes its ctime)
VERIFIED_DIR = "verified"
#: how long ago (seconds) a file must have last changed for its check to be recorded: a write within the
#: same tick of the file system's coarse clock could leave mtime and ctime as they were (git's "racy clean")
STAMP_MARGIN_S = 2.0
#: the OS lock guarding the JSON ``lock`` file (never deleted while the store lives)
WRITER_LOCK = ".writer.lock"
#: how long a writer waits for another's short critical section on the lock
LOCK_TIMEOUT_S = 60.0
CHUNK_NAME = re.compile(r"^\d{5}$")
NUMPY_STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "float64": np.float64}
TORCH_STORAGE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                  "float64": torch.float64}
#: ``dtype`` default of the readers: float32 rows, float64 for a float64 store
AUTO = "auto"
FLOAT16_MAX = 65504.0
#: round-to-nearest error of each 16-bit storage dtype: (relative error of a number in the normal range,
#: absolute error below it, half the subnormal spacing); what `verify` allows between the squared norms
#: recorded from the float32 values and those of the stored values
ROUNDING = {"float16": (2.0**-11, 2.0**-25), "bfloat16": (2.0**-8, 2.0**-134)}
#: the largest relative error (Frobenius norm, per block of a chunk) a 16-bit store accepts: 20x float16's
#: rounding of normal numbers, so only underflow to zero or to imprecise subnormals reaches it
MAX_STORAGE_ERROR = 1e-2


# --------------------------------------------------------------------------------------------------
# small file helpers
# --------------------------------------------------------------------------------------------------


def save_npy(path: Path, array: np.ndarray) -> dict[str, Any]:
    """One file of a chunk (flushed to disk by the chunk's atomic.new_directory(fsync=True)); returns what
    its chunk.json records: size in bytes, shape, dtype and sha256 of the bytes written."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    data = buffer.getbuffer()
    with open(path, "wb") as f:
        f.write(data)
    return {"bytes": len(data), "shape": list(array.shape), "dtype": array.dtype.str,
            CHECKSUM: hashlib.sha256(data).hexdigest()}


def storage_loss(values: Tensor, stored: Tensor) -> tuple[float, float]:
    """What storing ``values`` (float32/float64) as ``stored`` (their 16-bit rounding, read back) lost:
    (relative error of the whole block, ``||stored - values|| / ||values||``, 0 for an all-zero block;
    fraction of the nonzero entries stored as 0)."""
    exact = values.double()
    norm = float(exact.norm())
    error = float((stored.double() - exact).norm()) / norm if norm > 0 else 0.0
    nonzero = values != 0
    count = int(nonzero.sum())
    zeroed = int((nonzero & (stored == 0)).sum()) / count if count else 0.0
    return error, zeroed


def norms_tolerance(sq: np.ndarray, d: int, dtype: str) -> np.ndarray:
    """How far the squared norms of rows stored as ``dtype`` may lie from ``sq``, those of the rows before
    rounding (d entries each): with every entry rounded to nearest, ``||stored - row|| <= e = u ||row|| +
    a sqrt(d)`` (:data:`ROUNDING`), so the squared norms differ by at most ``e (2 ||row|| + e)``; plus the
    float64 summation's own error."""
    u, a = ROUNDING[dtype]
    norm = np.sqrt(np.maximum(sq, 0.0))
    e = u * norm + a * math.sqrt(d)
    return 1.001 * e * (2 * norm + e) + 1e-12 * sq


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, CHECKSUM).hexdigest()


def file_stamp(st: os.stat_result) -> list[int]:
    """What a verified stamp records of a file (:data:`VERIFIED_DIR`): size, mtime, ctime, inode, device."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def npy_header(path: Path) -> tuple[tuple[int, ...], str, int]:
    """(shape, dtype str, data offset) of a .npy file, from its header alone."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        return tuple(int(x) for x in shape), dtype.str, f.tell()


def map_npy(path: Path | str, shape: tuple[int, int], dtype: np.dtype, *, fd: int | None = None,
            size: int | None = None) -> np.ndarray | None:
    """Memory-map a .npy file this store wrote, when its header says exactly what we expect (version 1.0,
    C order, ``dtype``, ``shape``, data to the end of the file); None otherwise (the caller uses np.load).
    np.load parses the header with ast and builds an np.memmap, ~0.5 ms per file: at 10^4-10^5 chunk files
    per pass that costs more than reading them. ``fd`` and ``size``: the file already open, and its size from
    the caller's fstat (:func:`map_npy_fd`)."""
    if fd is not None and size is not None:
        return map_npy_fd(fd, size, shape, dtype)
    fd = os.open(path, os.O_RDONLY)
    try:
        return map_npy_fd(fd, os.fstat(fd).st_size, shape, dtype)
    finally:
        os.close(fd)


def npy_data_offset(fd: int, size: int, shape: tuple[int, int], dtype: np.dtype) -> int | None:
    """Where the data of an open ``.npy`` file (``size`` bytes) written by this store begins, its header read
    with one ``pread`` and checked to describe exactly ``shape`` and ``dtype`` (C order) with the file's size;
    None for any other header (the caller falls back to ``np.load``)."""
    head = os.pread(fd, 256, 0)
    if len(head) < 10 or head[:8] != b"\x93NUMPY\x01\x00":
        return None
    length = int.from_bytes(head[8:10], "little")
    if 10 + length > len(head):
        head = os.pread(fd, 10 + length, 0)
    header = head[10 : 10 + length].decode("latin1")
    offset = 10 + length
    expected = f"'descr': '{dtype.str}', 'fortran_order': False, 'shape': ({shape[0]}, {shape[1]}), }}"
    if not header.startswith("{" + expected) or size - offset != shape[0] * shape[1] * dtype.itemsize:
        return None
    return offset


def map_npy_fd(fd: int, size: int, shape: tuple[int, int], dtype: np.dtype) -> np.ndarray | None:
    """:func:`map_npy` of an open file (``size`` bytes, from the caller's fstat): the header read with one
    ``pread`` (:func:`npy_data_offset`), the data mapped with ``MAP_POPULATE`` where the OS has it (its pages
    entered into the map in one call, not faulted in one by one by the first read). The map outlives ``fd``."""
    offset = npy_data_offset(fd, size, shape, dtype)
    if offset is None:
        return None
    if size == offset:
        return np.empty(shape, dtype=dtype)
    buffer = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), prot=mmap.PROT_READ)
    return np.frombuffer(buffer, dtype=dtype, count=shape[0] * shape[1], offset=offset).reshape(shape)
