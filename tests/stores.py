"""One way for tests to write a finished gradient store of gradients they already hold.

``write_store(path, grads)`` writes ``grads`` (block name -> (n, *shape) tensor, the rows in order) through the
store's own writer (create, one ``write_chunk`` per chunk, records, finalize) and opens it again, so a test
compares what the code under test reads back against the tensors it wrote.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from datainf.store import GradientStore

#: fingerprints of a synthetic store (no model made it)
FINGERPRINTS = {"model": "m", "task": "t"}


def write_store(path: Path, grads: Mapping[str, torch.Tensor], *, chunk_size: int = 8, dtype: str = "float64",
                meta: Mapping[str, Any] | None = None, projection: dict | None = None,
                fingerprints: Mapping[str, str] | None = None, records: bool = True) -> GradientStore:
    """A finished store of ``grads`` stored as ``dtype`` (classification metadata unless ``meta`` is given;
    records {"text": "example i", "label": i % 2} unless ``records`` is False)."""
    n = next(iter(grads.values())).shape[0]
    with GradientStore.create(path, blocks={k: tuple(v.shape[1:]) for k, v in grads.items()}, n_examples=n,
                              fingerprints=dict(fingerprints or FINGERPRINTS), chunk_size=chunk_size, dtype=dtype,
                              meta=dict(meta) if meta is not None else {"task": "classification"},
                              projection=projection) as store:
        for c in range(store.num_chunks):
            rows = store.chunk_rows(c)
            store.write_chunk(c, {k: v[rows.start : rows.stop] for k, v in grads.items()})
        if records:
            store.write_records([{"text": f"example {i}", "label": i % 2} for i in range(n)])
        store.finalize()
    return GradientStore.open(path)


def flip_byte(path: Path, offset: int = -1) -> None:
    """Damage a file in place: flip the lowest bit of the byte at ``offset`` (what its sha256 must catch)."""
    data = bytearray(Path(path).read_bytes())
    data[offset] ^= 0x01
    Path(path).write_bytes(bytes(data))
