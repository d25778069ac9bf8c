"""The Attributor: model + dataset -> gradient store -> scores, staged and resumable.

```
attributor = datainf.Attributor(model, task="causal_lm", store="runs/my-run", tokenizer=tokenizer)
attributor.fit(train_dataset)                                  # per-example gradients into the store (resumes)
scores = attributor.scores(query_dataset, method="datainf")    # (n_train, n_query)
attributor.self_influence(method="datainf")                    # (n_train,)
attributor.top(scores, k=10)                                   # most helpful / most harmful, as rows
```
Sign convention: ``scores[k, j]`` is the first-order change of query j's loss when training example k is
up-weighted. Positive = harmful (raises the query's loss), negative = helpful.
"""

from __future__ import annotations

import logging
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from datainf.data.collate import LENGTH_PROBE, TextCollator
from datainf.distributed import is_main_process, write_store
from datainf.errors import DataInfError, NonFiniteError
from datainf.estimators import ScoreArguments, ScoreResult, get_method
from datainf.estimators.defaults import DEFAULT_METHOD
from datainf.fitted import curvature_for
from datainf.gradients import (
    GradientDict,
    ProjectionSettings,
    per_example_gradients,
    projection_layout,
    tracked_parameters,
)
from datainf.ranking import top_examples
from datainf.scoring import save_scores, score_store
from datainf.store import GradientStore, StoreMeta, fingerprint_dataset, fingerprint_model, fingerprint_task
from datainf.tasks import per_example_loss

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


def plain_records(records: Sequence[Any]) -> list[dict] | None:
    """The records as plain JSON objects (texts, numbers, chat messages), or None when any holds something
    else (tensors, images): only plain records are kept in the store."""
    def plain(x: Any) -> bool:
        if isinstance(x, (str, int, float, bool)) or x is None:
            return True
        if isinstance(x, (list, tuple)):
            return all(plain(v) for v in x)
        if isinstance(x, Mapping):
            return all(isinstance(k, str) and plain(v) for k, v in x.items())
        return False

    out = []
    for i in range(len(records)):
        r = records[i]
        if not isinstance(r, Mapping) or not plain(r):
            return None
        out.append(dict(r))
    return out


def _nonfinite_message(rows: list[int], error: NonFiniteError) -> str:
    """One line naming the examples (by their index in the data) whose loss or gradient is not finite."""
    shown = ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")
    if error.what == "loss":
        values = ", ".join(str(v) for v in error.values[:3])
        return (f"example {shown} of the data has a non-finite loss ({values}): its gradient would be stored as "
                "if it were fine; fix that example or the model, or pass --skip-nonfinite "
                "(Attributor(skip_nonfinite=True)) to drop it")
    return (f"example {shown} of the data has a finite loss but a NaN or infinite gradient; fix that example or "
            "the model, or drop it from the data")


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
        label_names: classification: the names the class ids stand for (the run's mapping), kept in the
            store's manifest so that query files are read the same way.
        skip_nonfinite: drop the training examples whose loss is NaN or infinite (found by one extra forward
            pass before the store is laid out; recorded in the manifest) instead of refusing them. Without it,
            such an example stops :meth:`fit` with its index.
        projection: a :class:`datainf.gradients.ProjectionSettings` (``dim=k, seed=s``): every gradient, of
            the training set and of the queries alike, is projected with the same fixed random matrices
            inside the hooks (recorded in the store's manifest and task fingerprint; a store or queries made
            with another projection are refused). Default None: full gradients.
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
        label_names: Sequence[str] | None = None,
        skip_nonfinite: bool = False,
        projection: ProjectionSettings | None = None,
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
        self.label_names = list(label_names) if label_names is not None else None
        self.skip_nonfinite = bool(skip_nonfinite)
        if projection is not None and not isinstance(projection, ProjectionSettings):
            raise DataInfError(f"projection must be a ProjectionSettings(dim=k, seed=s), got {projection!r}")
        self.projection = projection
        self._store: GradientStore | None = None

    # ---------------------------------------------------------------- gradients
    def _collate_settings(self) -> dict[str, Any] | str:
        c = self.collate
        if isinstance(c, TextCollator):
            return c.settings()
        return getattr(c, "__qualname__", type(c).__qualname__)

    def _task_fingerprint(self) -> str:
        collate = self._collate_settings()
        task = self.task if isinstance(self.task, str) else getattr(self.task, "__qualname__", "callable")
        description = {"task": task, "collate": collate, "params": repr(self.params), "group_lora": self.group_lora}
        if self.projection is not None:  # (unprojected stores keep the fingerprint they always had)
            description["projection"] = self.projection.to_dict()
        return fingerprint_task(description)

    def _batch_grads(self, records: Sequence[Any]) -> dict[str, Tensor]:
        batch = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in self.collate(records).items()}
        grads = per_example_gradients(self.model, batch, self.task, params=self.params, group_lora=self.group_lora,
                                      projection=self.projection)
        return {k: v.detach().to("cpu") for k, v in grads.items()}  # float32 (float64 for a float64 model)

    def _block_shapes(self, first: Sequence[Any]) -> dict[str, tuple[int, ...]]:
        grads = self._batch_grads(first[:1])
        return {k: tuple(v.shape[1:]) for k, v in grads.items()}

    def gradients(self, dataset: Any, desc: str = "query gradients") -> dict[str, Tensor]:
        """Per-example gradients of a (small) dataset in memory: block -> (n, *block_shape), float32 (float64
        for a float64 model); projected with this Attributor's projection, which the returned
        :class:`~datainf.gradients.GradientDict` remembers."""
        records = as_records(dataset)
        if len(records) == 0:
            raise DataInfError("the dataset is empty")
        self._check_labels(records, "query")
        return GradientDict(self._grads_in_order(records, range(len(records)), desc=desc), projection=self.projection)

    def _num_labels(self) -> int | None:
        n = getattr(getattr(self.model, "config", None), "num_labels", None)
        return int(n) if isinstance(n, int) and not isinstance(n, bool) else None

    def _check_labels(self, records: Sequence[Any], what: str) -> None:
        """Classification: every label an integer class id the model has a class for, refused by its row
        before anything is computed or written."""
        if self.task != "classification":
            return
        n = self._num_labels()
        for i in range(len(records)):
            r = records[i]
            if not isinstance(r, Mapping) or "label" not in r:
                continue
            y = r["label"]
            if isinstance(y, Tensor) and y.numel() == 1:
                y = y.item()
            if isinstance(y, float) and y.is_integer():
                y = int(y)  # (1.0 is class 1; 1.5 is no class)
            if isinstance(y, bool) or not isinstance(y, numbers.Integral):
                raise DataInfError(f"{what} example {i} has label {y!r}; classification needs an integer class id "
                                   "(read files with datainf.data.text.load_records to map class names)")
            if n is not None and not 0 <= int(y) < n:
                raise DataInfError(f"{what} example {i} has label {y}, but the classifier has {n} classes (ids "
                                   f"0..{n - 1}); fix the label, or load the model with the number of classes it "
                                   "was trained with (--num-labels)")

    def _grads_in_order(self, records: Sequence[Any], rows: range, desc: str | None = None,
                        bar: Any = None, source: Sequence[int] | None = None) -> dict[str, Tensor]:
        """Gradients of ``records[rows]`` in row order, computed in length-sorted batches. ``source`` maps a
        row to the example's index in the data (when examples were dropped), for messages."""
        subset = [records[i] for i in rows]
        out: dict[str, Tensor] = {}
        batches = length_sorted_batches(subset, self.batch_size)
        for idx in tqdm(batches, desc=desc, disable=not self.progress or desc is None, unit="batch"):
            try:
                grads = self._batch_grads([subset[i] for i in idx])
            except NonFiniteError as e:
                where = [rows[idx[k]] for k in e.examples]
                if source is not None:
                    where = [source[w] for w in where]
                raise NonFiniteError(_nonfinite_message(where, e), where, e.what, e.values) from None
            for k, v in grads.items():
                if k not in out:
                    out[k] = torch.empty((len(subset), *v.shape[1:]), dtype=v.dtype)
                out[k][idx] = v
            if bar is not None:
                bar.update(len(idx))
        return out

    def losses(self, dataset: Any) -> Tensor:
        """Every example's loss under the task (one forward pass in eval mode, no gradients): (n,) float64."""
        records = as_records(dataset)
        out = torch.empty(len(records), dtype=torch.float64)
        modes = {m: m.training for m in self.model.modules()}
        try:
            self.model.eval()
            with torch.no_grad():
                for idx in length_sorted_batches(records, self.batch_size):
                    batch = {k: v.to(self.device) if isinstance(v, Tensor) else v
                             for k, v in self.collate([records[i] for i in idx]).items()}
                    out[idx] = per_example_loss(self.task, self.model, batch).detach().double().cpu()
        finally:
            for m, training in modes.items():
                m.training = training
        return out

    def fit(self, train_dataset: Any) -> GradientStore:
        """Compute the training set's per-example gradients into the store; resumes an interrupted run.

        A store made with another model, adapter, task or dataset is refused (the message says which). Labels
        outside the classifier's classes are refused before anything is written; an example whose loss is
        not finite stops the run with its index, or is dropped with ``skip_nonfinite`` (the manifest's
        ``meta.nonfinite.dropped`` lists the rows, and the store holds the other examples in order).
        """
        records = as_records(train_dataset)
        if len(records) == 0:
            raise DataInfError("the training dataset is empty")
        self._check_labels(records, "training")
        nonfinite: dict[str, Any] = {"policy": "skip" if self.skip_nonfinite else "refuse", "dropped": []}
        source = None
        if self.skip_nonfinite:
            losses = self.losses(records)
            bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
            if bad:
                nonfinite["dropped"] = [{"row": i, "loss": str(float(losses[i]))} for i in bad]
                nonfinite["source_rows"] = len(records)
                log.warning("dropping %d examples with a non-finite loss (rows %s)", len(bad), bad[:20])
                dropped = set(bad)
                source = [i for i in range(len(records)) if i not in dropped]
                records = [records[i] for i in source]
                if not records:
                    raise DataInfError("every training example has a non-finite loss; nothing is left to attribute")
        fps = fingerprint_model(self.model)
        fingerprints = {
            "model": fps["model"],
            "adapter": fps["adapter"],
            "task": self._task_fingerprint(),
            "dataset": fingerprint_dataset([_jsonable(records[i]) for i in range(len(records))]),
        }
        try:
            blocks = self._block_shapes(records)
        except NonFiniteError as e:
            where = [source[k] if source is not None else k for k in e.examples]
            raise NonFiniteError(_nonfinite_message(where, e), where, e.what, e.values) from None
        meta = StoreMeta(task=self._task_name(), task_fingerprint=fingerprints["task"], blocks_tracked=len(blocks),
                         collate=self._collate_settings(), nonfinite=nonfinite,
                         truncated=self._truncation(records, source),
                         labels={"names": self.label_names, "num_labels": self._num_labels()}
                         if self.task == "classification" else None)
        # one writing path for one process or torchrun: ranks split the missing chunks, rank 0 owns the lock
        self._store = write_store(
            self.store_path, blocks=blocks, n_examples=len(records), fingerprints=fingerprints,
            compute_chunk=lambda rows, bar: self._grads_in_order(records, rows, bar=bar, source=source),
            chunk_size=self.chunk_size, dtype=self.store_dtype, meta=meta.to_dict(),
            records=plain_records(records), progress=self.progress,
            projection=None if self.projection is None else projection_layout(
                self.model, self.projection, params=self.params, group_lora=self.group_lora),
        )
        return self._store

    def _truncation(self, records: Sequence[Any], source: Sequence[int] | None) -> dict[str, Any] | None:
        """Which examples the collator cuts to its max_length (None when none is, or for a collator of one's
        own): {"max_length", "examples", "rows" (the first 20), "longest"}, and a warning before any gradient."""
        if not isinstance(self.collate, TextCollator) or self.collate.tokenizer is None:
            return None
        counts = self.collate.token_counts(records)
        limit = self.collate.max_length
        over = [i for i, c in enumerate(counts) if c > limit]
        if not over:
            return None
        rows = [source[i] if source is not None else i for i in over]
        longest = max(counts)
        capped = longest >= limit * LENGTH_PROBE
        info = {"max_length": limit, "examples": len(over), "rows": rows[:20], "longest": longest,
                "longest_is_a_lower_bound": capped}
        side = self.collate.cut_side() if self.collate.task.startswith("causal_lm") else "from the right"
        log.warning("warning: %d of %d examples are longer than max_length=%d tokens (rows %s%s; the longest %s%d) and are "
                    "cut %s: their gradients are not those of the whole example; raise max_length (--max-length) "
                    "to the length the model was trained with", len(over), len(records), limit, rows[:10],
                    ", ..." if len(rows) > 10 else "", ">= " if capped else "", longest, side)
        return info

    def differences(self, store: GradientStore) -> list[str]:
        """What differs between this Attributor's model and the one ``store`` was made with: "model
        (fingerprint a vs b)" and/or "adapter (...)"; empty when they are the same."""
        mine = fingerprint_model(self.model)
        return [f"{key} (fingerprint {store.fingerprints.get(key)} vs this one's {mine[key]})"
                for key in ("model", "adapter") if store.fingerprints.get(key) not in (None, mine[key])]

    @property
    def store(self) -> GradientStore:
        if self._store is None:
            if not (self.store_path / "manifest.json").exists():
                raise DataInfError(f"no gradient store at {self.store_path}: call fit(train_dataset) first")
            self._store = GradientStore.open(self.store_path)
        return self._store

    # ---------------------------------------------------------------- scores
    def _task_name(self) -> str:
        return self.task if isinstance(self.task, str) else getattr(self.task, "__qualname__", "callable")

    def _query_gradients(self, queries: Any) -> GradientStore | dict[str, Tensor]:
        if isinstance(queries, GradientStore):
            return queries
        if isinstance(queries, GradientDict):
            return queries
        if isinstance(queries, Mapping) and queries and all(isinstance(v, Tensor) for v in queries.values()):
            return dict(queries)
        return self.gradients(queries)

    def _arguments(self, arguments: ScoreArguments | None, settings: dict[str, Any]) -> ScoreArguments:
        if arguments is not None:
            if settings:
                raise DataInfError(f"pass either arguments= or settings {sorted(settings)}, not both")
            return arguments
        fields = {"method", "damping", "chunk_size", "dtype", "device", "normalize", "mean_query", "options"}
        direct = {k: v for k, v in settings.items() if k in fields}
        options = {**direct.pop("options", {}), **{k: v for k, v in settings.items() if k not in fields}}
        return ScoreArguments(**direct, options=options)

    def score(self, queries: Any, arguments: ScoreArguments | None = None, *, save: bool = True,
              **settings: Any) -> ScoreResult:
        """Influence of every training example on every query, as a :class:`ScoreResult` (scores
        ``(n_train, n_query)``, damping per block, diagnostics, seconds).

        Args:
            queries: a dataset of queries, precomputed query gradients (block -> (n_query, *shape)), or a
                query GradientStore (refused if made with another model, adapter or task).
            arguments: a :class:`ScoreArguments`; or its fields as keywords (``method="exact"``,
                ``mean_query=True``, ``normalize=True``, ...), with any other keyword a method option
                (``iterations=20`` for lissa).
            save: write the scores (and what produced them) to ``<store>/scores/``.
        """
        arguments = self._arguments(arguments, settings)
        self._check_blocks(arguments)
        result = score_store(self.store, self._query_gradients(queries), arguments)
        if save and is_main_process():
            self._save("influence", result)
        return result

    def score_self(self, arguments: ScoreArguments | None = None, *, save: bool = True,
                   **settings: Any) -> ScoreResult:
        """Self-influence of every training example as a :class:`ScoreResult` (scores ``(n_train,)``)."""
        arguments = self._arguments(arguments, settings)
        self._check_blocks(arguments)
        result = score_store(self.store, None, arguments)
        if save and is_main_process():
            self._save("self", result)
        return result

    def scores(self, queries: Any, method: str = DEFAULT_METHOD, damping: Any = None, *, mean_query: bool = False,
               save: bool = True, **options: Any) -> Tensor:
        """:meth:`score` returning only the tensor ``(n_train, n_query)`` (``(n_train, 1)`` with
        ``mean_query``, the influence on the average query loss, the paper's "validation loss")."""
        return self.score(queries, method=method, damping=damping, mean_query=mean_query, save=save,
                          **options).scores

    def self_influence(self, method: str = DEFAULT_METHOD, damping: Any = None, *, save: bool = True,
                       **options: Any) -> Tensor:
        """Self-influence of every training example, ``(n_train,)`` (always <= 0; large magnitude = unusual)."""
        return self.score_self(method=method, damping=damping, save=save, **options).scores

    def curvature(self) -> Any:
        """EK-FAC/K-FAC curvature of the store's blocks, fitted once and cached as
        ``<store>/kfac.safetensors`` with the store's fingerprints (see :func:`datainf.fitted.curvature_for`)."""
        return curvature_for(self.store)[0]

    def _check_blocks(self, arguments: ScoreArguments) -> None:
        if get_method(arguments.method).needs_curvature and self.group_lora:
            raise DataInfError(f"method '{arguments.method}' needs one block per weight matrix; use group_lora=False")

    def _save(self, kind: str, result: ScoreResult) -> None:
        a = result.arguments
        stem = f"{kind}-{a.method}" + ("-mean" if a.mean_query else "") + ("-normalized" if a.normalize else "")
        save_scores(self.store_path / "scores" / f"{stem}.safetensors", {a.method: result}, train_store=self.store)

    def top(self, scores: Tensor | ScoreResult, k: int = 10, *, queries: Sequence[Any] | None = None,
            method: str | None = None) -> list[dict[str, Any]]:
        """For each query (column), the k most helpful (most negative) and most harmful (most positive)
        training examples (fewer when fewer have that sign: a list never holds the other sign), as rows {"method", "query", "kind", "rank", "train_index", "score", and the
        example's texts} (see :func:`datainf.ranking.top_examples`); texts come from the store's records."""
        if isinstance(scores, ScoreResult):
            method = method or scores.method
            scores = scores.scores
        plain = plain_records(as_records(queries)) if queries is not None else None
        return top_examples(scores, k, method=method or "", train_records=self.store.records(),
                            query_records=plain)


__all__ = ["Attributor", "as_records", "tracked_parameters"]
