"""Class labels of a classification data file, read one way for a whole run.

A label is a class id (an integer: ``1``, ``1.0``, ``"1"``) or a class name (any other text: ``"pos"``).
One column holds one kind. Names become ids by the sorted set of the *training* file's names; every other
file of the run (validation, queries) is read with that same mapping (:func:`label_ids` with ``names``),
kept in the training store's manifest and in the adapter folder of `datainf finetune`. Anything else is
refused with its row number (0-based, in file order): a fraction (``1.5``), a list (``[1]``), a boolean, an
empty cell, a name the training set does not have, a mix of ids and names, a negative id, and (with
``num_labels``) an id the classifier has no class for.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datainf.errors import DataInfError

_INTEGER = re.compile(r"^[+-]?\d+$")


def _kind(value: Any) -> tuple[str, Any]:
    """("id", int) | ("name", str) | ("missing", None) | ("bad", value)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "missing", None
    if isinstance(value, bool):
        return "bad", value
    if isinstance(value, int):
        return "id", value
    if isinstance(value, float):
        return ("id", int(value)) if math.isfinite(value) and value.is_integer() else ("bad", value)
    if isinstance(value, str):
        text = value.strip()
        if not text or text.lower() in ("nan", "null", "none"):
            return "missing", None
        if _INTEGER.match(text):
            return "id", int(text)
        try:
            number = float(text)
        except ValueError:
            return "name", text
        return ("id", int(number)) if math.isfinite(number) and number.is_integer() else ("bad", value)
    return "bad", value


def describe(names: Sequence[str] | None) -> str:
    """``0=neg, 1=pos`` for a mapping of names (or ``class ids as given``)."""
    if not names:
        return "class ids as given"
    return ", ".join(f"{i}={name}" for i, name in enumerate(names))


def label_ids(values: Sequence[Any], path: str | Path, column: str = "label", *,
              names: Sequence[str] | None = None, num_labels: int | None = None
              ) -> tuple[list[int], list[str] | None]:
    """The class id of every row and the names the ids stand for (None for integer labels).

    Args:
        values: the label column, one value per row.
        path, column: for the messages.
        names: the run's mapping (the training set's sorted names): names are read through it and a name it
            lacks is refused. None: this file defines the mapping (its sorted set of names).
        num_labels: the classifier's number of classes; an id outside 0..num_labels-1 is refused.
    """
    kinds = [_kind(v) for v in values]
    for row, (kind, value) in enumerate(kinds):
        if kind == "missing":
            raise DataInfError(f"{path}: row {row} has no value in column {column!r}; fill it in or drop the row")
        if kind == "bad":
            what = type(value).__name__
            raise DataInfError(f"{path}: row {row} has label {value!r} ({what}) in column {column!r}, which is "
                               "neither a whole class id nor a class name; use ids 0..K-1 or names")
    id_rows = [r for r, (k, _) in enumerate(kinds) if k == "id"]
    name_rows = [r for r, (k, _) in enumerate(kinds) if k == "name"]
    if names is None and id_rows and name_rows:
        a, b = id_rows[0], name_rows[0]
        raise DataInfError(f"{path}: column {column!r} mixes class ids and class names (row {a} has "
                           f"{values[a]!r}, row {b} has {values[b]!r}); use one kind for every row")
    if names is None and name_rows:
        names = sorted({v for _, v in kinds})
    index = {name: i for i, name in enumerate(names or [])}
    ids = []
    for row, (kind, value) in enumerate(kinds):
        if kind == "name":
            if value not in index:
                raise DataInfError(f"{path}: row {row} has label {value!r}, which is not one of the run's class "
                                   f"names ({describe(names)}, from the training set); fix the label or the file")
            value = index[value]
        elif value < 0:
            raise DataInfError(f"{path}: row {row} has the negative label {value}; use class ids 0..K-1")
        ids.append(value)
    if num_labels is not None:
        check_range(ids, num_labels, path, column)
    return ids, (list(names) if names is not None else None)


def check_range(ids: Sequence[int], num_labels: int, path: str | Path, column: str = "label") -> None:
    """Refuse the first row whose class id has no class in a ``num_labels``-way classifier."""
    for row, y in enumerate(ids):
        if not 0 <= y < num_labels:
            raise DataInfError(f"{path}: row {row} has label {y} in column {column!r}, but the classifier has "
                               f"{num_labels} classes (ids 0..{num_labels - 1}); fix the label, or pass the "
                               "number of classes the model was trained with (--num-labels)")


def head_size(ids: Sequence[int], names: Sequence[str] | None, path: str | Path,
              num_labels: int | None = None) -> int:
    """The number of classes a new classifier head gets from its training labels: the number of names, or
    the ids 0..K-1. Ids with gaps ({0, 1, 7}) are refused unless ``num_labels`` asks for that head on purpose."""
    if names:
        needed = len(names)
        if num_labels is not None and num_labels < needed:
            raise DataInfError(f"{path}: the labels have {needed} class names ({describe(names)}), more than "
                               f"--num-labels {num_labels}")
        return max(num_labels or needed, 2)
    if num_labels is not None:
        check_range(ids, num_labels, path)
        return max(num_labels, 2)
    present = sorted(set(ids))
    needed = present[-1] + 1
    if present != list(range(needed)):
        absent = sorted(set(range(needed)) - set(present))
        shown = ", ".join(map(str, absent[:8])) + (", ..." if len(absent) > 8 else "")
        raise DataInfError(f"{path}: the labels are the class ids {present[:10]}{' ...' if len(present) > 10 else ''}"
                           f", so ids {shown} never occur and the classifier would get a {needed}-class head; "
                           f"relabel them 0..{len(present) - 1}, or pass --num-labels {needed} to train that head "
                           "on purpose")
    return max(needed, 2)


__all__ = ["check_range", "describe", "head_size", "label_ids"]
