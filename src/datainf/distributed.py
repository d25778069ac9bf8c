"""Scale out on ``torch.distributed``: the same code runs in one process or under ``torchrun``.

Nothing here starts processes: launch with ``torchrun`` (or any launcher that sets ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``), call :func:`init_distributed` once, then use :class:`datainf.Attributor`
as usual, or the functions below directly. With no process group (or a world of one process) every
function falls back to the single-process code.

* Gradient extraction (:func:`write_store`, used by ``Attributor.fit``): rank 0 creates the store (manifest
  and lock) and lists the missing chunks; rank r computes ``missing[r::world_size]`` (chunk c goes to rank
  ``c % world_size`` on a fresh store) and writes them into the same directory, each chunk atomically; once
  every rank is done (a collective), rank 0 finalizes. Chunks are computed by the same code in every case,
  so the store holds the same values whatever the number of processes. A rank that dies leaves the chunks
  already written; rerunning with any number of processes computes only the missing ones.
* Scoring (:func:`distributed_score`): scores are sums over blocks, so the blocks are split across ranks
  (largest first, to the least loaded rank); each rank runs the pure estimators of
  :mod:`datainf.estimators` on its blocks over all training rows with the same :class:`ScoreArguments`
  (:func:`~datainf.estimators.partial_scores`), which keeps each block's damping rule and curvature exactly
  as in one process; the partial sums (and, with ``normalize``, the preconditioned norms) are all-reduced
  and finished as in one process. Every rank returns the full result.

Errors are collective: if one rank fails (bad input, a mismatched store), every rank raises a
:class:`~datainf.errors.DataInfError` naming it instead of waiting forever for the others.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from datainf.errors import AllBlocksZeroError, DataInfError
from datainf.estimators import (
    Blocks,
    Damping,
    PartialScores,
    ScoreArguments,
    ScoreResult,
    as_blocks,
    finish,
    partial_scores,
    score,
    score_self,
)
from datainf.estimators.defaults import DEFAULT_METHOD
from datainf.store import RECORDS_FILE, GradientStore, StreamingWriter

logger = logging.getLogger("datainf.distributed")

# --------------------------------------------------------------------------------------------------
# process group helpers
# --------------------------------------------------------------------------------------------------


def is_distributed(group: Any = None) -> bool:
    """True inside an initialized process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank_and_world(group: Any = None) -> tuple[int, int]:
    """(this process's rank, number of processes) in ``group``; (0, 1) without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def is_main_process(group: Any = None) -> bool:
    """True on rank 0 (and in a plain single process): the one that writes shared outputs."""
    return rank_and_world(group)[0] == 0


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes in the environment; returns (rank, world_size).

    Args:
        backend: "nccl" (GPUs) or "gloo" (CPUs); default nccl when CUDA is available, else gloo. With nccl
            each process uses the GPU ``LOCAL_RANK``.
        timeout_s: how long a collective waits for the other ranks (torch's default: 10 to 30 minutes).
    Without ``RANK`` / ``WORLD_SIZE`` in the environment (a plain ``python`` run) nothing is initialized and
    (0, 1) is returned. Calling it again once initialized just returns the rank and world size.
    """
    if dist.is_available() and dist.is_initialized():
        return rank_and_world()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    if not dist.is_available():
        raise DataInfError("this torch build has no torch.distributed; run without torchrun")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise DataInfError("backend 'nccl' needs CUDA GPUs; use backend='gloo' on CPUs")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    kwargs: dict[str, Any] = {}
    if timeout_s is not None:
        kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend, **kwargs)
    atexit.register(shutdown_distributed)
    return rank_and_world()


def shutdown_distributed() -> None:
    """Wait for every rank, then leave the process group (a no-op when none is initialized).

    :func:`init_distributed` registers this to run at exit; call it yourself to leave earlier. Leaving
    together matters: a rank that tears its gloo connections down while a peer still uses them (or whose
    interpreter exits with the group alive) can die with SIGABRT after all its work is done.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _src(group: Any) -> int:
    """The global rank of the group's rank 0."""
    return 0 if group is None else dist.get_global_rank(group, 0)


def _comm_device(group: Any) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _agree(error: BaseException | None, group: Any, what: str) -> None:
    """Collective: every rank learns whether any rank failed; then all raise (the failing rank its own error)."""
    world = dist.get_world_size(group)
    messages: list[str | None] = [None] * world
    mine = None if error is None else f"{type(error).__name__}: {error}"
    dist.all_gather_object(messages, mine, group=group)
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        r, m = failed[0]
        raise DataInfError(f"{what} failed on rank {r} ({m}); fix that and rerun (finished chunks are kept)")


# --------------------------------------------------------------------------------------------------
# gradient extraction
# --------------------------------------------------------------------------------------------------


def write_store(
    path: str | os.PathLike[str],
    *,
    blocks: Mapping[str, tuple[int, ...]],
    n_examples: int,
    fingerprints: Mapping[str, str],
    compute_chunk: Callable[[range, Any], Mapping[str, Tensor]],
    chunk_size: int = 256,
    dtype: str = "float32",
    meta: Mapping[str, Any] | None = None,
    records: Sequence[Mapping[str, Any]] | None = None,
    progress: bool = False,
    group: Any = None,
    projection: Mapping[str, Any] | None = None,
) -> GradientStore:
    """Fill a gradient store with every rank of the process group writing its share of the missing chunks.

    Args:
        path, blocks, n_examples, fingerprints, chunk_size, dtype, meta: as in :meth:`GradientStore.create`
            (only rank 0 reads them to create or resume the store).
        compute_chunk: ``compute_chunk(rows: range, bar) -> {block: (len(rows), *block_shape)}``, the
            gradients of the examples ``rows`` (``Attributor.fit`` passes its length-sorted batching of the
            chunk); ``bar`` is a tqdm bar counting examples, to update as batches finish. Must give the same
            values on any rank.
        records: the examples as plain JSON objects, kept in the store (rank 0, before finalizing); None
            keeps none.
        progress: show a progress bar (in examples) on rank 0: its own chunks, after those already stored.
        group: the process group (default: the world).
        projection: the projection record of a projected store (see :meth:`GradientStore.create`).
    Returns:
        the finished store, opened read-only, on every rank.

    Rank 0 holds the store's lock for the whole job (other ranks join with its token, see
    :meth:`GradientStore.join`), so a second job on the same store is refused. Collective: every rank of
    ``group`` must call it. In a single process it simply computes the missing chunks and finalizes.
    """
    rank, world = rank_and_world(group)
    store: GradientStore | None = None
    error: BaseException | None = None
    finished = False
    if rank == 0:
        try:
            store = GradientStore.create(path, blocks=blocks, n_examples=n_examples, fingerprints=fingerprints,
                                         chunk_size=chunk_size, dtype=dtype, meta=meta, projection=projection)
            store.check_free_space(store.missing_chunks())
        except BaseException as e:  # shared with the other ranks below, then re-raised
            error = e
    try:
        if world > 1:
            payload: list[Any] = [None]
            if rank == 0:
                payload[0] = (("error", f"{type(error).__name__}: {error}") if error is not None
                              else ("ok", store.lock_token, store.missing_chunks()))  # type: ignore[union-attr]
            dist.broadcast_object_list(payload, src=_src(group), group=group)
            if error is not None:
                raise error
            if payload[0][0] == "error":
                raise DataInfError(f"rank 0 could not create the store {path}: {payload[0][1]}")
            _, token, missing = payload[0]
            if rank != 0:
                store = GradientStore.join(path, token)
        else:
            if error is not None:
                raise error
            missing = store.missing_chunks()  # type: ignore[union-attr]
        assert store is not None
        mine = missing[rank::world]
        if rank == 0 and len(missing) < store.num_chunks:
            logger.info("resuming %s: %d of %d chunks already stored", path, store.num_chunks - len(missing),
                        store.num_chunks)
        failure: BaseException | None = None
        todo = sum(len(store.chunk_rows(c)) for c in mine)
        bar = tqdm(total=todo, desc="train gradients", unit="ex", disable=not (progress and rank == 0))
        stream = StreamingWriter(store)  # the store's one way in for rows (the collector's batches, chunks here)
        try:
            for c in mine:
                stream.add(store.chunk_rows(c), compute_chunk(store.chunk_rows(c), bar))
        except Exception as e:
            failure = e
        finally:
            bar.close()
        if world > 1:
            _agree(failure, group, "computing the gradient store")
        elif failure is not None:
            raise failure
        # a store found complete (same fingerprints, so the same records) is left as it is: a rerun changes no file
        untouched = not missing and store.complete and (records is None or (Path(path) / RECORDS_FILE).is_file())
        if rank == 0 and not untouched:
            try:
                if records is not None and failure is None:
                    store.write_records(records)
                store.finalize()
            except Exception as e:
                failure = e
        if world > 1:
            _agree(failure, group, "finalizing the gradient store")
        elif failure is not None:
            raise failure
        finished = True
    finally:
        if store is not None:
            if not finished and rank == 0:
                store.discard_if_unused()  # refused before its first chunk: a new store leaves nothing behind
            store.close()  # rank 0 releases the lock (finished chunks stay: a rerun resumes)
    return GradientStore.open(path)


# --------------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------------


def _named(grads: Blocks | GradientStore, what: str) -> list[tuple[str, Any]]:
    """Blocks as (name, tensor or row source) pairs, named like datainf.influence names them."""
    if isinstance(grads, GradientStore):
        return list(grads.blocks().items())
    return as_blocks(grads, what)


def assign_blocks(sizes: Sequence[int], world_size: int) -> list[list[int]]:
    """Split blocks across ranks, largest first to the least loaded rank (ties: lowest rank, first block).

    Args:
        sizes: the cost of each block (its number of parameters d).
        world_size: number of ranks.
    Returns:
        for each rank, the indices of its blocks in ascending order. Deterministic, so every rank agrees.
    """
    load = [0] * world_size
    share: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        share[r].append(i)
        load[r] += sizes[i]
    return [sorted(s) for s in share]


def _subset_damping(damping: Any, names: list[str], mine: list[int]) -> Any:
    """This rank's share of a per-block damping (a number applies to every block as it is)."""
    if damping is None or isinstance(damping, (int, float)):
        return damping
    if isinstance(damping, Mapping):
        return {names[i]: damping[names[i]] for i in mine if names[i] in damping}
    return {names[i]: damping[i] for i in mine}


def _all_reduce(t: Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                group: Any) -> Tensor:
    total = (t if t is not None else torch.zeros(shape, dtype=dtype, device=device)).to(_comm_device(group))
    total = total.contiguous()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total.to(device)


def distributed_score(
    train_grads: Blocks | GradientStore,
    query_grads: Blocks | None,
    arguments: ScoreArguments,
    *,
    curvature: Any = None,
    group: Any = None,
) -> ScoreResult:
    """:func:`datainf.estimators.score` (``query_grads`` given) or :func:`~datainf.estimators.score_self`
    (``query_grads`` None) with the blocks split across the ranks of ``group``; same arguments, same result.

    Every rank must call it with the same arguments (collective) and gets the full result, equal to the
    single-process one up to float rounding (blocks are summed in another order). Without a process group
    it is exactly the single-process function.
    """
    if not is_distributed(group):
        train = train_grads.blocks() if isinstance(train_grads, GradientStore) else train_grads
        if query_grads is None:
            return score_self(train, arguments, curvature=curvature)
        return score(train, query_grads, arguments, curvature=curvature)
    rank, world = rank_and_world(group)
    t0 = time.perf_counter()
    error: BaseException | None = None
    partial = PartialScores(None)
    names: list[str] = []
    shape: tuple[int, ...] = ()
    dtype, device = torch.float32, torch.device("cpu")
    try:
        train = _named(train_grads, "train_grads")
        names = [n for n, _ in train]
        mine = assign_blocks([math.prod(tuple(g.shape)[1:]) for _, g in train], world)[rank]
        n = int(train[0][1].shape[0])
        sub_query = None
        m = 0
        if query_grads is not None:
            query = dict(_named(query_grads, "query_grads"))
            if set(query) != set(names):
                raise DataInfError(
                    f"query_grads and train_grads name different blocks ({sorted(query)} != {sorted(names)}); "
                    "pass the same blocks"
                )
            sub_query = {names[i]: query[names[i]] for i in mine}
            m = 1 if arguments.mean_query else int(query[names[0]].shape[0])
        shape = (n,) if query_grads is None else (n, m)
        first = train[0][1]
        dtype = arguments.torch_dtype or (torch.float64 if first.dtype == torch.float64 else torch.float32)
        device = torch.device(arguments.device) if arguments.device is not None else getattr(
            first, "device", torch.device("cpu"))
        if mine:
            sub_args = arguments.replace(damping=_subset_damping(arguments.damping, names, mine))
            sub_train = {names[i]: train[i][1] for i in mine}
            partial = partial_scores(sub_train, sub_query, sub_args, curvature)
    except AllBlocksZeroError:
        pass  # this rank's blocks are all zero: it contributes zeros
    except BaseException as e:
        error = e
    _agree(error, group, f"scoring ({arguments.method})")
    infos: list[Any] = [None] * world
    dist.all_gather_object(infos, (partial.scores is None, partial.damping, partial.diagnostics,
                                   partial.curvature_seconds), group=group)
    if all(empty for empty, *_ in infos):
        raise AllBlocksZeroError("every block has all-zero training gradients; nothing to score")
    total = PartialScores(_all_reduce(partial.scores, shape, dtype, device, group))
    if arguments.normalize and query_grads is not None:
        total.train_quadratic = _all_reduce(partial.train_quadratic, (shape[0],), dtype, device, group)
        total.query_quadratic = _all_reduce(partial.query_quadratic, (shape[1],), dtype, device, group)
    for _, damping, diagnostics, seconds in infos:
        total.damping.update(damping)
        total.diagnostics.update(diagnostics)
        total.curvature_seconds = max(total.curvature_seconds, seconds)
    kind = "self_influence" if query_grads is None else "influence"
    return finish(total, arguments, kind, time.perf_counter() - t0, world_size=world, block_order=names)


def _legacy(method: str, damping: Damping, chunk_size: int, dtype: Any, device: Any,
            options: dict[str, Any]) -> tuple[ScoreArguments, Any]:
    curvature = options.pop("factors", None)
    return ScoreArguments(method=method, damping=damping, chunk_size=chunk_size, dtype=dtype,
                          device=None if device is None else str(device), options=options), curvature


def distributed_influence(train_grads: Blocks | GradientStore, query_grads: Blocks, method: str = DEFAULT_METHOD,
                          damping: Damping = None, *, chunk_size: int = 2048, dtype: torch.dtype | None = None,
                          device: torch.device | str | None = None, group: Any = None, **options: Any) -> Tensor:
    """:func:`datainf.influence` with the blocks split across ranks (see :func:`distributed_score`)."""
    arguments, curvature = _legacy(method, damping, chunk_size, dtype, device, dict(options))
    return distributed_score(train_grads, query_grads, arguments, curvature=curvature, group=group).scores


def distributed_self_influence(train_grads: Blocks | GradientStore, method: str = DEFAULT_METHOD,
                               damping: Damping = None, *, chunk_size: int = 2048,
                               dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                               group: Any = None, **options: Any) -> Tensor:
    """:func:`datainf.self_influence` with the blocks split across ranks: ``(n_train,)`` on every rank."""
    arguments, curvature = _legacy(method, damping, chunk_size, dtype, device, dict(options))
    return distributed_score(train_grads, None, arguments, curvature=curvature, group=group).scores


__all__ = [
    "assign_blocks",
    "distributed_influence",
    "distributed_score",
    "distributed_self_influence",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "rank_and_world",
    "shutdown_distributed",
    "write_store",
]
