"""One self-contained HTML file showing the results of an influence run.

Everything is inline: the CSS, the plots as base64 PNG data URIs, no JavaScript, so the file opens offline
and can be mailed around. Sections carry stable ``id`` attributes (``settings``, ``methods``, ``roc``,
``histograms``, ``harmful``, ``helpful``, ``queries``, ``diagnostics``; the per-block damping table is the
collapsed ``damping-blocks`` block of ``methods``).

This module checks the inputs and builds plain data (tables of rows of cells, cards, sections); the markup
is in the Jinja2 templates of ``report/templates`` (``report.html.j2``, ``macros.html.j2``, ``report.css``),
rendered with autoescaping on (:mod:`datainf.report.render`), and the page is written with
:func:`datainf.atomic.write_text`.

Two layouts: the default one (a classification run: settings, methods, ROC and histograms when flipped
labels are known, the harmful and helpful lists, the queries) and, with ``generation=True``, one made for
generations: each query's prompt and response first, with its own lists of helpful and harmful training
examples (prompt and response too), then the lists over the mean query, the methods and the settings.

Sign convention: a score is the first-order change of the validation (or query) loss when the training
example is up-weighted. Positive = harmful (raises the loss), negative = helpful.
"""

from __future__ import annotations

import base64
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from datainf import atomic
from datainf.errors import DataInfError
from datainf.report.plots import as_vector, histogram_png, roc_curve_png
from datainf.report.render import render

#: every query is shown; more than this many are split into collapsed pages of this many queries each
QUERIES_PER_PAGE = 25
#: a value of an extra data column (``columns``) is cut to this many characters in a cell
COLUMN_CHARS = 80
#: training texts longer than this are cut in tables (the full text is in the cell's tooltip)
MAX_TEXT_CHARS = 300
#: what a table cell shows for a value that was not measured
MISSING = "—"
#: a query's name (headings, captions, the index) is its text cut to this many characters
QUERY_NAME_CHARS = 90
#: colours of the values of a ``group_by`` column (CSS classes g0..g7 of report.css); more values reuse them
GROUP_COLOURS = 8

_METRIC_COLUMNS = (
    ("auc", "AUC (flipped)"),
    ("seconds", "Time"),
    ("pearson_with_exact", "Pearson vs exact"),
    ("spearman_with_exact", "Spearman vs exact"),
    ("damping", "Damping (per block: min · median · max)"),
)
_TASK_NOTES = {
    "classification": "cross-entropy of the label",
    "causal_lm": "generation: loss summed over the response tokens",
    "causal_lm_mean": "generation: loss averaged over the response tokens",
}


# ----------------------------------------------------------------------------------------------- formatting
def _known(value: Any) -> bool:
    """Whether a value was measured: not None, not NaN, not an empty string."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return False
    if isinstance(value, (float, np.floating)) and math.isnan(float(value)):
        return False
    return True


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def format_value(value: Any) -> str:
    """A short human string for a setting or metric: None/NaN -> MISSING, floats to 4 significant digits."""
    if not _known(value):
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4g}"
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str)


def _format_fixed(value: Any, digits: int = 3) -> str:
    """Numbers in [0, 1]-ish ranges (AUC, correlations) with a fixed number of decimals."""
    if not _is_number(value):
        return format_value(value)
    return MISSING if math.isnan(float(value)) else f"{float(value):.{digits}f}"


def format_seconds(value: Any) -> str:
    """'0.41 s', '12.3 s', '5 min 03 s', '1 h 02 min'; MISSING when missing."""
    if not _is_number(value):
        return format_value(value)
    seconds = float(value)
    if math.isnan(seconds):
        return MISSING
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def format_score(value: float) -> str:
    """Influence scores in one scientific format with an explicit sign, so a column reads at a glance."""
    return f"{value:+.3e}"


def _block_values(value: Any) -> dict[str, float] | None:
    """A per-block damping dict (block -> number) as floats, or None when ``value`` is something else."""
    if not isinstance(value, Mapping) or not value:
        return None
    if not all(_is_number(v) for v in value.values()):
        return None
    return {str(k): float(v) for k, v in value.items()}


def damping_summary(value: Any) -> str:
    """One cell for a method's damping: a per-block dict as 'min · median · max (N blocks)', or one value
    for every block; a number or a description (e.g. 'paper rule per block') as it is."""
    blocks = _block_values(value)
    if blocks is None:
        if isinstance(value, Mapping):
            return MISSING if not value else json.dumps(value, default=str)
        return format_value(value)
    values = np.array(list(blocks.values()))
    n = len(values)
    if np.allclose(values, values[0], rtol=1e-12, atol=0.0):
        return f"{values[0]:.2e} (all {n} blocks)" if n > 1 else f"{values[0]:.2e} (1 block)"
    return (f"min {values.min():.2e} · median {float(np.median(values)):.2e} · max {values.max():.2e} "
            f"({n} blocks)")


def _metric_cell(key: str, value: Any) -> str:
    if key == "seconds":
        return format_seconds(value)
    if key in ("auc", "pearson_with_exact", "spearman_with_exact"):
        return _format_fixed(value)
    if key == "damping":
        return damping_summary(value)
    return format_value(value)


def _one_line(text: Any, limit: int) -> str:
    """Text on one line (whitespace collapsed), cut to ``limit`` characters with an ellipsis."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[:limit].rstrip() + " …"


# ----------------------------------------------------------------------------------------------- checking
def _ordered(names: Sequence[str]) -> list[str]:
    """Registered methods first, in the registry's order; any other entry follows in the order given."""
    from datainf.estimators.registry import method_names

    unique = list(dict.fromkeys(names))
    first = [name for name in method_names() if name in unique]
    return first + [name for name in unique if name not in first]


@dataclass(frozen=True)
class _TrainInfo:
    """What the training examples carry, which decides the columns of every example table."""

    flipped: bool  # every example has "flipped"
    label: bool  # every example has "label"
    prompt: bool  # some example has "prompt" (generation records): Prompt and Response columns, not Text
    columns: tuple[str, ...] = ()  # extra data columns (e.g. "skill", "source"), one table column each
    groups: Groups | None = None  # the column the rows are grouped and coloured by (group_by)


def _check_train(train: Sequence[dict], generation: bool = False) -> _TrainInfo:
    """Validates the training examples. Classification: every example needs "text" and "label".
    Generation: "prompt" (with "response") or "text"; "label" is optional (all or none)."""
    if isinstance(train, (str, bytes)) or not isinstance(train, Sequence):
        raise DataInfError("train: expected a list with one dict per training example")
    if len(train) == 0:
        raise DataInfError("train: is empty; pass one dict per training example")
    with_flag = with_label = with_prompt = 0
    for index, example in enumerate(train):
        if not isinstance(example, Mapping):
            wanted = "'prompt' and 'response' (or 'text')" if generation else "'text' and 'label'"
            raise DataInfError(f"train[{index}]: expected a dict with {wanted}, got {type(example).__name__}")
        if generation:
            if "prompt" not in example and "text" not in example:
                raise DataInfError(f"train[{index}]: missing 'prompt' (and 'response') or 'text'; every "
                                   f"example needs one of them")
        elif "text" not in example or "label" not in example:
            raise DataInfError(f"train[{index}]: missing 'text' or 'label'; every example needs both")
        with_flag += "flipped" in example
        with_label += "label" in example
        with_prompt += "prompt" in example
    if 0 < with_flag < len(train):
        raise DataInfError(f"train: 'flipped' is given for {with_flag} of {len(train)} examples; give it for "
                           f"every example or for none")
    if 0 < with_label < len(train):
        raise DataInfError(f"train: 'label' is given for {with_label} of {len(train)} examples; give it for "
                           f"every example or for none")
    return _TrainInfo(flipped=with_flag == len(train), label=with_label == len(train), prompt=with_prompt > 0)


def _check_scores(scores: Mapping[str, Any], n_train: int) -> dict[str, np.ndarray]:
    if not isinstance(scores, Mapping) or not scores:
        raise DataInfError("scores: expected a non-empty dict method -> (n_train,) array of scores")
    checked = {}
    for name in _ordered(list(scores)):
        values = as_vector(scores[name], f"scores[{name!r}]")
        if values.shape[0] != n_train:
            raise DataInfError(f"scores[{name!r}]: has {values.shape[0]} values but train has {n_train} "
                               f"examples; pass one score per training example")
        bad = int((~np.isfinite(values)).sum())
        if bad:
            raise DataInfError(f"scores[{name!r}]: {bad} values are NaN or infinite; check that method's run")
        checked[name] = values
    return checked


def _as_matrix(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # torch.Tensor
        values = values.detach().to("cpu").double().numpy()
    return np.asarray(values, dtype=np.float64)


def _check_queries(queries: Any) -> None:
    if queries is None or isinstance(queries, (str, bytes)) or not isinstance(queries, Sequence):
        raise DataInfError("queries: query_scores was given, so pass one dict with 'text' per query")
    for index, query in enumerate(queries):
        if not isinstance(query, Mapping):
            raise DataInfError(f"queries[{index}]: expected a dict with 'text', got {type(query).__name__}")


def _check_query_scores(query_scores: Mapping[str, Any], queries: Sequence[dict] | None,
                        n_train: int) -> dict[str, np.ndarray]:
    if not isinstance(query_scores, Mapping) or not query_scores:
        raise DataInfError("query_scores: expected a non-empty dict method -> (n_train, n_query) array")
    _check_queries(queries)
    checked = {}
    for name in _ordered(list(query_scores)):
        matrix = _as_matrix(query_scores[name])
        if matrix.ndim != 2 or matrix.shape != (n_train, len(queries)):
            raise DataInfError(f"query_scores[{name!r}]: has shape {tuple(matrix.shape)}, expected (n_train, "
                               f"n_query) = ({n_train}, {len(queries)})")
        if not np.isfinite(matrix).all():
            raise DataInfError(f"query_scores[{name!r}]: contains NaN or infinite values; check that run")
        checked[name] = matrix
    return checked


# ----------------------------------------------------------------------------------------------- pieces
# Plain data for the templates (templates/macros.html.j2): tables of rows of cells, and "blocks", dicts with a
# "kind" (table, note, pre, plots, per_method, damping, index, query) that a section or a query lists.
Block = dict[str, Any]


@dataclass(frozen=True)
class Cell:
    """One table cell: its text, CSS classes, and how it is shown (a row header, a tooltip, a note before
    the text, the text in a span of a class, or in a preformatted block)."""

    text: str
    css: str = ""
    header: bool = False
    title: str = ""
    note: str = ""
    span: str = ""
    pre: bool = False


@dataclass(frozen=True)
class Row:
    """One table row: its cells and CSS classes."""

    cells: list[Cell]
    css: str = ""


@dataclass(frozen=True)
class Table:
    """One table: CSS classes, rows, header cells (none for a key-value table) and a caption."""

    css: str
    rows: list[Row]
    head: list[Cell] = field(default_factory=list)
    caption: str = ""


def _table(table: Table) -> Block:
    return {"kind": "table", "table": table}


def _note(text: str) -> Block:
    return {"kind": "note", "text": text}


def _label(example: Mapping, key: str = "label") -> str:
    value = example.get(key)
    name = example.get("label_name") if key == "label" else None
    if name is not None and str(name) != str(value):
        return f"{name} ({value})"
    return format_value(value)


def _text_cell(text: Any, limit: int = MAX_TEXT_CHARS, note: str = "") -> Cell:
    """A text cut to ``limit`` characters; the full text (up to 4000 characters) in the cell's tooltip."""
    full = str(text)
    shown = full if len(full) <= limit else full[:limit].rstrip() + " …"
    return Cell(shown, "text", title=full[:4000] if shown != full else "", note=note)


def _column_value(value: Any) -> str:
    """A value of an extra data column on one line, cut to COLUMN_CHARS; MISSING when the example has none."""
    return _one_line(format_value(value), COLUMN_CHARS)


def _column_cell(value: Any) -> Cell:
    text = _column_value(value)
    return Cell(text, "na" if text == MISSING else "")


@dataclass(frozen=True)
class Groups:
    """The values of the ``group_by`` data column, each with its colour (CSS class ``g0`` .. ``g7``, reused past
    :data:`GROUP_COLOURS` values); an example without a value is in the group MISSING, uncoloured."""

    column: str
    values: tuple[str, ...]  # as shown (:func:`_column_value`), sorted, MISSING last

    @classmethod
    def of(cls, column: str, examples: Sequence[Mapping[str, Any]]) -> Groups:
        shown = {_column_value(example.get(column)) for example in examples}
        return cls(column, tuple(sorted(shown - {MISSING})) + ((MISSING,) if MISSING in shown else ()))

    def value(self, raw: Any) -> str:
        """The group of a raw value of the column (MISSING for none)."""
        return _column_value(raw)

    def css(self, raw: Any) -> str:
        """The row class of an example with this raw value: "group gN", or "" when it has none."""
        value = self.value(raw)
        if value == MISSING or value not in self.values:
            return ""
        return f"group g{self.values.index(value) % GROUP_COLOURS}"

    def counts(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, int]:
        """How many of ``examples`` have each value (every value listed, 0 included)."""
        out = dict.fromkeys(self.values, 0)
        for example in examples:
            out[self.value(example.get(self.column))] += 1
        return out


def _group_cell(raw: Any, groups: Groups) -> Cell:
    """The cell of the grouping column: the value on a swatch of its group's colour."""
    text = groups.value(raw)
    css = groups.css(raw)
    return Cell(text, "na" if text == MISSING else "", span=f"swatch {css.split()[-1]}" if css else "")


def _share(count: int, total: int) -> str:
    return f"{count} of {total} ({count / total:.0%})" if total else MISSING


def _group_table(groups: Groups, train: Sequence[dict], lists: Sequence[tuple[str, Sequence[int]]],
                 caption: str, own: str | None = None) -> Table:
    """Per value of the grouping column: how many training examples have it, and how many of each list
    (``lists``: (heading, training indices)); the row of ``own`` (the query's value) marked."""
    everyone = groups.counts(train)
    listed = [(heading, groups.counts([train[i] for i in order]), len(order)) for heading, order in lists]
    head = [Cell(groups.column), Cell("Training examples", "num")] + [Cell(h, "num") for h, _, _ in listed]
    rows = []
    for value in groups.values:
        css = groups.css(value) if value != MISSING else ""
        name = Cell(value, "na" if value == MISSING else "", span=f"swatch {css.split()[-1]}" if css else "",
                    note="the query's →" if own is not None and value == own else "")
        rows.append(Row([name, Cell(_share(everyone[value], len(train)), "num")]
                        + [Cell(_share(counts[value], total), "num") for _, counts, total in listed],
                        "own" if own is not None and value == own else ""))
    return Table("groups", rows, head, caption)


def _score_cell(value: float) -> Cell:
    kind = "harm" if value > 0 else "help" if value < 0 else ""
    return Cell(format_score(value), f"num score {kind}".strip())


def _turns_note(example: Mapping) -> str:
    turns = example.get("turns")
    return f"[last turn of {int(turns)} messages]" if _is_number(turns) and int(turns) > 2 else ""


def _example_table(values: np.ndarray, order: np.ndarray, train: Sequence[dict], info: _TrainInfo,
                   caption: str, text_limit: int = MAX_TEXT_CHARS) -> Table:
    """Table of training examples ``order`` (indices into train) with their ``values`` (n_train,)."""
    has_true = any("true_label" in train[int(index)] for index in order)
    head = ["Rank", "#", "Score"]
    if info.label:
        head += ["Given label" if info.flipped else "Label"] + (["True label"] if has_true else [])
    head += ["Flipped"] if info.flipped else []
    head += list(info.columns)
    head += ["Prompt", "Response"] if info.prompt else ["Text"]
    rows = []
    for rank, index in enumerate(order, start=1):
        example = train[int(index)]
        flipped = bool(example.get("flipped", False))
        cells = [Cell(str(rank), "num"), Cell(str(int(index)), "num muted"), _score_cell(float(values[index]))]
        if info.label:
            cells.append(Cell(_label(example)))
            if has_true:
                cells.append(Cell(format_value(example.get("true_label"))))
        if info.flipped:
            cells.append(Cell("yes", span="badge flip") if flipped else Cell("no", span="muted"))
        cells += [_group_cell(example.get(column), info.groups) if info.groups and column == info.groups.column
                  else _column_cell(example.get(column)) for column in info.columns]
        if info.prompt:
            if "prompt" in example:
                cells.append(_text_cell(example["prompt"], text_limit, _turns_note(example)))
                cells.append(_text_cell(example.get("response", ""), text_limit))
            else:  # a plain-text record among prompt/response ones
                cells.append(_text_cell(example.get("text", ""), text_limit))
                cells.append(Cell(MISSING, "muted"))
        else:
            cells.append(_text_cell(example["text"], text_limit))
        group = info.groups.css(example.get(info.groups.column)) if info.groups else ""
        rows.append(Row(cells, " ".join(c for c in ("flipped" if flipped else "", group) if c)))
    numeric = {"Rank", "#", "Score"}
    return Table("examples generation" if info.prompt else "examples", rows,
                 [Cell(name, "num" if name in numeric else "") for name in head], caption)


def _sign_note(values: np.ndarray, top_k: int, harmful: bool) -> str:
    """A caption's note when fewer than ``top_k`` examples have the list's sign (the list holds only those, as
    `datainf top` and `explain` do)."""
    n = int((values > 0).sum() if harmful else (values < 0).sum())
    if n >= min(top_k, len(values)):
        return ""
    if n == 0:
        return f"; no training example {'raises' if harmful else 'lowers'} this loss"
    return (f"; only {n} of {len(values)} training examples {'raise' if harmful else 'lower'}"
            f"{'' if n > 1 else 's'} it")


def _top(values: np.ndarray, top_k: int, harmful: bool) -> np.ndarray:
    """Indices of the top_k largest positive (harmful) or most negative (helpful) values, most extreme first:
    an example of the other sign (or 0) is never listed."""
    signed = values if harmful else -values
    order = np.argsort(-signed, kind="stable")
    return order[signed[order] > 0][:top_k]


def _plots(images: list[tuple[bytes, str]], note: str = "") -> Block:
    """PNG images (bytes, alt text) shown inline as base64 data, or a note in their place."""
    return {"kind": "plots", "note": note,
            "images": [{"alt": alt, "data": base64.b64encode(png).decode("ascii")} for png, alt in images]}


def _setting_text(value: Any) -> str:
    if isinstance(value, (list, tuple)) and len(value) > 12:
        return f"{len(value)} values: {json.dumps(list(value[:6]), default=str)[:-1]}, …]"
    return format_value(value)


def _key_value_table(items: Mapping[str, Any], css_class: str = "kv") -> Block:
    """Rows ``key | value``; values that were not measured (None, NaN) are left out."""
    rows = []
    for key, value in items.items():
        if not _known(value) or (isinstance(value, (Mapping, list, tuple)) and not value):
            continue
        if isinstance(value, Mapping):
            shown = Cell(json.dumps(value, indent=2, default=str), pre=True)
        else:
            shown = Cell(_setting_text(value))
        rows.append(Row([Cell(str(key), header=True), shown]))
    if not rows:
        return _note("No settings recorded.")
    return _table(Table(css_class, rows))


def _section(section_id: str, heading: str, blocks: list[Block], intro: str = "") -> dict[str, Any]:
    return {"id": section_id, "heading": heading, "intro": intro, "blocks": blocks}


def _per_method(methods: list[str], tables: Callable[[str], list[Table]]) -> Block:
    """Each method's tables: the first method's shown openly, every other one's in a collapsed block."""
    return {"kind": "per_method", "groups": [{"name": name, "tables": tables(name)} for name in methods]}


def _damping_details(metrics: Mapping[str, Any], names: list[str]) -> list[Block]:
    """The full per-block damping of every method that has one, in a collapsed block (none without one)."""
    per_method = {name: blocks for name in names
                  if (blocks := _block_values((metrics.get(name) or {}).get("damping"))) is not None}
    if not per_method:
        return []
    blocks = list(dict.fromkeys(block for values in per_method.values() for block in values))
    head = [Cell("Block")] + [Cell(name, "num") for name in per_method]
    rows = [Row([Cell(block, "block", header=True)]
                + [Cell(f"{values[block]:.3e}", "num") if block in values else Cell(MISSING, "num na")
                   for values in per_method.values()])
            for block in blocks]
    note = ("" if all(len(v) == len(blocks) for v in per_method.values()) else
            f"{MISSING}: the block was left out (its training gradients are all zero).")
    return [{"kind": "damping", "summary": f"Damping per block ({len(blocks)} blocks)",
             "table": Table("damping", rows, head), "note": note}]


def _methods_table(results: Mapping[str, Any], method_names: list[str]) -> tuple[list[Block], str]:
    """(the methods section's blocks, its intro); a column is shown when some method has a value for it."""
    metrics = results.get("methods") or {}
    if not isinstance(metrics, Mapping):
        raise DataInfError("results['methods']: expected a dict method -> {auc, seconds, ...}")
    for name, entry in metrics.items():
        if entry is not None and not isinstance(entry, Mapping):
            raise DataInfError(f"results['methods'][{name!r}]: expected a dict of metrics or None")
    names = _ordered(list(metrics) + method_names)
    known = {key for key, _ in _METRIC_COLUMNS}
    extra = list(dict.fromkeys(key for entry in metrics.values() if entry for key in entry if key not in known))
    auc_label = results.get("auc_label") or ("AUC (flipped)" if results.get("task", "classification") ==
                                             "classification" else "AUC")
    columns = [(k, auc_label if k == "auc" else label) for k, label in _METRIC_COLUMNS] + [(k, k) for k in extra]
    columns = [(k, label) for k, label in columns
               if any(_known((metrics.get(name) or {}).get(k)) for name in names)]
    numeric = {"auc", "seconds", "pearson_with_exact", "spearman_with_exact"}
    head = [Cell("Method")] + [Cell(label, "num" if key in numeric else "") for key, label in columns]
    rows, missing = [], False
    for name in names:
        entry = metrics.get(name) or {}
        cells = [Cell(name, header=True)]
        for key, _ in columns:
            text = _metric_cell(key, entry.get(key))
            missing |= text == MISSING
            cells.append(Cell(text, " ".join(["num"] * (key in numeric) + ["na"] * (text == MISSING))))
        rows.append(Row(cells))
    keys = {key for key, _ in columns}
    intro = []
    if "auc" in keys:
        intro.append(f"{auc_label}: how well ranking by score (largest first) finds the "
                     + ("flipped labels." if auc_label == "AUC (flipped)" else "examples it looks for."))
    if keys & {"pearson_with_exact", "spearman_with_exact"}:
        intro.append("Correlations compare each method's scores with the exact inverse.")
    if "seconds" in keys:
        intro.append("Time: the method's scoring time.")
    if "damping" in keys:
        intro.append("Damping: the λ added to each block's curvature before inverting it.")
    if missing:
        intro.append(f"{MISSING}: not measured for that method.")
    table = _table(Table("methods", rows, head))
    return [table, *_damping_details(metrics, names)], " ".join(intro)


def _card(label: str, value: str, note: str = "", mono: bool = False) -> dict[str, Any]:
    return {"label": label, "value": value, "note": note, "mono": mono}


def _created(value: Any) -> str:
    text = str(value)
    return text.replace("T", " ")[:16] if len(text) >= 16 and text[10:11] == "T" else text


def _summary(results: Mapping[str, Any], n_train: int, n_flipped: int | None, n_query: int | None,
             methods: list[str]) -> list[dict[str, Any]]:
    """The cards at the top: only what the run recorded, never a placeholder."""
    cards = []
    task = results.get("task")
    if _known(task):
        cards.append(_card("Task", str(task), _TASK_NOTES.get(str(task), "")))
    cards.append(_card("Training examples", str(n_train)))
    if n_query is not None:
        cards.append(_card("Queries", str(n_query)))
    if n_flipped is not None:
        cards.append(_card("Flipped labels", f"{n_flipped} ({n_flipped / n_train:.1%})"))
    accuracy = results.get("validation_accuracy")
    if _is_number(accuracy) and not math.isnan(float(accuracy)):
        cards.append(_card("Validation accuracy", f"{float(accuracy):.1%}"))
    cards.append(_card("Methods" if len(methods) > 1 else "Method", ", ".join(methods)))
    fingerprints = results.get("fingerprints")
    if isinstance(fingerprints, Mapping):
        for key, label in (("model", "Model"), ("adapter", "Adapter")):
            if _known(fingerprints.get(key)):
                cards.append(_card(label, str(fingerprints[key]), "fingerprint", mono=True))
    if _known(results.get("created")):
        cards.append(_card("Created", _created(results["created"])))
    if _known(results.get("library_version")):
        cards.append(_card("datainf version", str(results["library_version"])))
    for key, label in (("wall_seconds", "Wall time"), ("scoring_seconds", "Scoring time")):
        value = results.get(key)
        if _is_number(value) and not math.isnan(float(value)):
            cards.append(_card(label, format_seconds(value)))
    return cards


def _query_parts(query: Mapping[str, Any]) -> tuple[str | None, str | None, str | None]:
    """(prompt, response, text) of a query record; any may be None."""
    prompt = query.get("prompt")
    response = query.get("response", query.get("completion")) if prompt is not None else None
    text = query.get("text")
    return (None if prompt is None else str(prompt), None if response is None else str(response),
            None if text is None else str(text))


def _query_text(query: Mapping[str, Any]) -> str:
    if "text" in query:
        return str(query["text"])
    parts = [f"{key}: {query[key]}" for key in ("prompt", "response") if key in query]
    return "\n".join(parts) if parts else json.dumps(dict(query), default=str)


def query_name(query: Mapping[str, Any], limit: int = QUERY_NAME_CHARS) -> str:
    """A query's name in headings and captions: its prompt (else its text), on one line, cut to ``limit``."""
    prompt, _, text = _query_parts(query)
    return _one_line(prompt if prompt is not None else text if text is not None else _query_text(query), limit)


def query_names(queries: Sequence[Mapping[str, Any]], limit: int = QUERY_NAME_CHARS) -> list[str]:
    """Each query's name (:func:`query_name`); a long beginning that every query shares (an instruction, a
    system prompt) is left out, "… " in its place, so that the names tell the queries apart."""
    full = [query_name(query, 100_000) for query in queries]
    if len(full) > 1:
        shared = os.path.commonprefix(full)
        cut = shared.rfind(" ") + 1  # at a word boundary
        if cut >= 20 and all(name[cut:].strip() for name in full):
            return [_one_line("… " + name[cut:], limit) for name in full]
    return [_one_line(name, limit) for name in full]




def _query_body(query: Mapping[str, Any], generation: bool = True,
                columns: Sequence[str] = ()) -> dict[str, Any]:
    """What the page shows of a query: its prompt and response side by side (generation), else its text; and
    the values it has of the extra data ``columns``."""
    prompt, response, text = _query_parts(query)
    shown = [{"name": column, "value": _column_value(query[column])} for column in columns
             if _known(query.get(column))]
    if prompt is None or not generation:
        return {"prompt": None, "text": text if text is not None and generation else _query_text(query),
                "columns": shown}
    turns = _turns_note(query)
    return {"prompt": prompt, "response": response or "", "label": f"Prompt {turns}" if turns else "Prompt",
            "columns": shown}


def _query_block(j: int, name: str, query: Mapping[str, Any], generation: bool, columns: Sequence[str],
                 blocks: list[Block]) -> Block:
    return {"kind": "query", "id": f"query-{j}", "number": j + 1, "name": name,
            "query": _query_body(query, generation, columns), "blocks": blocks}


def _paged(index: list[Block], queries: list[Block]) -> tuple[list[Block], str]:
    """(blocks, a note for the intro): every query; above QUERIES_PER_PAGE, in collapsed pages of that many
    (the first open), with the index of all of them collapsed too, so that a page with hundreds of queries
    stays usable. ``index`` is the index block (or none)."""
    n = len(queries)
    if n <= QUERIES_PER_PAGE:
        return index + queries, ""
    pages = [{"kind": "page", "id": f"queries-{start + 1}", "open": start == 0,
              "summary": f"Queries {start + 1}–{min(start + QUERIES_PER_PAGE, n)} of {n}",
              "blocks": queries[start:start + QUERIES_PER_PAGE]}
             for start in range(0, n, QUERIES_PER_PAGE)]
    index = [{"kind": "page", "id": "query-index", "open": False, "summary": f"Index of the {n} queries",
              "blocks": index}] if index else []
    return index + pages, f"The {n} queries are in {len(pages)} pages of up to {QUERIES_PER_PAGE}; open one to see them."


def _query_index(names: Sequence[str]) -> list[Block]:
    return [{"kind": "index", "entries": [{"id": f"query-{j}", "name": name} for j, name in enumerate(names)]}]


def _queries_section(query_scores: dict[str, np.ndarray], queries: Sequence[dict], train: Sequence[dict],
                     info: _TrainInfo, top_k: int, generation: bool = False) -> dict[str, Any]:
    methods = list(query_scores)
    names, short = query_names(queries), query_names(queries, 60)
    articles: list[Block] = []
    for j in range(len(queries)):

        def tables(method: str, j: int = j) -> list[Table]:
            column = query_scores[method][:, j]
            helpful, harmful = _top(column, top_k, harmful=False), _top(column, top_k, harmful=True)
            out = [_example_table(column, helpful, train, info,
                                  f"Most helpful for “{short[j]}”, most negative first ({method})"
                                  + _sign_note(column, top_k, harmful=False), 200),
                   _example_table(column, harmful, train, info,
                                  f"Most harmful for “{short[j]}”, most positive first ({method})"
                                  + _sign_note(column, top_k, harmful=True), 200)]
            if info.groups is not None:
                groups = info.groups
                own = queries[j].get(groups.column)
                out.insert(0, _group_table(
                    groups, train, [("Most helpful", helpful), ("Most harmful", harmful)],
                    f"{groups.column} of the training examples listed for “{short[j]}” ({method})",
                    groups.value(own) if _known(own) else None))
            return out

        articles.append(_query_block(j, names[j], queries[j], generation, info.columns,
                                     [_per_method(methods, tables)]))
    indexed = len(queries) > QUERIES_PER_PAGE or (generation and len(queries) > 1)
    blocks, note = _paged(_query_index(names) if indexed else [], articles)
    if info.groups is not None:
        note = (f"Rows are coloured by {info.groups.column} (legend: “Groups by {info.groups.column}”); each "
                f"query's first table counts its listed examples per {info.groups.column}. " + note).strip()
    if generation:
        intro = (("The query's" if len(queries) == 1 else "Each query's") + " prompt and response, then the "
                 "training examples that made that response more "
                 "likely (helpful: they lower its loss, most negative first) and less likely (harmful: they "
                 "raise it, most positive first). " + note)
    else:
        intro = ("For each query, the training examples that lowered (helpful, most negative first) and raised "
                 "(harmful, most positive first) its loss the most. " + note)
    heading = "Queries" if len(queries) != 1 else "The query"
    return _section("queries", heading, blocks, intro.strip())


def _groups_section(groups: Groups, train: Sequence[dict], queries: Sequence[dict] | None,
                    query_scores: dict[str, np.ndarray] | None, top_k: int) -> dict[str, Any]:
    """The legend of the ``group_by`` column (each value's colour and its share of the training examples) and,
    when each query has its own lists and a value of the column, per method the mean share of a query's
    listed examples that have the query's own value, beside the share of training examples that have it."""
    column = groups.column
    blocks: list[Block] = [_table(_group_table(groups, train, [], f"The colours of {column} and its values' share "
                                                                  "of the training examples"))]
    intro = f"Every table of training examples colours its rows by {column}."
    own = [(j, groups.value(q.get(column))) for j, q in enumerate(queries or []) if _known(q.get(column))]
    if query_scores and own:
        everyone = groups.counts(train)
        chance = float(np.mean([everyone.get(value, 0) / len(train) for _, value in own]))
        head = [Cell("Method"), Cell(f"Queries with a {column}", "num"),
                Cell(f"Most helpful with the query's {column}", "num"),
                Cell(f"Most harmful with the query's {column}", "num"),
                Cell(f"Training examples with the query's {column}", "num")]
        rows = []
        for method, matrix in query_scores.items():
            cells = [Cell(method, header=True), Cell(str(len(own)), "num")]
            for harmful in (False, True):
                shares = [sum(groups.value(train[int(i)].get(column)) == value for i in order) / len(order)
                          for j, value in own if len(order := _top(matrix[:, j], top_k, harmful))]
                cells.append(Cell(f"{np.mean(shares):.2f}" if shares else MISSING, "num"))
            cells.append(Cell(f"{chance:.2f}", "num"))
            rows.append(Row(cells))
        blocks.append(_table(Table("methods", rows, head,
                                   f"Mean over the {len(own)} queries with a {column} of the share of their listed "
                                   f"examples (top {top_k} of each list) with the query's own {column}; the last "
                                   "column is that share among all training examples (chance)")))
        intro += (f" The second table says how often a query's most helpful examples share its {column}: well above "
                  "chance when the model learnt each value's answers from examples of that value.")
    return _section("groups", f"Groups by {column}", blocks, intro)


def _queries_list_section(queries: Sequence[dict], columns: Sequence[str]) -> dict[str, Any]:
    """The queries of a run scored against their mean: each one's prompt and response, no lists of their own."""
    names = query_names(queries)
    articles = [_query_block(j, names[j], queries[j], True, columns, []) for j in range(len(queries))]
    blocks, note = _paged(_query_index(names) if len(queries) > QUERIES_PER_PAGE else [], articles)
    intro = ("These queries were scored together, as their mean (one gradient: the mean of theirs), so the lists "
             "below are over the mean query, not over any one of them." + (" " + note if note else ""))
    return _section("queries", "Queries (scored as their mean)", blocks, intro)


# ----------------------------------------------------------------------------------------------- document
def render_report(*, results: dict, train: Sequence[dict], scores: Mapping[str, Any],
                  query_scores: Mapping[str, Any] | None = None, queries: Sequence[dict] | None = None,
                  top_k: int = 10, title: str = "datainf report", generation: bool = False,
                  scores_over: str | None = None, columns: Sequence[str] = (), group_by: str | None = None) -> str:
    """The report as one HTML string; arguments as in :func:`write_report`."""
    if not isinstance(results, Mapping):
        raise DataInfError("results: expected a dict like results.json (settings, methods, ...)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise DataInfError(f"top_k: expected a positive integer, got {top_k!r}")
    if isinstance(columns, str) or not all(isinstance(c, str) and c for c in columns):
        raise DataInfError(f"columns: expected a list of column names (non-empty strings), got {columns!r}")
    info = replace(_check_train(train, generation), columns=tuple(dict.fromkeys(columns)))
    if group_by is not None:
        if group_by not in info.columns:
            raise DataInfError(f"group_by: {group_by!r} is not one of the data columns "
                               f"({', '.join(info.columns) or 'none'}); group by one of them")
        valued = [q for q in queries or [] if isinstance(q, Mapping) and _known(q.get(group_by))]
        info = replace(info, groups=Groups.of(group_by, [*train, *valued]))  # a query without one adds no group
    n_train = len(train)
    vectors = _check_scores(scores, n_train)
    per_query = _check_query_scores(query_scores, queries, n_train) if query_scores is not None else None
    if generation and queries is not None and per_query is None:
        _check_queries(queries)
    flipped = np.array([bool(example.get("flipped", False)) for example in train])
    methods = list(vectors)
    k = min(top_k, n_train)

    sections: list[dict[str, Any]] = []
    nav: list[dict[str, str]] = []

    def add(section: dict[str, Any], link: str | None = None) -> None:
        sections.append(section)
        nav.append({"id": section["id"], "label": link or section["heading"]})

    settings = results.get("settings") or {}
    if not isinstance(settings, Mapping):
        raise DataInfError("results['settings']: expected a flat dict of settings")
    methods_blocks, methods_intro = _methods_table(results, methods)
    if info.groups is not None:
        add(_groups_section(info.groups, train, queries, per_query, k), f"Groups by {group_by}")

    def add_settings() -> None:
        add(_section("settings", "Settings",
                     [_key_value_table(settings) if settings else _note("No settings recorded.")]))

    def add_lists(order: tuple[str, ...]) -> None:
        over = f": {scores_over}" if scores_over else ""
        loss = "the queries' loss" if generation else "the validation loss"
        for kind in order:
            harmful = kind == "harmful"
            body = _per_method(methods, lambda name, harmful=harmful: [_example_table(
                vectors[name], _top(vectors[name], k, harmful=harmful), train, info,
                f"Top {k} by score, {'largest' if harmful else 'most negative'} first ({name})"
                + _sign_note(vectors[name], k, harmful))])
            if harmful:
                add(_section("harmful", f"Most harmful training examples{over}", [body],
                             f"Largest positive scores: up-weighting these raises {loss}."), "Most harmful")
            else:
                add(_section("helpful", f"Most helpful training examples{over}", [body],
                             f"Most negative scores: up-weighting these lowers {loss}."), "Most helpful")

    if generation:
        if per_query is not None:
            add(_queries_section(per_query, queries, train, info, k, generation=True),
                "Queries" if len(queries) != 1 else "The query")
        elif queries:
            add(_queries_list_section(queries, info.columns), "Queries")
        if per_query is None or len(queries) > 1:  # one query: its own lists are the overall ones
            add_lists(("helpful", "harmful"))
        add(_section("methods", "Methods", methods_blocks, methods_intro))
        add_settings()
    else:
        add_settings()
        add(_section("methods", "Methods", methods_blocks, methods_intro))
    if info.flipped:
        if flipped.any() and not flipped.all():
            roc = _plots([(roc_curve_png(vectors, flipped), "ROC curves of every method for finding flipped labels")])
            hist = _plots([(histogram_png(vectors, flipped), "Score histograms, flipped vs clean, per method")])
        else:
            roc = hist = _plots([], "Every example is in one class (all flipped or none): no curve.")
        add(_section("roc", "Finding flipped labels (ROC)", [roc],
                     "Training examples ranked by score, largest (most harmful) first; a curve hugging the "
                     "top-left corner finds the flipped labels early."))
        add(_section("histograms", "Score distributions", [hist],
                     "Flipped examples should sit to the right (positive, harmful) of the clean ones."))
    if not generation:
        add_lists(("harmful", "helpful"))
        if per_query is not None:
            add(_queries_section(per_query, queries, train, info, k), "Queries")
    diagnostics = results.get("diagnostics")
    if diagnostics:
        add(_section("diagnostics", "Diagnostics", [
            _key_value_table(diagnostics) if isinstance(diagnostics, Mapping)
            else {"kind": "pre", "text": json.dumps(diagnostics, indent=2, default=str)}]))

    meta = [part for part in (
        f"datainf {results['library_version']}" if _known(results.get("library_version")) else "",
        f"created {_created(results['created'])}" if _known(results.get("created")) else "",
        f"task {results['task']}" if _known(results.get("task")) else "") if part]
    n_flipped = int(flipped.sum()) if info.flipped else None
    n_query = results.get("n_query")
    if not (_is_number(n_query) and int(n_query) > 0):
        n_query = len(queries) if queries is not None and (per_query is not None or generation) else None
    target = "query's loss (the loss of its response)" if generation else "validation (or query) loss"
    return render("report.html.j2", title=title, meta=meta, nav=nav, sections=sections,
                  howto={"target": target, "generation": generation, "flipped": info.flipped},
                  cards=_summary(results, n_train, n_flipped, None if n_query is None else int(n_query), methods))


def write_report(path: str | os.PathLike, *, results: dict, train: Sequence[dict],
                 scores: Mapping[str, Any], query_scores: Mapping[str, Any] | None = None,
                 queries: Sequence[dict] | None = None, top_k: int = 10,
                 title: str = "datainf report", generation: bool = False,
                 scores_over: str | None = None, columns: Sequence[str] = (), group_by: str | None = None) -> Path:
    """Writes the self-contained HTML report of an influence run to ``path`` (atomically); returns the path.

    results: JSON-able dict like the demo's results.json (library_version, created, task, settings,
        validation_accuracy, wall_seconds, methods -> {auc, seconds, pearson_with_exact,
        spearman_with_exact, damping (a description, one number or a dict block -> lambda: shown as
        min / median / max, the full table in a collapsed block), ...}, optional diagnostics; optional
        fingerprints {model, adapter}, n_query, scoring_seconds for the cards). What is missing is left
        out (a card, a column) or shown as MISSING in a table cell, never as a placeholder value.
    train: one dict per training example: "text", "label", optionally "flipped", "true_label",
        "label_name". "flipped" (all examples or none) enables the ROC and histogram sections. With
        ``generation``: "prompt" and "response" (or "text"), "label" optional (all examples or none).
    scores: method -> (n_train,) influence on the validation loss (positive = harmful).
    query_scores: optional method -> (n_train, n_query) influence on each query's loss; needs ``queries``,
        one dict with "text" (or "prompt"/"response") per query. Every query is shown, named by its text
        (prompt); more than QUERIES_PER_PAGE are split into collapsed pages.
    top_k: rows of each harmful/helpful table.
    generation: the layout for generations: the queries (prompt and response) first, each with its own
        helpful and harmful lists, then the lists over all queries (left out for one query: they would
        repeat its lists), methods and settings; ``queries`` without ``query_scores`` are listed as the
        queries whose mean was scored.
    scores_over: what the ``scores`` lists are over, said in their headings (e.g. "over the mean query
        (scores averaged over the 3 queries)"); default: no qualifier.
    columns: extra data columns of the examples and queries (e.g. "skill", "source") shown in every
        example table (a column each, MISSING where an example has no value) and beside each query's name.
    group_by: one of ``columns`` (e.g. "skill"): every example table colours its rows by its value, a
        "Groups by" section gives the legend and, with ``query_scores``, per method the mean share of a
        query's listed examples that have the query's own value (against the share among all training
        examples); each query's lists start with a table counting them per value.
    """
    document = render_report(results=results, train=train, scores=scores, query_scores=query_scores,
                             queries=queries, top_k=top_k, title=title, generation=generation,
                             scores_over=scores_over, columns=columns, group_by=group_by)
    target = Path(path)
    atomic.write_text(target, document)
    return target
