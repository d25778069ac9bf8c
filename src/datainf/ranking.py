"""Top-k training examples per query as data: what `explain`, `top`, the report and ``Attributor.top`` show.

Scores follow the library's sign convention (positive = harmful: up-weighting the example raises the
query's loss; negative = helpful), so the most *helpful* examples are the most negative scores and the most
*harmful* the most positive. Each row is a plain dict (JSON/CSV-ready)::

    {"method", "query", "kind" ("helpful" | "harmful"), "rank" (1..k), "train_index", "score",
     "query_text"?, "train_text"?, "train_prompt"?, "train_response"?, "train_label"?}

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
    helpful and the ``k`` most harmful training examples, as rows (see the module docstring)."""
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
        query = query_names[j] if query_names is not None else (f"query {j}" if m > 1 else "mean query")
        for kind, order in (("helpful", torch.argsort(col)), ("harmful", torch.argsort(-col))):
            for rank, i in enumerate(order[:k].tolist(), start=1):
                row: dict[str, Any] = {"method": method, "query": query, "kind": kind, "rank": rank,
                                       "train_index": int(i), "score": float(col[i])}
                if query_records is not None:
                    row["query_text"] = record_text(query_records[j])
                if train_records is not None:
                    parts = record_parts(train_records[i])
                    for key in ("prompt", "response", "text", "label", "label_name"):
                        if key in parts:
                            row[f"train_{key}"] = parts[key]
                rows.append(row)
    return rows


__all__ = ["record_parts", "record_text", "top_examples"]
