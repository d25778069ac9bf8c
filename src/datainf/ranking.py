"""Top-k training examples per query as data: what `explain`, `top`, the report and ``Attributor.top`` show.

Scores follow the library's sign convention (positive = harmful: up-weighting the example raises the
query's loss; negative = helpful), so the most *helpful* examples are the most negative scores and the most
*harmful* the most positive. A list holds only the examples of its sign (helpful: score < 0, harmful: score > 0;
a score of exactly 0 is in neither), so it is shorter than k when fewer examples have that sign:
:func:`short_lists` says which lists are, and :func:`sign_note` how to say so. Each row is a plain dict
(JSON/CSV-ready)::

    {"method", "query", "kind" ("helpful" | "harmful"), "rank" (1..k), "train_index", "score",
     "query_text"?, "train_text"?, "train_prompt"?, "train_response"?, "train_label"?,
     "train_COLUMN"?, "query_COLUMN"?}

where COLUMN is each data column of the records (:func:`data_columns`: a plain value under a key that is not
the record's text, label or format, e.g. ``skill``, ``source``, ``id``); one whose name would take a key
above (a column ``index``) is left out.

Texts come from the records when given: a chat record (``messages``, or a prompt and a completion given as
lists of turns) shows its last user turn as the prompt and its last assistant turn as the response; a
prompt/response record shows both; a text record its text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from datainf.errors import DataInfError

#: the two lists of every query, in the order rows come
KINDS = ("helpful", "harmful")
#: record keys that are its text, label or format (rows show them as such): never a data column
RECORD_KEYS = frozenset({"prompt", "response", "completion", "messages", "text", "text_pair", "label", "label_name",
                         "turns", "flipped", "true_label", "input_ids", "labels", "attention_mask"})


def data_columns(record: Mapping[str, Any] | None) -> dict[str, Any]:
    """The data columns the user added to a record (e.g. skill, source, id): its plain values (text, number,
    flag) under keys other than :data:`RECORD_KEYS`."""
    if not isinstance(record, Mapping):
        return {}
    return {str(k): v for k, v in record.items()
            if k not in RECORD_KEYS and isinstance(v, (str, int, float, bool))}


def record_parts(record: Mapping[str, Any] | None) -> dict[str, Any]:
    """The human-readable parts of a record: prompt / response (causal LM), text, label (classification)."""
    if not isinstance(record, Mapping):
        return {}
    out: dict[str, Any] = {}
    messages = record.get("messages")
    response = record.get("response", record.get("completion"))
    if not (isinstance(messages, list) and messages) and isinstance(record.get("prompt"), list):
        messages = record["prompt"] + (response if isinstance(response, list) else [])  # conversational pair
    if isinstance(messages, list) and messages:
        users = [m.get("content", "") for m in messages if isinstance(m, Mapping) and m.get("role") == "user"]
        replies = [m.get("content", "") for m in messages if isinstance(m, Mapping) and m.get("role") == "assistant"]
        out["prompt"] = users[-1] if users else ""
        out["response"] = replies[-1] if replies else ""
        out["turns"] = len(messages)
    elif "prompt" in record:
        out["prompt"] = str(record["prompt"])
        out["response"] = str(record.get("response", record.get("completion", "")))
    if "text" in record:
        out["text"] = str(record["text"])
    if "label" in record:
        out["label"] = record["label"]
        if "label_name" in record:
            out["label_name"] = record["label_name"]
    return out


def record_text(record: Mapping[str, Any] | None) -> str:
    """One line for a record: ``prompt -> response`` for a causal LM record, else its text."""
    parts = record_parts(record)
    if "prompt" in parts:
        return f"{parts['prompt']} -> {parts['response']}"
    return str(parts.get("text", ""))


def top_examples(
    scores: Tensor,
    k: int = 10,
    *,
    method: str = "",
    train_records: Sequence[Mapping[str, Any]] | None = None,
    query_records: Sequence[Mapping[str, Any]] | None = None,
    query_names: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """For every query (column of ``scores``, (n_train, n_query); a 1-D vector is one column), the ``k`` most
    helpful (negative scores only) and the ``k`` most harmful (positive scores only) training examples, as rows
    (see the module docstring); fewer when fewer examples have that sign."""
    if not isinstance(scores, Tensor):
        scores = torch.as_tensor(scores)
    if scores.ndim == 1:
        scores = scores[:, None]
    if scores.ndim != 2 or scores.shape[0] == 0:
        raise DataInfError(f"scores must be (n_train,) or (n_train, n_query), got shape {tuple(scores.shape)}")
    n, m = scores.shape
    if k < 1:
        raise DataInfError(f"k must be >= 1, got {k}")
    if train_records is not None and len(train_records) != n:
        raise DataInfError(f"{len(train_records)} training records for {n} rows of scores; pass the data the "
                           "scores were made from")
    if query_records is not None and len(query_records) != m:
        raise DataInfError(f"{len(query_records)} query records for {m} columns of scores")
    k = min(k, n)
    rows = []
    for j in range(m):
        col = scores[:, j].double()
        query = query_name(j, m, query_names)
        for kind in KINDS:
            hits = [(int(i), float(col[i])) for i in _signed_order(col, kind)[:k].tolist()]
            rows += hit_rows(hits, method=method, query=query, kind=kind, train_records=train_records,
                             query_record=None if query_records is None else query_records[j])
    return rows


def hit_rows(hits: Sequence[tuple[int, float]], *, method: str, query: str, kind: str,
             train_records: Sequence[Mapping[str, Any]] | None = None,
             query_record: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """One list (``kind`` of one query) as rows: ``hits`` are (training index, score), best first; rank 1..."""
    rows = []
    for rank, (i, score) in enumerate(hits, start=1):
        row: dict[str, Any] = {"method": method, "query": query, "kind": kind, "rank": rank,
                               "train_index": int(i), "score": float(score)}
        if query_record is not None:
            row["query_text"] = record_text(query_record)
        if train_records is not None:
            parts = record_parts(train_records[i])
            for key in ("prompt", "response", "text", "label", "label_name"):
                if key in parts:
                    row[f"train_{key}"] = parts[key]
            for key, value in data_columns(train_records[i]).items():
                row.setdefault(f"train_{key}", value)
        if query_record is not None:
            for key, value in data_columns(query_record).items():
                row.setdefault(f"query_{key}", value)
        rows.append(row)
    return rows


def _signed_order(col: Tensor, kind: str) -> Tensor:
    """Indices of the examples with ``kind``'s sign, most extreme first (ties in index order)."""
    signed = col if kind == "harmful" else -col
    order = torch.argsort(-signed, stable=True)
    return order[signed[order] > 0]


def query_name(j: int, m: int, query_names: Sequence[str] | None = None) -> str:
    """How rows name query ``j`` of ``m``: its given name, else "query j" ("mean query" when it is the only one)."""
    return query_names[j] if query_names is not None else (f"query {j}" if m > 1 else "mean query")


def short_lists(scores: Tensor, k: int, query_names: Sequence[str] | None = None) -> list[tuple[str, str, int]]:
    """The lists :func:`top_examples` fills with fewer than ``min(k, n_train)`` rows because fewer training
    examples have their sign: (query, as the rows name it; "helpful" | "harmful"; how many have that sign)."""
    if not isinstance(scores, Tensor):
        scores = torch.as_tensor(scores)
    if scores.ndim == 1:
        scores = scores[:, None]
    wanted = min(k, scores.shape[0])
    out = []
    for j in range(scores.shape[1]):
        col = scores[:, j].double()
        for kind in KINDS:
            count = int((col < 0).sum() if kind == "helpful" else (col > 0).sum())
            if count < wanted:
                out.append((query_name(j, scores.shape[1], query_names), kind, count))
    return out


def sign_note(kind: str, count: int, n_train: int) -> str:
    """How a short list is explained: "only 2 of 6 training examples have a harmful score (> 0)"."""
    sign = "< 0" if kind == "helpful" else "> 0"
    if count == 0:
        return f"none of the {n_train} training examples has a {kind} score ({sign})"
    return f"only {count} of {n_train} training examples {'has' if count == 1 else 'have'} a {kind} score ({sign})"


__all__ = ["KINDS", "RECORD_KEYS", "data_columns", "hit_rows", "query_name", "record_parts", "record_text", "short_lists", "sign_note", "top_examples"]
