"""Read a data file into rows (dicts) and column names, whatever its kind.

JSON Lines and CSV/TSV are read here (so a bad row is named by its line number, and a file that is not
UTF-8 gets one clear line); JSON arrays and parquet go through ``datasets``' own loaders
(``Dataset.from_json``, ``Dataset.from_parquet``); a folder written by ``save_to_disk`` is loaded with
``datasets.load_from_disk`` (``split`` picks a split of a DatasetDict).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from datainf.errors import DataInfError

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


def _text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataInfError(f"{path}: line {line} is not UTF-8 (byte {e.start}); save the file as UTF-8") from None


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
        reader = csv.DictReader(_text(path).splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        rows = list(reader)
        return rows, list(reader.fieldnames or [])
    if suffix == ".jsonl" or (suffix == ".json" and not _text(path).lstrip().startswith("[")):
        rows = []
        for number, line in enumerate(_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataInfError(f"{path}: line {number} is not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise DataInfError(f'{path}: line {number} is not a JSON object like {{"text": ..., "label": ...}}')
            rows.append(row)
        columns: list[str] = []
        for row in rows:
            columns.extend(key for key in row if key not in columns)
        return rows, columns
    if suffix in (".json", ".parquet"):
        import datasets

        _text(path) if suffix == ".json" else None  # a non-UTF-8 JSON file gets the one-line error
        loader = datasets.Dataset.from_json if suffix == ".json" else datasets.Dataset.from_parquet
        try:
            data = loader(str(path), keep_in_memory=True)
        except Exception as e:  # noqa: BLE001 - the loaders raise many kinds; one line says which file
            raise DataInfError(f"{path} cannot be read as {suffix[1:]}: {str(e).splitlines()[0][:200]}") from None
        return _from_datasets(data)
    raise DataInfError(
        f"{path}: unsupported file type {suffix!r}; use {', '.join(SUFFIXES)} or a save_to_disk folder"
    )


def read_json_object(path: str | Path, fix: str = "") -> dict[str, Any]:
    """A JSON file that must hold one object (a settings or state file), or one error line naming the file
    and, with ``fix``, what to do about it."""
    path, hint = Path(path), f"; {fix}" if fix else ""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataInfError(f"{path} is unreadable ({e}){hint}") from None
    if not isinstance(data, dict):
        raise DataInfError(f"{path} is not a JSON object{hint}")
    return data


__all__ = ["SUFFIXES", "read_json_object", "read_table"]
