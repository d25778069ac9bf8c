"""The one exception family of datainf: every message says what to fix; and the one safe JSON parser."""

from __future__ import annotations

import json
from typing import Any


class DataInfError(ValueError):
    """Bad input or settings. Subclasses ValueError so callers can catch either."""


class AllBlocksZeroError(DataInfError):
    """Every block of the training gradients is zero, so there is nothing to score (a rank of a distributed
    run may hold only such blocks; the others then still score theirs)."""


class NonFiniteError(DataInfError):
    """Examples whose loss (or gradient) is NaN or infinite. ``examples``: their indices (in the batch, or in
    the dataset once the Attributor has translated them); ``what``: "loss" or "gradient"; ``values``: the
    losses (for "loss")."""

    def __init__(self, message: str, examples: list[int], what: str = "loss", values: list[float] | None = None):
        super().__init__(message)
        self.examples = list(examples)
        self.what = what
        self.values = list(values or [])


def parse_json(text: str | bytes, where: str, fix: str = "") -> Any:
    """``json.loads(text)``, or one DataInfError naming ``where`` (a file, and its line or row) and, with ``fix``,
    what to do: for text that is not JSON, and for JSON nested too deeply for Python's parser (a
    RecursionError, e.g. ``"[" * 100000``). Every JSON file the library reads goes through here."""
    hint = f"; {fix}" if fix else ""
    try:
        return json.loads(text)
    except RecursionError:
        raise DataInfError(f"{where} holds JSON nested too deeply to read{hint}") from None
    except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError, an integer of too many digits
        if isinstance(e, json.JSONDecodeError):
            reason = f"{e.msg}, {f'line {e.lineno} ' if e.lineno > 1 else ''}column {e.colno}"
        else:
            reason = str(e).split("\n")[0][:200]
        raise DataInfError(f"{where} is not valid JSON ({reason}){hint}") from None


def json_lines(text: str) -> list[str]:
    """The lines of a JSON Lines text: split on "\\n" only (a trailing "\\r" dropped), never on the other
    characters ``str.splitlines`` breaks at (U+2028, U+2029, U+0085, \\x1c-\\x1e, \\v, \\f), which JSON
    allows raw inside strings."""
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
