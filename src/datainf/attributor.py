"""The Attributor: model + dataset -> gradient store -> scores, staged and resumable.

```
attributor = datainf.Attributor(model, task="causal_lm", store="runs/my-run", tokenizer=tokenizer)
attributor.fit(train_dataset)                                  # per-example gradients into the store (resumes)
scores = attributor.scores(query_dataset, method="datainf")    # (n_train, n_query)
attributor.self_influence(method="datainf")                    # (n_train,)
attributor.top(scores, k=10)                                   # most helpful / most harmful per query
```
Sign convention: ``scores[k, j]`` is the first-order change of query j's loss when training example k is
up-weighted. Positive = harmful (raises the query's loss), negative = helpful.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from datainf.data.collate import TextCollator
from datainf.distributed import (
    distributed_influence,
    distributed_self_influence,
    is_distributed,
    is_main_process,
    write_store,
)
from datainf.errors import DataInfError
from datainf.gradients import per_example_gradients, tracked_parameters
from datainf.store import GradientStore, fingerprint_dataset, fingerprint_model, fingerprint_task

log = logging.getLogger("datainf.attributor")


def as_records(dataset: Any) -> Sequence[Any]:
    """A list of dicts, a torch ``Dataset`` or a Hugging Face ``datasets.Dataset``, as an indexable sequence."""
    if isinstance(dataset, Sequence) and not isinstance(dataset, (str, bytes)):
        return dataset
    if hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
        return _Indexable(dataset)
    raise DataInfError(
        f"cannot read a dataset of type {type(dataset).__name__}: pass a list of dicts, a torch Dataset "
        "or a Hugging Face datasets.Dataset"
    )


class _Indexable(Sequence):
    def __init__(self, data: Any):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self.data[j] for j in range(*i.indices(len(self)))]
        return self.data[int(i)]


def length_sorted_batches(records: Sequence[Any], batch_size: int) -> list[list[int]]:
    """Indices of ``records`` in batches of similar length (longest first), so that padded batches waste
    little compute on padding tokens. The length of a record is that of its text fields (a cheap proxy for
    its token count); records without text keep their order."""
    def size(r: Any) -> int:
        if isinstance(r, Mapping):
            return sum(len(v) for v in r.values() if isinstance(v, str))
        return 0

    order = sorted(range(len(records)), key=lambda i: -size(records[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _jsonable(record: Any) -> Any:
    if isinstance(record, Mapping):
        return {str(k): _jsonable(v) for k, v in record.items()}
    if isinstance(record, Tensor):
        return record.tolist()
    if isinstance(record, (list, tuple)):
        return [_jsonable(v) for v in record]
    return record


class Attributor:
    """Influence of training examples on queries for one model (a PEFT model with a LoRA adapter, say).

    Args:
        model: a ``torch.nn.Module`` whose trainable parameters are the blocks to attribute (for a PEFT model:
            every LoRA A and B matrix and any ``modules_to_save`` head, each its own block).
        task: "classification", "causal_lm", "causal_lm_mean" or a callable ``loss(model, batch) -> (B,)``.
        store: the directory of the training set's gradient store (created, or resumed, by :meth:`fit`).
        tokenizer: used by the default collate function for records with raw text.
        collate: ``collate(records) -> batch dict``; default :class:`TextCollator` for the task.
        batch_size: examples per forward/backward pass.
        chunk_size: examples per store shard (the unit of resumption).
        store_dtype: "float32" (default), "float16", "bfloat16", or "float64" (for float64 models: exact
            references in tests).
        params, group_lora: which parameters are blocks (see :func:`datainf.per_example_gradients`).
        device: where the model runs; default the model's device.
        progress: show progress bars.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        task: str | Callable[..., Tensor] = "classification",
        store: str | os.PathLike = "runs/datainf",
        *,
        tokenizer: Any = None,
        collate: Callable[[Sequence[Any]], Mapping[str, Tensor]] | None = None,
        batch_size: int = 16,
        chunk_size: int = 256,
        store_dtype: str = "float32",
        max_length: int = 128,
        params: Any = None,
        group_lora: bool = False,
        device: str | torch.device | None = None,
        progress: bool = True,
    ):
        if batch_size < 1 or chunk_size < 1:
            raise DataInfError("batch_size and chunk_size must be >= 1")
        self.model = model
        self.task = task
        self.store_path = Path(store)
        self.tokenizer = tokenizer
        task_name = task if isinstance(task, str) else "callable"
        self.collate = collate or TextCollator(tokenizer=tokenizer, task=task_name, max_length=max_length)
        self.batch_size = batch_size
        self.chunk_size = chunk_size
        self.store_dtype = store_dtype
        self.params = params
        self.group_lora = group_lora
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.progress = progress
        self._store: GradientStore | None = None

    # ---------------------------------------------------------------- gradients
    def _task_fingerprint(self) -> str:
        c = self.collate
        collate = (
            {k: getattr(c, k) for k in ("task", "max_length", "text_key", "label_key", "prompt_key", "response_key")}
            if isinstance(c, TextCollator) else getattr(c, "__qualname__", type(c).__qualname__)
        )
        task = self.task if isinstance(self.task, str) else getattr(self.task, "__qualname__", "callable")
        return fingerprint_task({"task": task, "collate": collate, "params": repr(self.params),
                                 "group_lora": self.group_lora})

    def _batch_grads(self, records: Sequence[Any]) -> dict[str, Tensor]:
        batch = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in self.collate(records).items()}
        grads = per_example_gradients(self.model, batch, self.task, params=self.params, group_lora=self.group_lora)
        return {k: v.detach().to("cpu") for k, v in grads.items()}  # float32 (float64 for a float64 model)

    def _block_shapes(self, first: Sequence[Any]) -> dict[str, tuple[int, ...]]:
        grads = self._batch_grads(first[:1])
        return {k: tuple(v.shape[1:]) for k, v in grads.items()}

    def gradients(self, dataset: Any, desc: str = "query gradients") -> dict[str, Tensor]:
        """Per-example gradients of a (small) dataset in memory: block -> (n, *block_shape), float32 (float64
        for a float64 model)."""
        records = as_records(dataset)
        if len(records) == 0:
            raise DataInfError("the dataset is empty")
        return self._grads_in_order(records, range(len(records)), desc=desc)

    def _grads_in_order(self, records: Sequence[Any], rows: range, desc: str | None = None,
                        bar: Any = None) -> dict[str, Tensor]:
        """Gradients of ``records[rows]`` in row order, computed in length-sorted batches."""
        subset = [records[i] for i in rows]
        out: dict[str, Tensor] = {}
        batches = length_sorted_batches(subset, self.batch_size)
        for idx in tqdm(batches, desc=desc, disable=not self.progress or desc is None, unit="batch"):
            for k, v in self._batch_grads([subset[i] for i in idx]).items():
                if k not in out:
                    out[k] = torch.empty((len(subset), *v.shape[1:]), dtype=v.dtype)
                out[k][idx] = v
            if bar is not None:
                bar.update(len(idx))
        return out

    def fit(self, train_dataset: Any) -> GradientStore:
        """Compute the training set's per-example gradients into the store; resumes an interrupted run.

        A store made with another model, adapter, task or dataset is refused (the message says which).
        """
        records = as_records(train_dataset)
        if len(records) == 0:
            raise DataInfError("the training dataset is empty")
        fps = fingerprint_model(self.model)
        fingerprints = {
            "model": fps["model"],
            "adapter": fps["adapter"],
            "task": self._task_fingerprint(),
            "dataset": fingerprint_dataset([_jsonable(records[i]) for i in range(len(records))]),
        }
        blocks = self._block_shapes(records)
        if is_distributed():  # under torchrun: ranks split the missing chunks, rank 0 owns manifest and lock
            self._store = write_store(
                self.store_path, blocks=blocks, n_examples=len(records), fingerprints=fingerprints,
                compute_chunk=lambda rows: self._grads_in_order(records, rows),
                chunk_size=self.chunk_size, dtype=self.store_dtype,
                meta={"task": fingerprints["task"], "blocks_tracked": len(blocks)}, progress=self.progress,
            )
            return self._store
        store = GradientStore.create(
            self.store_path,
            blocks=blocks,
            n_examples=len(records),
            fingerprints=fingerprints,
            chunk_size=self.chunk_size,
            dtype=self.store_dtype,
            meta={"task": fingerprints["task"], "blocks_tracked": len(blocks)},
        )
        try:
            missing = store.missing_chunks()
            done = store.num_chunks - len(missing)
            if done:
                log.info("resuming %s: %d of %d chunks already stored", self.store_path, done, store.num_chunks)
            bar = tqdm(total=len(records), initial=len(records) - sum(len(store.chunk_rows(c)) for c in missing),
                       desc="train gradients", unit="ex", disable=not self.progress)
            for c in missing:
                store.write_chunk(c, self._grads_in_order(records, store.chunk_rows(c), bar=bar))
            bar.close()
            store.finalize()
        finally:
            store.close()
        self._store = GradientStore.open(self.store_path)
        return self._store

    @property
    def store(self) -> GradientStore:
        if self._store is None:
            if not (self.store_path / "manifest.json").exists():
                raise DataInfError(f"no gradient store at {self.store_path}: call fit(train_dataset) first")
            self._store = GradientStore.open(self.store_path)
        return self._store

    # ---------------------------------------------------------------- scores
    def scores(
        self,
        queries: Any,
        method: str = "datainf",
        damping: Any = None,
        *,
        mean_query: bool = False,
        save: bool = True,
        diagnostics: dict[str, Any] | None = None,
        **options: Any,
    ) -> Tensor:
        """Influence of every training example on every query: ``(n_train, n_query)``.

        Args:
            queries: a dataset of queries, or precomputed query gradients (block -> (n_query, *shape)).
            method, damping, options: as in :func:`datainf.influence`.
            mean_query: score against the mean query gradient, i.e. the influence on the average query loss
                (the paper's "influence on the validation loss"); returns ``(n_train, 1)``.
            save: write the scores and the settings that produced them next to the store.
        """
        if isinstance(queries, Mapping) and all(isinstance(v, Tensor) for v in queries.values()):
            qgrads = dict(queries)
        else:
            qgrads = self.gradients(queries)
        if mean_query:
            qgrads = {k: v.mean(dim=0, keepdim=True) for k, v in qgrads.items()}
        info: dict[str, Any] = {} if diagnostics is None else diagnostics
        t0 = time.perf_counter()
        options = self._with_curvature(method, options)
        out = distributed_influence(self.store.blocks(), qgrads, method=method, damping=damping, diagnostics=info,
                                    **options)  # = datainf.influence in one process; blocks split under torchrun
        info["seconds"] = time.perf_counter() - t0
        if save and is_main_process():
            self._save(f"influence-{method}", out, method, info, options, mean_query=mean_query)
        return out

    def self_influence(self, method: str = "datainf", damping: Any = None, *, save: bool = True,
                       **options: Any) -> Tensor:
        """Self-influence of every training example, ``(n_train,)`` (always <= 0; large magnitude = unusual)."""
        info: dict[str, Any] = {}
        options = self._with_curvature(method, options)
        out = distributed_self_influence(self.store.blocks(), method=method, damping=damping, diagnostics=info,
                                         **options)
        if save and is_main_process():
            self._save(f"self-{method}", out, method, info, options)
        return out

    def curvature(self) -> Any:
        """EK-FAC/K-FAC curvature of the store's blocks (eigenbasis from the per-example gradients' Kronecker
        factors, eigenvalues corrected by one pass): computed once, saved as ``<store>/kfac.safetensors`` with
        the store's fingerprints, and reused."""
        from datainf.kfac import FILE_NAME, curvature_from_gradients, load_curvature, save_curvature

        if (self.store.path / FILE_NAME).exists():
            return load_curvature(self.store)
        curvature = curvature_from_gradients(self.store.blocks(), shapes=self.store.block_shapes)
        if is_main_process():
            save_curvature(curvature, self.store)
        return curvature

    def _with_curvature(self, method: str, options: dict[str, Any]) -> dict[str, Any]:
        from datainf.kfac import KFAC_METHODS

        if method in KFAC_METHODS and "factors" not in options:
            if self.group_lora:
                raise DataInfError(f"method '{method}' needs one block per weight matrix; use group_lora=False")
            return {**options, "factors": self.curvature()}
        return options

    def _save(self, stem: str, scores: Tensor, method: str, info: dict, options: dict, **extra: Any) -> None:
        folder = self.store_path / "scores"
        folder.mkdir(exist_ok=True)
        meta = {
            "method": method,
            "options": {k: repr(v) for k, v in options.items() if k != "factors"},
            "damping": info.get("damping"),
            "seconds": info.get("seconds"),
            "shape": list(scores.shape),
            "store_manifest": self.store.manifest,
            **extra,
        }
        tmp = folder / f".{stem}.tmp-{os.getpid()}"
        save_file({"scores": scores.detach().cpu().contiguous()}, str(tmp),
                  metadata={"datainf": json.dumps(meta, default=str)})
        os.replace(tmp, folder / f"{stem}.safetensors")

    @staticmethod
    def top(scores: Tensor, k: int = 10) -> list[dict[str, list[tuple[int, float]]]]:
        """For each query (column): the k most helpful (most negative) and most harmful (most positive)
        training examples as ``(index, score)`` pairs."""
        if scores.ndim == 1:
            scores = scores[:, None]
        k = min(k, scores.shape[0])
        out = []
        for j in range(scores.shape[1]):
            col = scores[:, j]
            helpful = torch.topk(-col, k)
            harmful = torch.topk(col, k)
            out.append({
                "helpful": [(int(i), float(col[i])) for i in helpful.indices],
                "harmful": [(int(i), float(col[i])) for i in harmful.indices],
            })
        return out


__all__ = ["Attributor", "as_records", "tracked_parameters"]
