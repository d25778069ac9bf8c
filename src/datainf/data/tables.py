"""Read a data file into rows (dicts) and column names, whatever its kind.

JSON Lines, JSON arrays and CSV/TSV are read here, every character of every text kept as it is in the file
(JSON Lines split on "\\n" only; CSV parsed by the csv module on the whole text, so quoted fields keep their
line breaks); a bad row is named by its line (or row) number, and a file that is not UTF-8 gets one clear
line. Parquet goes through ``datasets``' own loader (``Dataset.from_parquet``); a folder written by
``save_to_disk`` is loaded with ``datasets.load_from_disk`` (``split`` picks a split of a DatasetDict).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from datainf.errors import DataInfError, json_lines, parse_json

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


def _text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataInfError(f"{path}: line {line} is not UTF-8 (byte {e.start}); save the file as UTF-8") from None


def _read_csv(path: Path, delimiter: str) -> tuple[list[dict], list[str]]:
    """Rows and header of a CSV / TSV file, parsed by the csv module on the whole text (so a quoted field
    keeps every character, its line breaks included); a malformed row is named by its line."""
    reader = csv.DictReader(io.StringIO(_text(path), newline=""), delimiter=delimiter)
    try:
        rows = list(reader)
    except csv.Error as e:
        raise DataInfError(f"{path}: line {reader.reader.line_num} cannot be read as {path.suffix[1:].upper()} ({e}); "
                           "check the quotes of that row, or save the data as JSON Lines") from None
    return rows, list(reader.fieldnames or [])


def _from_datasets(data: Any) -> tuple[list[dict], list[str]]:
    return data.to_list(), list(data.column_names)


def read_table(path: str | Path, split: str | None = None) -> tuple[list[dict], list[str]]:
    """Rows (dicts, in file order) and column names of a JSONL / JSON / CSV / TSV / parquet file or a saved
    ``datasets`` folder."""
    path = Path(path)
    if not path.exists():
        raise DataInfError(f"data file {path} does not exist; check the path")
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
                raise DataInfError(f"{path} holds splits {splits}; pass --split (split=) with one of them")
            data = data[split]
        elif split is not None:
            raise DataInfError(f"{path} is a single dataset without splits; drop --split")
        return _from_datasets(data)
    if split is not None:
        raise DataInfError(f"--split applies to a save_to_disk folder of splits, not to the file {path}")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return _read_csv(path, delimiter="\t" if suffix == ".tsv" else ",")
    if suffix in (".jsonl", ".json"):
        text = _text(path)
        if suffix == ".json" and text.lstrip().startswith("["):
            rows = parse_json(text, str(path))
            for number, row in enumerate(rows):
                if not isinstance(row, dict):
                    raise DataInfError(f'{path}: row {number} is not a JSON object like {{"text": ..., "label": ...}}')
        else:
            rows = []
            for number, line in enumerate(json_lines(text), start=1):
                if not line.strip():
                    continue
                row = parse_json(line, f"{path}: line {number}")
                if not isinstance(row, dict):
                    raise DataInfError(f'{path}: line {number} is not a JSON object like {{"text": ..., "label": ...}}')
                rows.append(row)
        columns: list[str] = []
        for row in rows:
            columns.extend(key for key in row if key not in columns)
        return rows, columns
    if suffix == ".parquet":
        import datasets

        try:
            data = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
        except Exception as e:  # noqa: BLE001 - the loader raises many kinds; one line says which file
            raise DataInfError(f"{path} cannot be read as parquet: {(str(e).splitlines() or [type(e).__name__])[0][:200]}") from None
        return _from_datasets(data)
    raise DataInfError(
        f"{path}: unsupported file type {suffix!r}; use {', '.join(SUFFIXES)} or a save_to_disk folder"
    )


def read_json_object(path: str | Path, fix: str = "") -> dict[str, Any]:
    """A JSON file that must hold one object (a settings or state file), or one error line naming the file
    and, with ``fix``, what to do about it."""
    path, hint = Path(path), f"; {fix}" if fix else ""
    try:
        text = path.read_bytes()
    except OSError as e:
        raise DataInfError(f"{path} is unreadable ({e}){hint}") from None
    data = parse_json(text, str(path), fix)
    if not isinstance(data, dict):
        raise DataInfError(f"{path} is not a JSON object{hint}")
    return data


__all__ = ["SUFFIXES", "read_json_object", "read_table"]
