"""What every estimator works on: blocks of per-example gradients, read in chunks, and their damping.

A *block* is one parameter tensor of the adapter (a LoRA ``A`` or ``B`` matrix, a classifier head weight),
its per-example gradients flattened to the rows of an ``(n, d)`` matrix ``G``. Blocks arrive as tensors or as
*row sources* (anything with ``shape``, ``dtype`` and ``[rows]``, such as a gradient store's memory-mapped
block), given as one tensor, a sequence or a mapping name -> block. This module turns them into
:class:`BlockRows` (rows cast to the compute dtype on the fly, ``chunk`` rows at a time), pairs training and
query blocks by name, and holds the paper's damping rule ``lambda_l = 0.1 * mean_i ||g_il||^2 / d_l``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from datainf.errors import DataInfError

#: the paper's damping constant: lambda_l = DAMPING_FACTOR * mean_i ||g_il||^2 / d_l
DAMPING_FACTOR = 0.1
#: the most bytes of one materialized chunk of rows on the CPU (rows read from a store, or cast): buffers this
#: small are reused by the allocator and stay in cache, where a fresh 38 MB buffer per chunk (2,048 rows of
#: a 4,608-wide block) was page-faulted in at 0.5 GB/s against 4.5 GB/s for 5 MB (benchmarks/bench_store.py)
ROW_BUFFER_BYTES = 4 << 20


class RowSource(Protocol):
    """Anything that serves rows of an (n, d) matrix without holding it in memory (a gradient store's
    memory-mapped block, say): ``shape == (n, d)``, a floating ``dtype``, and ``source[rows]`` returning a
    torch.Tensor for a slice or a 1-D index tensor of rows."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def __getitem__(self, rows: slice | Tensor) -> Tensor: ...


Block = Tensor | RowSource
Blocks = Block | Sequence[Block] | Mapping[str, Block]
Damping = float | Sequence[float] | Mapping[str, float] | None


def is_row_source(x: Any) -> bool:
    """True for a non-tensor object serving rows (``shape``, ``dtype`` and ``[rows]``)."""
    return not isinstance(x, Tensor) and hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "__getitem__")


def as_blocks(grads: Blocks, what: str) -> list[tuple[str, Any]]:
    """Normalise gradients to a list of (name, (n, d) tensor or row source); rows are not copied.

    Blocks given as a sequence are named "0", "1", ...; a single tensor is block "0".
    """
    if isinstance(grads, Tensor) or is_row_source(grads):
        items = [("0", grads)]
    elif isinstance(grads, Mapping):
        items = [(str(k), v) for k, v in grads.items()]
    elif isinstance(grads, Sequence) and not isinstance(grads, (str, bytes)):
        items = [(str(i), v) for i, v in enumerate(grads)]
    else:
        raise DataInfError(
            f"{what}: expected a tensor, a sequence of tensors or a mapping name -> tensor, "
            f"got {type(grads).__name__}"
        )
    if not items:
        raise DataInfError(f"{what}: no blocks given; pass at least one gradient tensor")
    out = []
    for name, t in items:
        if is_row_source(t):
            if len(t.shape) != 2 or not t.dtype.is_floating_point:
                raise DataInfError(f"{what}: block '{name}' must serve (n, d) floating rows, got {tuple(t.shape)}")
            out.append((name, t))
            continue
        if not isinstance(t, Tensor):
            raise DataInfError(f"{what}: block '{name}' is a {type(t).__name__}, expected a torch.Tensor")
        if t.ndim < 1:
            raise DataInfError(f"{what}: block '{name}' is a scalar; expected shape (n_examples, *block_shape)")
        if not t.is_floating_point():
            raise DataInfError(f"{what}: block '{name}' has dtype {t.dtype}; expected a floating-point dtype")
        out.append((name, t.reshape(t.shape[0], math.prod(t.shape[1:]))))
    return out


def pair_blocks(
    train: list[tuple[str, Any]], query: list[tuple[str, Any]] | None
) -> list[tuple[str, Any, Any | None]]:
    """Match train and query blocks by name and check their shapes; (name, train, query or None) per block."""
    n = train[0][1].shape[0]
    for name, g in train:
        if g.shape[0] != n:
            raise DataInfError(
                f"train_grads: block '{name}' has {g.shape[0]} examples but block '{train[0][0]}' has {n}; "
                "every block must hold the same examples"
            )
        if g.shape[1] == 0:
            raise DataInfError(f"train_grads: block '{name}' has no parameters (d = 0)")
    if n == 0:
        raise DataInfError("train_grads: the training set is empty (n_train = 0)")
    if query is None:
        return [(name, g, None) for name, g in train]
    if len(query) != len(train):
        raise DataInfError(
            f"query_grads has {len(query)} blocks but train_grads has {len(train)}; pass the same blocks"
        )
    qmap = dict(query)
    if set(qmap) != {name for name, _ in train}:
        missing = sorted({name for name, _ in train} - set(qmap))
        extra = sorted(set(qmap) - {name for name, _ in train})
        raise DataInfError(
            f"query_grads and train_grads name different blocks: missing from query_grads {missing}, "
            f"not in train_grads {extra}"
        )
    m = query[0][1].shape[0]
    if m == 0:
        raise DataInfError("query_grads: the query set is empty (n_query = 0)")
    pairs = []
    for name, g in train:
        v = qmap[name]
        if v.shape[0] != m:
            raise DataInfError(
                f"query_grads: block '{name}' has {v.shape[0]} examples but block '{query[0][0]}' has {m}"
            )
        if v.shape[1] != g.shape[1]:
            raise DataInfError(
                f"block '{name}': query gradients have {v.shape[1]} entries per example but training "
                f"gradients have {g.shape[1]}; both must come from the same parameter tensor"
            )
        pairs.append((name, g, v))
    return pairs


def compute_dtype(t: Any, dtype: torch.dtype | None) -> torch.dtype:
    """float16/bfloat16 are accumulated in float32 at least; float64 stays float64; ``dtype`` overrides."""
    if dtype is not None:
        if not dtype.is_floating_point:
            raise DataInfError(f"dtype must be a floating-point dtype, got {dtype}")
        return dtype
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def chunks(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of ``size`` rows covering ``range(n)``."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def rows_per_chunk(g: Any, chunk: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows of block ``g`` (n, d) to materialize at once: ``chunk``, or fewer when each chunk is a new CPU buffer
    (rows read from a row source such as a store, or cast to ``dtype``) that would exceed
    :data:`ROW_BUFFER_BYTES`; a view of an in-memory tensor, or rows on an accelerator (whose caching
    allocator reuses buffers), keep ``chunk``."""
    fresh = not isinstance(g, Tensor) or g.dtype != dtype or g.device != device
    if not fresh or device.type != "cpu":
        return chunk
    row_bytes = int(g.shape[1]) * dtype.itemsize
    return max(1, min(chunk, ROW_BUFFER_BYTES // max(1, row_bytes)))


def largest_magnitude(g: Any, chunk: int = 4096) -> float:
    """The size of a block's largest gradient, computed without overflow or underflow: the largest row norm
    (from the float64 squared norms a store's block knows), else the largest absolute entry (exact in any
    dtype). 0.0 exactly when every entry is zero; NaN when one is NaN."""
    known = getattr(g, "sq_norms", None)
    if callable(known) and not isinstance(g, Tensor):
        sq = known()
        return math.sqrt(float(sq.max())) if sq.numel() else 0.0
    out = 0.0
    for s in chunks(int(g.shape[0]), chunk):
        rows = g[s]
        if rows.numel():
            out = max(out, float(rows.abs().max()))
    return out


def block_scale(g: Any, dtype: torch.dtype, chunk: int = 4096) -> float:
    """A power of two ``c`` that brings a block's gradients into the safe range of ``dtype`` when they lie
    outside it (largest magnitude below ``tiny**(1/4)`` or above ``max**(1/4)``: about 1e-10 and 1e9 in
    float32, where products of four gradient entries, such as ``g^T (G^T G) g``, underflow or overflow); 1.0
    otherwise, and for an all-zero or non-finite block. Multiplying by a power of two is exact in floating
    point, so the estimators see the same problem, scaled (see :attr:`Estimator.scale_power`)."""
    info = torch.finfo(dtype)
    size = largest_magnitude(g, chunk)
    if not (math.isfinite(size) and size > 0) or info.tiny ** 0.25 <= size <= info.max ** 0.25:
        return 1.0
    return 2.0 ** -round(math.log2(size))


def scaled(x: Tensor, scale: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``x * scale`` in ``dtype`` on ``device``; the product is formed in float64 first, so values outside
    ``dtype``'s range (float64 rows read into float32) are scaled before they are rounded."""
    if scale == 1.0:
        return x.to(device=device, dtype=dtype)
    return (x.to(device=device, dtype=torch.float64) * scale).to(dtype)


class BlockRows:
    """One block's training gradients ``G`` (n, d), read ``chunk`` rows at a time in the compute dtype.

    ``rows()`` yields ``(slice, (rows, d) tensor)``; ``matvec(X)`` is ``H X^T`` as (m, d) with
    ``H = G^T G / n`` (or on a subset of rows); ``sq_norms()`` the squared norm of every row. With ``scale``
    (a power of two, see :func:`block_scale`) every row is read multiplied by it: the estimators then work on
    ``scale * G``.
    """

    def __init__(self, name: str, g: Any, dtype: torch.dtype, device: torch.device, chunk: int,
                 scale: float = 1.0):
        self.name, self.g, self.dtype, self.device, self.chunk = name, g, dtype, device, chunk
        self.n, self.d = int(g.shape[0]), int(g.shape[1])
        self.scale = float(scale)

    def rows(self, within: slice | None = None) -> Iterator[tuple[slice, Tensor]]:
        """``(slice, rows)`` chunk after chunk over all rows, or over the rows of ``within`` (a slice)."""
        start, stop = (0, self.n) if within is None else (within.start, within.stop)
        for s in chunks(stop - start, rows_per_chunk(self.g, self.chunk, self.dtype, self.device)):
            s = slice(s.start + start, s.stop + start)
            yield s, scaled(self.g[s], self.scale, self.dtype, self.device)

    def take(self, rows: Tensor) -> Tensor:
        """The rows of ``G`` at the (sorted) indices ``rows``, in the compute dtype."""
        return scaled(self.g[rows], self.scale, self.dtype, self.device)

    def check_rows(self) -> None:
        """For an answer drawn from :meth:`sq_norms` alone (no row read): a row source that knows its rows'
        norms without reading them (a store's block, ``check_rows()``) checks that the rows are intact, as a
        read of them would (a store: every file's sha256); nothing to do for rows in memory."""
        check = getattr(self.g, "check_rows", None)
        if callable(check) and not isinstance(self.g, Tensor):
            check()

    def sq_norms(self) -> Tensor:
        """Squared norm of every example's gradient, (n,); names the first non-finite example. A row source
        that knows its rows' squared norms (a store's block: ``sq_norms()``, written with the rows) saves the
        pass over the rows."""
        known = getattr(self.g, "sq_norms", None)
        if callable(known) and not isinstance(self.g, Tensor):
            out = (known().double() * self.scale**2).to(device=self.device, dtype=self.dtype)
        else:
            out = torch.empty(self.n, dtype=self.dtype, device=self.device)
            for s, gc in self.rows():
                out[s] = (gc * gc).sum(dim=1)
        bad = ~torch.isfinite(out)
        if bool(bad.any()):
            k = int(bad.nonzero()[0])
            raise DataInfError(
                f"train_grads: block '{self.name}', example {k} has a NaN or infinite value; "
                "drop that example or fix the loss that produced it"
            )
        return out

    def dot(self, X: Tensor) -> Tensor:
        """``G X^T``: (n, m) for X (m, d), one pass over the rows."""
        out = torch.empty(self.n, X.shape[0], dtype=self.dtype, device=self.device)
        for s, gc in self.rows():
            out[s] = gc @ X.T
        return out

    def matvec(self, X: Tensor, rows: Tensor | None = None) -> Tensor:
        """``H X^T`` as (m, d) for X (m, d), H the block's Fisher ``G^T G / n`` (on ``rows`` if given)."""
        if rows is not None:
            gc = self.take(rows)
            return (X @ gc.T) @ gc / len(rows)
        out = torch.zeros_like(X)
        for _, gc in self.rows():
            out += (X @ gc.T) @ gc
        return out / self.n

    def gram(self) -> Tensor:
        """``K = G G^T`` (n, n), from chunk pairs."""
        K = torch.empty(self.n, self.n, dtype=self.dtype, device=self.device)
        for s, gc in self.rows():
            for t, gt in self.rows():
                if t.start < s.start:
                    continue
                part = gc @ gt.T
                K[s, t] = part
                K[t, s] = part.T
        return K

    def fisher(self, lam: float) -> Tensor:
        """``H + lambda I`` (d, d)."""
        H = torch.zeros(self.d, self.d, dtype=self.dtype, device=self.device)
        for _, gc in self.rows():
            H += gc.T @ gc
        H /= self.n
        H.diagonal().add_(lam)
        return H


def span_rows(blocks: Sequence[BlockRows]) -> int:
    """How many rows :func:`stream_dots` reads of every block in turn: the rows per file of row sources that
    say so (``chunk_rows``, a store's chunk size) when they all agree, else the first block's chunk."""
    sizes = {getattr(b.g, "chunk_rows", None) for b in blocks}
    size = sizes.pop() if len(sizes) == 1 else None
    return int(size) if isinstance(size, int) and size > 0 else blocks[0].chunk


def pass_workers(n_spans: int) -> int:
    """How many threads :func:`stream_dots` gives a pass over a store: one per torch thread (the cores torch
    was told to use), at most one per span, at most :data:`MAX_PASS_WORKERS`."""
    return max(1, min(torch.get_num_threads(), n_spans, MAX_PASS_WORKERS))


#: the most threads one pass over a store's spans uses (each reads, converts and multiplies its own spans)
MAX_PASS_WORKERS = 8
#: the key of a pass worker's staging buffer (rows read with pread, in the storage dtype) among its buffers
STAGING = "staging"


def stream_dots(parts: Sequence[tuple[BlockRows, Tensor]], lookahead: int = 2) -> Tensor:
    """``sum_l G_l R_l^T`` over the given blocks (each ``(BlockRows, R)`` with R (m, d_l)): (n, m) in the first
    block's compute dtype, in one sweep over the rows. The rows are read span by span (:func:`span_rows`), every
    block's rows of a span in turn: for a store, chunk folder after chunk folder, the order its files lie on
    disk, rather than each block across all chunk folders. Row sources with ``prefetch(rows)`` (a store's
    blocks) are asked to start reading the next ``lookahead`` spans in the background while this one is
    converted and multiplied. When every block is a store's (rows copied into a reused buffer), the spans are
    shared out among :func:`pass_workers` threads, each with its own buffer and one torch thread, each span's
    rows of ``out`` written by one thread: the memory maps, the float16 -> float32 copies and the products run
    on every core torch may use, and the sums are the same as on one thread. Equal to summing ``b.dot(R)`` over
    the blocks, up to the order of the floating-point sums."""
    first = parts[0][0]
    out = torch.zeros(first.n, parts[0][1].shape[0], dtype=first.dtype, device=first.device)
    spans = list(chunks(first.n, span_rows([b for b, _ in parts])))

    # row sources that read ahead, by store: a store's blocks ask together (one background job per chunk folder)
    readers: dict[int, list[Any]] = {}
    for b, _ in parts:
        if callable(getattr(b.g, "prefetch", None)) and not isinstance(b.g, Tensor):
            readers.setdefault(id(getattr(b.g, "store", b.g)), []).append(b.g)

    def ahead(i: int) -> None:
        if i < len(spans):
            for first, *rest in readers.values():
                if rest and all(hasattr(g, "file") for g in (first, *rest)):
                    if hash_on_read:  # the workers hash each file as they read it: read ahead, no hashing
                        first.prefetch(spans[i], together=rest, verify=False)
                    else:
                        first.prefetch(spans[i], together=rest)
                else:
                    for g in (first, *rest):
                        g.prefetch(spans[i])

    # rows of a row source that can copy them into a given buffer (a store's block, read in its compute dtype
    # on the CPU, unscaled) land in one buffer reused for every span, not a fresh one per span
    direct = [callable(getattr(b.g, "read_into", None)) and b.scale == 1.0 and b.device.type == "cpu"
              and getattr(b.g, "dtype", None) == b.dtype for b, _ in parts]
    # each block's rows at most ROW_BUFFER_BYTES at once (rows_per_chunk), so the buffer stays in cache
    pieces = [rows_per_chunk(b.g, b.chunk, b.dtype, b.device) if d else 0 for (b, _), d in zip(parts, direct)]
    span = spans[0].stop - spans[0].start if spans else 0
    size = max((min(span, p) * b.d for (b, _), p in zip(parts, pieces)), default=0)

    def one_span(span_i: slice, buffers: dict[Any, Tensor]) -> None:
        for (b, R), fast, piece in zip(parts, direct, pieces):
            if fast:
                buffer = buffers.get(b.dtype)
                if buffer is None:
                    buffer = buffers[b.dtype] = torch.empty(size, dtype=b.dtype)
                staging = buffers.get(STAGING) if STAGING in buffers else None
                for s in chunks(span_i.stop - span_i.start, piece):
                    s = slice(s.start + span_i.start, s.stop + span_i.start)
                    rows = s.stop - s.start
                    view = buffer[: rows * b.d].view(rows, b.d)
                    gc = b.g.read_into(s, view) if staging is None else b.g.read_into(s, view, staging=staging)
                    if R.dtype == out.dtype == gc.dtype:
                        out[s].addmm_(gc, R.T)
                    else:
                        out[s] += (gc @ R.T).to(out.dtype)
                continue
            for s, gc in b.rows(span_i):
                out[s] += (gc @ R.T).to(out.dtype)

    workers = pass_workers(len(spans)) if all(direct) else 1
    hash_on_read = workers > 1 and all(callable(getattr(b.g, "read_rows", None)) or
                                       callable(getattr(getattr(b.g, "store", None), "read_rows", None)) for b, _ in parts)
    if workers == 1:
        buffers: dict[Any, Tensor] = {}
        for i in range(lookahead):
            ahead(i)
        for i, span_i in enumerate(spans):
            ahead(i + lookahead)
            one_span(span_i, buffers)
        return out
    # each worker reads its rows with pread into a staging buffer (8 bytes a number: any storage dtype)
    return _shared_out(spans, one_span, ahead, max(lookahead, workers + 1), workers, out, size * 8)


def _shared_out(spans: list[slice], one_span: Any, ahead: Any, lookahead: int, workers: int, out: Tensor,
                staging_bytes: int) -> Tensor:
    """:func:`stream_dots`' spans computed by ``workers`` threads (each with one torch thread, its own
    buffers and a staging buffer of ``staging_bytes`` for ``pread``), spans handed out in order, the next
    ``lookahead`` read ahead as each is handed out."""
    import threading
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    local = threading.local()

    def work(span_i: slice) -> None:
        buffers = getattr(local, "buffers", None)
        if buffers is None:
            torch.set_num_threads(1)  # this thread's own torch thread count: the workers share the cores
            # the staging buffer as the numpy array ``pread`` fills (no tensor-to-array view per file read)
            buffers = local.buffers = {STAGING: torch.empty(staging_bytes, dtype=torch.uint8).numpy()}
        one_span(span_i, buffers)

    threads = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="datainf-pass") as pool:
            for i in range(lookahead):
                ahead(i)
            pending: deque = deque()
            try:
                for i, span_i in enumerate(spans):
                    ahead(i + lookahead)
                    pending.append(pool.submit(work, span_i))
                    while len(pending) > workers:
                        pending.popleft().result()
                while pending:
                    pending.popleft().result()
            finally:
                for f in pending:
                    f.cancel()
    finally:
        torch.set_num_threads(threads)
    return out


#: the largest block (entries per example) whose d x d matrix a fitted state holds (4096: 64 MiB in float32);
#: larger blocks are scored as without a state (two passes over G per call, never a d x d matrix)
MAX_FITTED_D = 4096


def fitted_blocks(train: list[tuple[str, Any]], arguments: Any, max_d: int, *, need_d_le_n: bool = False
                  ) -> list[tuple[BlockRows, float | None]]:
    """The blocks a d x d fitted state covers, read as scoring reads them (:class:`BlockRows` in the compute
    dtype on the compute device), with their given damping (None: the method's rule): blocks with
    ``d <= max_d`` (and ``d <= n`` when asked) whose rows need no rescaling (others keep the path without a
    state, which handles them exactly)."""
    out = []
    lams = resolve_damping(arguments.damping, [name for name, _ in train])
    for (name, g), lam in zip(train, lams):
        n, d = int(g.shape[0]), math.prod(tuple(g.shape)[1:])
        cd = compute_dtype(g, arguments.torch_dtype)
        if d > max_d or (need_d_le_n and d > n) or block_scale(g, cd, arguments.chunk_size) != 1.0:
            continue
        dev = torch.device(arguments.device) if arguments.device is not None else getattr(g, "device", torch.device("cpu"))
        rows = g if len(g.shape) == 2 else g.reshape(n, d)
        out.append((BlockRows(name, rows, cd, dev, arguments.chunk_size), lam))
    return out


def check_finite_queries(name: str, v: Tensor) -> None:
    """Refuse a query block with a NaN or infinite entry, naming the first such query."""
    bad = ~torch.isfinite(v).all(dim=1)
    if bool(bad.any()):
        j = int(bad.nonzero()[0])
        raise DataInfError(
            f"query_grads: block '{name}', example {j} has a NaN or infinite value; "
            "drop that query or fix the loss that produced it"
        )


def resolve_damping(damping: Damping, names: list[str]) -> list[float | None]:
    """One lambda per block; None means the method's default rule, filled in once the block is known."""
    if damping is None:
        return [None] * len(names)
    if isinstance(damping, Mapping):
        if set(map(str, damping)) != set(names):
            raise DataInfError(
                f"damping names blocks {sorted(map(str, damping))} but the gradients have {sorted(names)}"
            )
        by_name = {str(k): v for k, v in damping.items()}
        values = [float(by_name[n]) for n in names]
    elif isinstance(damping, Sequence) and not isinstance(damping, (str, bytes)):
        if len(damping) != len(names):
            raise DataInfError(f"damping has {len(damping)} values but there are {len(names)} blocks")
        values = [float(x) for x in damping]
    else:
        values = [float(damping)] * len(names)
    for name, lam in zip(names, values):
        check_damping(name, lam)
    return values


def check_damping(name: str, lam: float) -> None:
    """A damping must be a finite number > 0 (and not so small that 1/lambda overflows)."""
    if not (math.isfinite(lam) and lam > 0) or not math.isfinite(1.0 / lam):
        raise DataInfError(f"damping for block '{name}' is {lam}; it must be a finite number > 0")


def paper_damping(sq_norms: Tensor, d: int) -> float:
    """The paper's rule from the squared row norms (n,) of a block of dimension d: ``0.1 * mean / d``."""
    return DAMPING_FACTOR * float(sq_norms.mean()) / d


def default_damping(train_grads: Blocks) -> dict[str, float]:
    """The paper's damping rule per block: ``lambda_l = 0.1 * (1/(n d_l)) * sum_i ||g_il||^2``.

    Args:
        train_grads: per-block training gradients, each ``(n, *block_shape)``.
    Returns:
        block name -> lambda (blocks given as a sequence are named "0", "1", ...).
    """
    blocks = as_blocks(train_grads, "train_grads")
    pair_blocks(blocks, None)
    out = {}
    for name, g in blocks:
        b = BlockRows(name, g, compute_dtype(g, None), getattr(g, "device", torch.device("cpu")), 4096)
        out[name] = paper_damping(b.sq_norms(), b.d)
    return out


__all__ = [
    "DAMPING_FACTOR",
    "ROW_BUFFER_BYTES",
    "Block",
    "BlockRows",
    "Blocks",
    "Damping",
    "RowSource",
    "as_blocks",
    "block_scale",
    "check_damping",
    "check_finite_queries",
    "chunks",
    "compute_dtype",
    "default_damping",
    "is_row_source",
    "largest_magnitude",
    "pair_blocks",
    "paper_damping",
    "resolve_damping",
    "rows_per_chunk",
    "scaled",
    "span_rows",
    "stream_dots",
]
