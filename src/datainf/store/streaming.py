"""Streaming into a store: :class:`StreamingWriter` takes rows as they come (any batch sizes, any order) and
writes each chunk of the store, checksummed as :meth:`GradientStore.write_chunk` writes it, as soon as all of
its rows have arrived.

```
with StreamingWriter.create("runs/train", blocks=..., n_examples=n, fingerprints=...) as writer:
    for rows in writer.pending():                   # a resumed store: only the rows not committed yet
        for start in range(rows.start, rows.stop, 8):
            batch = range(start, min(start + 8, rows.stop))
            writer.add(batch, gradients_of(batch))  # {block: (len(batch), *shape)}
    writer.finish(records)                          # every chunk written: mark the store complete
```

Resuming: a chunk is committed whole or not at all (the store's own atomic write), so a writer killed at any
point leaves the chunks it completed; the rows it held in memory for unfinished chunks are lost and listed by
:meth:`StreamingWriter.pending` when the same store is created again. Rows of chunks an earlier writer
committed are skipped when given again (they are kept as they are); a row given twice to one writer is refused.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from datainf.errors import DataInfError
from datainf.store.gradient_store import GradientStore


class StreamingWriter:
    """Rows of per-example gradients -> the chunks of a writable :class:`GradientStore` (see the module).

    Args:
        store: a store open for writing (:meth:`GradientStore.create` or :meth:`GradientStore.join`). The
            chunks it already holds are kept and their rows skipped.
    """

    def __init__(self, store: GradientStore):
        if not isinstance(store, GradientStore) or not store.writable:
            raise DataInfError("StreamingWriter needs a store open for writing (GradientStore.create)")
        self.store = store
        missing = set(store.missing_chunks())
        #: chunks committed before this writer opened the store (their rows are skipped)
        self.kept = [c for c in range(store.num_chunks) if c not in missing]
        self._kept = set(self.kept)
        self._given = torch.zeros(store.n_examples, dtype=torch.bool)  # rows given to this writer
        self._buffers: dict[int, dict[str, Tensor]] = {}  # chunk -> block -> (rows in chunk, d)
        self._work = torch.float64 if store.storage_dtype == "float64" else torch.float32
        self._sizes = {name: math.prod(store.block_shapes[name]) for name in store.block_names}
        self._owns_store = False  # made by create(): a failed first use then leaves nothing behind

    @classmethod
    def create(cls, path: str | os.PathLike[str], **spec: Any) -> StreamingWriter:
        """Create the store at ``path`` (or resume it: same settings) with :meth:`GradientStore.create`'s
        arguments, and a writer into it; the writer's :meth:`close` releases the store's lock. Leaving its
        ``with`` block on an error before any chunk was written removes what the creation made."""
        writer = cls(GradientStore.create(path, **spec))
        writer._owns_store = True
        return writer

    # ---------------------------------------------------------------- what is left

    def pending(self) -> list[range]:
        """The rows still to give, as contiguous ranges in row order: those of the chunks not committed,
        less the rows this writer holds already."""
        out: list[range] = []
        for c in self.store.missing_chunks():
            rows = self.store.chunk_rows(c)
            for r in rows:
                if self._given[r]:
                    continue
                if out and out[-1].stop == r:
                    out[-1] = range(out[-1].start, r + 1)
                else:
                    out.append(range(r, r + 1))
        return out

    @property
    def buffered_rows(self) -> int:
        """Rows held in memory for chunks not complete yet (lost if the process dies now)."""
        return sum(int(self._given[self.store.chunk_rows(c)].sum()) for c in self._buffers)

    # ---------------------------------------------------------------- adding rows

    def add(self, rows: int | range | Sequence[int], grads: Mapping[str, Tensor]) -> list[int]:
        """Give the gradients of some rows; writes every chunk this completes.

        Args:
            rows: the rows (dataset indices) of the batch, in the order of the gradients' first dimension: a
                range, a sequence of ints (any order), or an int, the first of ``len`` consecutive rows.
            grads: every block of the store -> a floating tensor ``(len(rows), *block_shape)`` (or
                ``(len(rows), d)``), any device; finite.
        Returns:
            the chunks written by this call.

        Rows of chunks committed before this writer opened the store are skipped. Refused (nothing kept of
        the call): a row outside the store or given twice, a missing or extra block, a wrong shape, a NaN or
        an infinity (named by row and block).
        """
        if not self.store.writable:
            raise DataInfError(f"store {self.store.path} is closed: create it again to resume writing")
        if not isinstance(grads, Mapping) or set(grads) != set(self.store.block_names):
            given = sorted(grads) if isinstance(grads, Mapping) else type(grads).__name__
            raise DataInfError(f"store {self.store.path}: expected blocks {self.store.block_names}, got {given}")
        count = int(next(iter(grads.values())).shape[0]) if grads else 0
        index = self._rows(rows, count)
        flat = {name: self._checked(name, grads[name], index) for name in self.store.block_names}
        chunk_of = index // self.store.chunk_size
        keep = torch.tensor([int(c) not in self._kept for c in chunk_of.tolist()], dtype=torch.bool)
        index, chunk_of = index[keep], chunk_of[keep]
        flat = {name: g[keep] for name, g in flat.items()}
        self._given[index] = True
        written = []
        for c in sorted(set(chunk_of.tolist())):
            span = self.store.chunk_rows(c)
            mine = chunk_of == c
            buffer = self._buffers.setdefault(c, {name: torch.empty(len(span), self._sizes[name], dtype=self._work)
                                                  for name in self.store.block_names})
            for name, g in flat.items():
                buffer[name][index[mine] - span.start] = g[mine]
            if bool(self._given[span.start:span.stop].all()):
                self.store.write_chunk(c, buffer)
                del self._buffers[c]
                written.append(c)
        return written

    def _rows(self, rows: int | range | Sequence[int], count: int) -> Tensor:
        """The rows as a (count,) int64 tensor, checked: inside the store, each once, not given before."""
        n = self.store.n_examples
        if isinstance(rows, bool):
            raise DataInfError(f"rows must be an int, a range or a sequence of ints, got {rows!r}")
        if isinstance(rows, int):
            rows = range(rows, rows + count)
        try:
            index = torch.as_tensor(list(rows), dtype=torch.int64).reshape(-1)
        except (TypeError, ValueError, RuntimeError):
            raise DataInfError(f"rows must be an int, a range or a sequence of ints, got {rows!r}") from None
        if len(index) != count:
            raise DataInfError(f"store {self.store.path}: {len(index)} rows for gradients of {count} examples")
        outside = index[(index < 0) | (index >= n)]
        if len(outside):
            raise DataInfError(f"store {self.store.path}: row {int(outside[0])} is outside the store's {n} examples")
        if len(torch.unique(index)) != len(index):
            raise DataInfError(f"store {self.store.path}: a row is given twice in one call ({index.tolist()[:10]})")
        again = index[self._given[index]]
        if len(again):
            raise DataInfError(f"store {self.store.path}: row {int(again[0])} was given already; give each row once")
        return index

    def _checked(self, name: str, g: Tensor, index: Tensor) -> Tensor:
        """One block of a call as (rows, d) in the working dtype on the CPU, checked (shape, finite)."""
        shape, d = self.store.block_shapes[name], self._sizes[name]
        if not isinstance(g, Tensor) or not g.is_floating_point():
            raise DataInfError(f"store {self.store.path}: block '{name}' must be a floating torch.Tensor")
        if tuple(g.shape) not in ((len(index), *shape), (len(index), d)):
            raise DataInfError(f"store {self.store.path}: block '{name}' has shape {tuple(g.shape)}; expected "
                               f"{(len(index), *shape)} for {len(index)} rows")
        flat = g.detach().to(device="cpu", dtype=self._work).reshape(len(index), d)
        bad = ~torch.isfinite(flat).all(dim=1)
        if bool(bad.any()):
            row = int(index[bad.nonzero()[0]])
            raise DataInfError(f"store {self.store.path}: block '{name}', example {row} has a NaN or infinite "
                               "gradient; drop that example or fix the loss that produced it")
        return flat

    # ---------------------------------------------------------------- finishing

    def finish(self, records: Iterable[Mapping[str, Any]] | None = None) -> GradientStore:
        """Keep ``records`` (one plain JSON object per row, optional), mark the store complete, release it;
        returns the store opened read-only. Refused while rows are missing (named by chunk)."""
        if self._buffers:
            c = min(self._buffers)
            span = self.store.chunk_rows(c)
            absent = [r for r in span if not self._given[r]]
            raise DataInfError(f"store {self.store.path}: chunk {c} lacks rows {absent[:10]}"
                               f"{', ...' if len(absent) > 10 else ''}; give them before finish()")
        if records is not None:
            self.store.write_records(records)
        self.store.finalize()
        self.close()
        return GradientStore.open(self.store.path)

    def close(self) -> None:
        """Release the store (the chunks written stay; rows held for unfinished chunks are dropped)."""
        self._buffers.clear()
        self.store.close()

    def __enter__(self) -> StreamingWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        if kind is not None and self._owns_store and self.store.writable:
            self.store.discard_if_unused()  # a new store refused before its first chunk: nothing is left
        self.close()


__all__ = ["StreamingWriter"]
