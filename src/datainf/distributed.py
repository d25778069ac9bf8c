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
* Scoring (:func:`distributed_influence`, :func:`distributed_self_influence`): scores are sums over blocks,
  so the blocks are split across ranks (largest first, to the least loaded rank); each rank runs the pure
  estimators of :mod:`datainf.estimators` on its blocks over all training rows, which keeps each block's
  damping rule and curvature exactly as in one process, and the partial ``(n_train, n_query)`` sums are
  all-reduced. Every rank returns the full matrix.

Errors are collective: if one rank fails (bad input, a mismatched store), every rank raises a
:class:`~datainf.errors.DataInfError` naming it instead of waiting forever for the others.
"""

from __future__ import annotations

import atexit
import datetime
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from datainf.errors import DataInfError
from datainf.estimators import Blocks, Damping, influence, self_influence
from datainf.store import GradientStore

_ALL_ZERO = "every block has all-zero training gradients"

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
    compute_chunk: Callable[[range], Mapping[str, Tensor]],
    chunk_size: int = 256,
    dtype: str = "float32",
    meta: Mapping[str, Any] | None = None,
    progress: bool = False,
    group: Any = None,
) -> GradientStore:
    """Fill a gradient store with every rank of the process group writing its share of the missing chunks.

    Args:
        path, blocks, n_examples, fingerprints, chunk_size, dtype, meta: as in :meth:`GradientStore.create`
            (only rank 0 reads them to create or resume the store).
        compute_chunk: ``compute_chunk(rows: range) -> {block: (len(rows), *block_shape)}``, the gradients of
            the examples ``rows`` (``Attributor.fit`` passes its length-sorted batching of the chunk). Must give
            the same values on any rank.
        progress: show a progress bar on rank 0 (its own chunks).
        group: the process group (default: the world).
    Returns:
        the finished store, opened read-only, on every rank.

    Rank 0 holds the store's lock for the whole job (other ranks join with its token, see
    :meth:`GradientStore.join`), so a second job on the same store is refused. Collective: every rank of
    ``group`` must call it. In a single process it simply computes the missing chunks and finalizes.
    """
    rank, world = rank_and_world(group)
    store: GradientStore | None = None
    error: BaseException | None = None
    if rank == 0:
        try:
            store = GradientStore.create(path, blocks=blocks, n_examples=n_examples, fingerprints=fingerprints,
                                         chunk_size=chunk_size, dtype=dtype, meta=meta)
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
        failure: BaseException | None = None
        try:
            bar = tqdm(mine, desc="train gradients (chunks)", unit="chunk", disable=not (progress and rank == 0))
            for c in bar:
                store.write_chunk(c, compute_chunk(store.chunk_rows(c)))
        except Exception as e:
            failure = e
        if world > 1:
            _agree(failure, group, "computing the gradient store")
        elif failure is not None:
            raise failure
        if rank == 0:
            try:
                store.finalize()
            except Exception as e:
                failure = e
        if world > 1:
            _agree(failure, group, "finalizing the gradient store")
        elif failure is not None:
            raise failure
    finally:
        if store is not None:
            store.close()  # rank 0 releases the lock (finished chunks stay: a rerun resumes)
    return GradientStore.open(path)


# --------------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------------


def _named(grads: Blocks | GradientStore, what: str) -> list[tuple[str, Any]]:
    """Blocks as (name, tensor or row source) pairs, named like datainf.influence names them."""
    if isinstance(grads, GradientStore):
        return list(grads.blocks().items())
    if isinstance(grads, Tensor) or (hasattr(grads, "shape") and hasattr(grads, "__getitem__")
                                     and not isinstance(grads, (Mapping, Sequence))):
        return [("0", grads)]
    if isinstance(grads, Mapping):
        return [(str(k), v) for k, v in grads.items()]
    if isinstance(grads, Sequence) and not isinstance(grads, (str, bytes)):
        return [(str(i), v) for i, v in enumerate(grads)]
    raise DataInfError(
        f"{what}: expected a GradientStore, a tensor, a sequence of tensors or a mapping name -> tensor, "
        f"got {type(grads).__name__}"
    )


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


def _subset_damping(damping: Damping, names: list[str], mine: list[int]) -> Damping:
    if damping is None or isinstance(damping, (int, float)):
        return damping
    if isinstance(damping, Mapping):
        if set(map(str, damping)) != set(names):
            raise DataInfError(f"damping names blocks {sorted(map(str, damping))} but the gradients have {names}")
        by_name = {str(k): v for k, v in damping.items()}
        return {names[i]: by_name[names[i]] for i in mine}
    if isinstance(damping, Sequence) and not isinstance(damping, (str, bytes)):
        if len(damping) != len(names):
            raise DataInfError(f"damping has {len(damping)} values but there are {len(names)} blocks")
        return {names[i]: damping[i] for i in mine}
    return damping  # anything else: let the estimator report it


def _run_split(
    estimator: Callable[..., Tensor],
    train_grads: Blocks | GradientStore,
    query_grads: Blocks | None,
    method: str,
    damping: Damping,
    group: Any,
    kwargs: dict[str, Any],
) -> Tensor:
    """Run ``estimator`` on this rank's blocks and all-reduce the partial sums (collective)."""
    rank, world = rank_and_world(group)
    diagnostics = kwargs.pop("diagnostics")
    local: dict[str, Any] = {}
    error: BaseException | None = None
    partial: Tensor | None = None
    all_zero = False
    try:
        train = _named(train_grads, "train_grads")
        names = [n for n, _ in train]
        sizes = [math.prod(tuple(g.shape)[1:]) for _, g in train]
        mine = assign_blocks(sizes, world)[rank]
        n = int(train[0][1].shape[0]) if train else 0
        shape: tuple[int, ...] = (n,)
        sub_query = None
        if query_grads is not None:
            query = dict(_named(query_grads, "query_grads"))
            if set(query) != set(names):
                raise DataInfError(
                    f"query_grads and train_grads name different blocks ({sorted(query)} != {sorted(names)}); "
                    "pass the same blocks"
                )
            sub_query = {names[i]: query[names[i]] for i in mine}
            shape = (n, int(query[names[0]].shape[0]))
        first = train[0][1]
        dtype = kwargs["dtype"] or (torch.float64 if first.dtype == torch.float64 else torch.float32)
        device = torch.device(kwargs["device"]) if kwargs["device"] is not None else getattr(
            first, "device", torch.device("cpu"))
        sub_damping = _subset_damping(damping, names, mine)
        if mine:
            sub_train = {names[i]: train[i][1] for i in mine}
            args = (sub_train,) if sub_query is None else (sub_train, sub_query)
            try:
                partial = estimator(*args, method=method, damping=sub_damping, diagnostics=local, **kwargs)
            except DataInfError as e:
                if _ALL_ZERO not in str(e):
                    raise
                all_zero = True
        if partial is None:
            partial = torch.zeros(shape, dtype=dtype, device=device)
    except BaseException as e:
        error = e
    _agree(error, group, f"scoring ({method})")
    assert partial is not None
    infos: list[Any] = [None] * world
    dist.all_gather_object(infos, (all_zero or not mine, local), group=group)
    if all(z for z, _ in infos):
        raise DataInfError(f"{_ALL_ZERO}; nothing to score")
    out_device = partial.device
    total = partial.to(_comm_device(group)).contiguous()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    if diagnostics is not None:
        merged: dict[str, Any] = {}
        for _, info in infos:
            merged.setdefault("damping", {}).update(info.get("damping", {}))
            if "lissa" in info:
                merged.setdefault("lissa", {}).update(info["lissa"])
        merged["damping"] = {k: merged["damping"][k] for k in names if k in merged.get("damping", {})}
        diagnostics.update(method=method, world_size=world, **merged)
    return total.to(out_device)


def distributed_influence(
    train_grads: Blocks | GradientStore,
    query_grads: Blocks,
    method: str = "datainf",
    damping: Damping = None,
    *,
    chunk_size: int = 2048,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    diagnostics: dict[str, Any] | None = None,
    group: Any = None,
    **options: Any,
) -> Tensor:
    """:func:`datainf.influence` with the blocks split across the ranks of ``group``; same arguments.

    ``train_grads`` may also be a :class:`GradientStore` (its memory-mapped blocks are read, each rank only
    its own blocks). Every rank must call it with the same arguments (collective); every rank returns the
    full ``(n_train, n_query)`` scores, equal to the single-process result up to float rounding (blocks
    are summed in another order). ``diagnostics`` gets the damping of every block and ``world_size``.
    Without a process group it is exactly :func:`datainf.influence`.
    """
    kwargs = dict(chunk_size=chunk_size, dtype=dtype, device=device, diagnostics=diagnostics, **options)
    if not is_distributed(group):
        train = train_grads.blocks() if isinstance(train_grads, GradientStore) else train_grads
        return influence(train, query_grads, method, damping, **kwargs)
    return _run_split(influence, train_grads, query_grads, method, damping, group, kwargs)


def distributed_self_influence(
    train_grads: Blocks | GradientStore,
    method: str = "datainf",
    damping: Damping = None,
    *,
    chunk_size: int = 2048,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    diagnostics: dict[str, Any] | None = None,
    group: Any = None,
    **options: Any,
) -> Tensor:
    """:func:`datainf.self_influence` with the blocks split across ranks: ``(n_train,)`` on every rank."""
    kwargs = dict(chunk_size=chunk_size, dtype=dtype, device=device, diagnostics=diagnostics, **options)
    if not is_distributed(group):
        train = train_grads.blocks() if isinstance(train_grads, GradientStore) else train_grads
        return self_influence(train, method, damping, **kwargs)
    return _run_split(self_influence, train_grads, None, method, damping, group, kwargs)


__all__ = [
    "assign_blocks",
    "distributed_influence",
    "distributed_self_influence",
    "init_distributed",
    "shutdown_distributed",
    "is_distributed",
    "is_main_process",
    "rank_and_world",
    "write_store",
]
