"""`datainf top`: the top-k helpful and harmful training examples of every query and method, as data."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import click

from datainf.cli.common import data_options
from datainf.cli.options import method_option, option, overwrite_option
from datainf.errors import DataInfError
from datainf.outputs import TOP_COLUMNS, check_apart, check_output

COLUMNS = TOP_COLUMNS
#: the first characters that make a spreadsheet read a CSV cell as a formula (OWASP's CSV injection list)
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def neutralised(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as text: a string starting like a formula gets a leading single quote
    (OWASP's advice); numbers and other strings are unchanged."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value
#: how many "this list is short" notes `top` prints before summing up the rest
_NOTES_SHOWN = 5


def training_records(loaded: Any, data_path: str | None, data: dict[str, Any]) -> list[dict] | None:
    """The training examples of a scores file: from ``--data`` (checked against the store's dataset
    fingerprint, so texts are never attached to the wrong scores), else the store's own records."""
    from datainf.cli.common import scored_training_data
    from datainf.store import GradientStore

    if data_path is not None:
        return scored_training_data(loaded, data_path, **data)
    path = (loaded.meta.get("train_store") or {}).get("path")
    if path and Path(path).is_dir():
        return GradientStore.open(path).records()
    return None


def query_records(loaded: Any) -> list[dict] | None:
    from datainf.store import GradientStore

    path = (loaded.meta.get("query_store") or {}).get("path")
    if path and Path(path).is_dir():
        return GradientStore.open(path).records()
    return None


@click.command("top")
@option("--scores")
@option("--data", default=None,
        help="The training data (default: the examples kept in the training store).")
@data_options
@option("--k")
@method_option(None, "Only these methods (comma-separated or repeated); default all in the file.", registered=False,
               dest="only")
@option("--format")
@option("--out", "out_path", default=None,
        help="Output file; default stdout. An existing file is replaced only if it is a table of this command "
                   "(or with --overwrite).")
@overwrite_option
def command(scores_path: str, data_path: str | None, k: int, only: tuple[str, ...], out_format: str,
            out_path: str | None, overwrite: bool, **data: Any) -> None:
    """Per method and query: rank, training index, score and the training example's text. In CSV, a text
    starting with =, +, -, @, a tab or a carriage return gets a leading ' (a spreadsheet shows it as text)."""
    from datainf.ranking import short_lists, sign_note, top_examples
    from datainf.scoring import load_scores

    inputs = {"scores file": scores_path, "data file": data_path}
    if out_path is not None:
        check_apart(out_path, inputs)
    loaded = load_scores(scores_path)
    if out_path is not None:  # the stores whose records it reads are inputs too
        check_output(out_path, inputs={**inputs, "training store": (loaded.meta.get("train_store") or {}).get("path"),
                                       "query store": (loaded.meta.get("query_store") or {}).get("path")},
                     kind="top", overwrite=overwrite)
    methods = list(only) or list(loaded.scores)
    missing = [m for m in methods if m not in loaded.scores]
    if missing:
        raise DataInfError(f"{scores_path} holds no scores for {missing}; it has {list(loaded.scores)}")
    train, queries = training_records(loaded, data_path, data), query_records(loaded)
    rows, notes = [], []
    for method in methods:
        scores = loaded.scores[method]
        qs = queries if queries is not None and scores.ndim == 2 and scores.shape[1] == len(queries) else None
        rows += top_examples(scores, k, method=method, train_records=train, query_records=qs)
        notes += [f"{method}, {query}: {sign_note(kind, count, scores.shape[0])}, so its {kind} list holds "
                  f"{'only those' if count else 'no rows'}" for query, kind, count in short_lists(scores, k)]
    for note in notes[:_NOTES_SHOWN]:  # a list never shows an example of the other sign: say why it is short
        click.echo(f"note: {note}", err=True)
    if len(notes) > _NOTES_SHOWN:
        click.echo(f"note: (and {len(notes) - _NOTES_SHOWN} more lists shorter than --k {k})", err=True)
    dropped = set((loaded.meta.get("train_store") or {}).get("dropped_rows") or [])
    if dropped:  # the store left out examples with a non-finite loss: say which row of the data each one is
        source = [i for i in range(loaded.n_train + len(dropped)) if i not in dropped]
        for row in rows:
            row["train_data_row"] = source[row["train_index"]]
    write_rows(rows, out_format, out_path)


def write_rows(rows: list[dict[str, Any]], out_format: str, out_path: str | None) -> None:
    """Rows of :mod:`datainf.ranking` as JSON lines or CSV (formula-like cells neutralised) to ``out_path``
    (atomically; the caller has checked it with the output guard) or stdout."""
    if out_format == "jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    else:
        buffer = io.StringIO()
        data = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in COLUMNS]  # the records' columns
        writer = csv.DictWriter(buffer, fieldnames=[c for c in COLUMNS if any(c in r for r in rows)] + data,
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows({key: neutralised(value) for key, value in row.items()} for row in rows)
        text = buffer.getvalue()
    if out_path is None:
        click.echo(text, nl=False)
    else:
        from datainf import atomic

        atomic.write_text(out_path, text)
        click.echo(f"wrote {len(rows)} rows to {out_path}", err=True)
