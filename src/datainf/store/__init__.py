"""On-disk store of per-example gradients: resumable, atomic per chunk, memory-mapped on read.

The package, by file, each importing only those above it (no circle):

- ``files`` (names, dtypes, .npy helpers), ``manifest`` (manifest.json read, validated, compared; the problem
  lines), ``locking`` (the writer's lock), ``fingerprint`` (what the gradients depend on);
- ``blocks``: :class:`StoredBlock`, one block's rows read on demand through :class:`~datainf.store.blocks.BlockSource`,
  the store's public reading API (``block_file``, ``checked_file``, ``mapped``, ``sq_norms_table``);
- :class:`GradientStore` is built by concern, each class adding to the one before: ``layout`` (where
  everything lies: chunks, rows, the files a chunk must hold, the cheap checks of a chunk) -> ``reader``
  (``open``, blocks, squared norms, records, and the reading API) -> ``verify`` (``verify``: checksums and
  squared norms of everything) -> ``writer`` (``create``/resume, ``write_chunk``, ``write_records``,
  ``finalize``, the lock) -> ``gradient_store`` (:class:`GradientStore` itself, which adds the disk access:
  free space, a chunk's files written whole or not at all, a chunk file memory-mapped back);
- ``streaming``: :class:`StreamingWriter`, rows pushed as they come (any batch sizes, any order) into a
  writable store, each chunk written as soon as its rows are all there (resumable: a rerun keeps the chunks
  written and lists the rows left in ``pending()``).

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
      verified/00000.json  (written by scoring) one per chunk: every file's size, mtime, ctime, inode and device
                        when its sha256 last matched (``verified stamps``; see Integrity)
      lock              present while a writer holds the store: {"pid", "host", "token"}
      .writer.lock      the OS lock (``filelock``) under which a writer reads, takes over or releases ``lock``

A chunk is written into ``chunks/.NNNNN.tmp-<pid>``, fsynced, then renamed to ``chunks/NNNNN``: it appears
whole or not at all. Re-running :meth:`GradientStore.create` with the same settings resumes the store;
:meth:`GradientStore.missing_chunks` lists what is left to compute.

Integrity: :meth:`GradientStore.open` checks every chunk cheaply (its chunk.json names this chunk and its
rows, every file has the size, shape and dtype it was written with; no chunk folder lies beyond
``n_examples``; a complete store lacks none), reading a chunk file checks its sha256 the first time this
store object touches it (or, when the file's verified stamp is unchanged, trusts the check recorded
there: any write to the file changes its ctime and voids the stamp; stamps are recorded by a scoring call
that succeeded, for files last changed more than ``STAMP_MARGIN_S`` before they were hashed), and
:meth:`GradientStore.verify` (``datainf store verify``) checks everything,
squared norms included. A failure names the chunk. Resuming (:meth:`GradientStore.create` on an existing
store) checks every stored chunk's checksums and moves a bad one aside to ``chunks/.corrupt-NNNNN-<time>``
(nothing is deleted), so the rerun recomputes just that chunk. A 16-bit store refuses, by block and chunk,
gradients its dtype would underflow (``MAX_STORAGE_ERROR``), and ``verify`` allows exactly the rounding the
writer accepts. A curvature cache inside a store (``kfac.safetensors``, written by datainf.scoring) records
the sha256 of its content and is checked on load and by ``datainf store verify``. Stores written before chunk manifests
existed (no ``integrity`` key in manifest.json) are still read, with a warning: only their sizes and
shapes can be checked.

Fingerprints (short sha256 hex strings) identify what the gradients depend on: :func:`fingerprint_model`,
:func:`fingerprint_dataset`, :func:`fingerprint_task`.
"""

from __future__ import annotations

from datainf.store.blocks import StoredBlock
from datainf.store.files import (
    AUTO,
    CHECKSUM,
    CHUNK_MANIFEST,
    DTYPES,
    FINGERPRINT_KEYS,
    FORMAT_VERSION,
    LOCK_TIMEOUT_S,
    MAX_STORAGE_ERROR,
    RECORDS_FILE,
    WRITER_LOCK,
    file_digest,
    storage_loss,
)
from datainf.store.fingerprint import (
    PEFT_REINITIALIZED,
    fingerprint_dataset,
    fingerprint_model,
    fingerprint_task,
)
from datainf.store.gradient_store import GradientStore, disk_full, existing_ancestor, require_free_space
from datainf.store.manifest import StoreProblem, projection_label
from datainf.store.metadata import StoreMeta
from datainf.store.streaming import StreamingWriter

__all__ = [
    "AUTO", "CHECKSUM", "CHUNK_MANIFEST", "DTYPES", "FINGERPRINT_KEYS", "FORMAT_VERSION", "LOCK_TIMEOUT_S",
    "MAX_STORAGE_ERROR", "PEFT_REINITIALIZED", "RECORDS_FILE", "WRITER_LOCK", "GradientStore", "StoreMeta", "StoreProblem",
    "StreamingWriter",
    "StoredBlock", "disk_full", "existing_ancestor", "file_digest", "fingerprint_dataset", "fingerprint_model",
    "fingerprint_task", "projection_label", "require_free_space", "storage_loss",
]
