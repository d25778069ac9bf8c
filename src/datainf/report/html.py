"""One self-contained HTML file showing the results of an influence run.

Everything is inline: CSS in a <style> block, plots as base64 PNG data URIs, no JavaScript, so the file
opens offline and can be mailed around. Sections carry stable ``id`` attributes (``settings``, ``methods``,
``roc``, ``histograms``, ``harmful``, ``helpful``, ``queries``, ``diagnostics``).

Sign convention: a score is the first-order change of the validation (or query) loss when the training
example is up-weighted. Positive = harmful (raises the loss), negative = helpful.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from datainf.errors import DataInfError
from datainf.report.plots import as_vector, histogram_png, roc_curve_png

#: at most this many queries are shown in the ``queries`` section
MAX_QUERIES = 20
#: training texts longer than this are cut in tables (the full text is in the cell's tooltip)
MAX_TEXT_CHARS = 300

_METRIC_COLUMNS = (
    ("auc", "AUC (flipped)"),
    ("seconds", "Time"),
    ("pearson_with_exact", "Pearson vs exact"),
    ("spearman_with_exact", "Spearman vs exact"),
    ("damping", "Damping"),
)


# ----------------------------------------------------------------------------------------------- formatting
def _e(value: Any) -> str:
    """HTML-escaped text of any value."""
    return html.escape(str(value), quote=True)


def format_value(value: Any) -> str:
    """A short human string for a setting or metric: None/NaN -> 'n/a', floats to 4 significant digits."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        number = float(value)
        return "n/a" if math.isnan(number) else f"{number:.4g}"
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str)


def _format_fixed(value: Any, digits: int = 3) -> str:
    """Numbers in [0, 1]-ish ranges (AUC, correlations) with a fixed number of decimals."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return "n/a" if value is None else format_value(value)
    return "n/a" if math.isnan(float(value)) else f"{float(value):.{digits}f}"


def format_seconds(value: Any) -> str:
    """'0.41 s', '12.3 s', '5 min 03 s', '1 h 02 min'; 'n/a' when missing."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return "n/a" if value is None else format_value(value)
    seconds = float(value)
    if math.isnan(seconds):
        return "n/a"
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


def _metric_cell(key: str, value: Any) -> str:
    if key == "seconds":
        return format_seconds(value)
    if key in ("auc", "pearson_with_exact", "spearman_with_exact"):
        return _format_fixed(value)
    return format_value(value)


# ----------------------------------------------------------------------------------------------- checking
def _ordered(names: Sequence[str]) -> list[str]:
    """Registered methods first, in the registry's order; any other entry follows in the order given."""
    from datainf.estimators.registry import method_names

    unique = list(dict.fromkeys(names))
    first = [name for name in method_names() if name in unique]
    return first + [name for name in unique if name not in first]


def _check_train(train: Sequence[dict]) -> bool:
    """Validates the training examples; returns whether they carry the 'flipped' flag."""
    if isinstance(train, (str, bytes)) or not isinstance(train, Sequence):
        raise DataInfError("train: expected a list with one dict per training example")
    if len(train) == 0:
        raise DataInfError("train: is empty; pass one dict per training example")
    with_flag = 0
    for index, example in enumerate(train):
        if not isinstance(example, Mapping):
            raise DataInfError(f"train[{index}]: expected a dict with 'text' and 'label', got "
                               f"{type(example).__name__}")
        if "text" not in example or "label" not in example:
            raise DataInfError(f"train[{index}]: missing 'text' or 'label'; every example needs both")
        with_flag += "flipped" in example
    if 0 < with_flag < len(train):
        raise DataInfError(f"train: 'flipped' is given for {with_flag} of {len(train)} examples; give it for "
                           f"every example or for none")
    return with_flag == len(train)


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


def _check_query_scores(query_scores: Mapping[str, Any], queries: Sequence[dict] | None,
                        n_train: int) -> dict[str, np.ndarray]:
    if not isinstance(query_scores, Mapping) or not query_scores:
        raise DataInfError("query_scores: expected a non-empty dict method -> (n_train, n_query) array")
    if queries is None or isinstance(queries, (str, bytes)) or not isinstance(queries, Sequence):
        raise DataInfError("queries: query_scores was given, so pass one dict with 'text' per query")
    for index, query in enumerate(queries):
        if not isinstance(query, Mapping):
            raise DataInfError(f"queries[{index}]: expected a dict with 'text', got {type(query).__name__}")
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
def _label(example: Mapping, key: str = "label") -> str:
    value = example.get(key)
    name = example.get("label_name") if key == "label" else None
    if name is not None and str(name) != str(value):
        return f"{name} ({value})"
    return format_value(value)


def _text_cell(text: Any, limit: int = MAX_TEXT_CHARS) -> str:
    full = str(text)
    shown = full if len(full) <= limit else full[:limit].rstrip() + " …"
    tooltip = f' title="{_e(full[:4000])}"' if shown != full else ""
    return f'<td class="text"{tooltip}>{_e(shown)}</td>'


def _score_cell(value: float) -> str:
    kind = "harm" if value > 0 else "help" if value < 0 else ""
    return f'<td class="num score {kind}">{_e(format_score(value))}</td>'


def _example_table(values: np.ndarray, order: np.ndarray, train: Sequence[dict], has_flipped: bool,
                   caption: str, text_limit: int = MAX_TEXT_CHARS) -> str:
    """Table of training examples ``order`` (indices into train) with their ``values`` (n_train,)."""
    has_true = any("true_label" in train[int(index)] for index in order)
    head = ["Rank", "#", "Score", "Given label"] + (["True label"] if has_true else [])
    head += (["Flipped"] if has_flipped else []) + ["Text"]
    rows = []
    for rank, index in enumerate(order, start=1):
        example = train[int(index)]
        flipped = bool(example.get("flipped", False))
        cells = [f'<td class="num">{rank}</td>', f'<td class="num muted">{int(index)}</td>',
                 _score_cell(float(values[index])), f"<td>{_e(_label(example))}</td>"]
        if has_true:
            cells.append(f"<td>{_e(format_value(example.get('true_label')))}</td>")
        if has_flipped:
            badge = '<span class="badge flip">yes</span>' if flipped else '<span class="muted">no</span>'
            cells.append(f"<td>{badge}</td>")
        cells.append(_text_cell(example["text"], text_limit))
        row_class = ' class="flipped"' if flipped else ""
        rows.append(f"<tr{row_class}>{''.join(cells)}</tr>")
    numeric = {"Rank", "#", "Score"}
    header = "".join(f'<th class="num">{_e(name)}</th>' if name in numeric else f"<th>{_e(name)}</th>"
                     for name in head)
    return (f'<table class="examples"><caption>{_e(caption)}</caption><thead><tr>{header}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")


def _top(values: np.ndarray, top_k: int, harmful: bool) -> np.ndarray:
    """Indices of the top_k largest (harmful) or smallest (helpful) values, most extreme first."""
    order = np.argsort(-values if harmful else values, kind="stable")
    return order[:top_k]


def _image(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="plot" alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _key_value_table(items: Mapping[str, Any], css_class: str = "kv") -> str:
    rows = []
    for key, value in items.items():
        if isinstance(value, (Mapping, list, tuple)) and value:
            shown = f"<pre>{_e(json.dumps(value, indent=2, default=str))}</pre>"
        else:
            shown = _e(format_value(value))
        rows.append(f'<tr><th scope="row">{_e(key)}</th><td>{shown}</td></tr>')
    return f'<table class="{css_class}"><tbody>{"".join(rows)}</tbody></table>'


def _section(section_id: str, heading: str, body: str, intro: str = "") -> str:
    lead = f'<p class="lead">{intro}</p>' if intro else ""
    return f'<section id="{section_id}"><h2>{_e(heading)}</h2>{lead}{body}</section>'


def _per_method(methods: list[str], render) -> str:
    """The first method shown openly, every other one in a collapsed <details> block."""
    first, rest = methods[0], methods[1:]
    parts = [f'<h3>{_e(first)}</h3>{render(first)}']
    for name in rest:
        parts.append(f'<details><summary>{_e(name)}</summary>{render(name)}</details>')
    return "".join(parts)


def _methods_table(results: Mapping[str, Any], method_names: list[str]) -> str:
    metrics = results.get("methods") or {}
    if not isinstance(metrics, Mapping):
        raise DataInfError("results['methods']: expected a dict method -> {auc, seconds, ...}")
    for name, entry in metrics.items():
        if entry is not None and not isinstance(entry, Mapping):
            raise DataInfError(f"results['methods'][{name!r}]: expected a dict of metrics or None")
    known = {key for key, _ in _METRIC_COLUMNS}
    extra = list(dict.fromkeys(key for entry in metrics.values() if entry for key in entry if key not in known))
    auc_label = results.get("auc_label") or ("AUC (flipped)" if results.get("task", "classification") ==
                                             "classification" else "AUC")
    columns = [(k, auc_label if k == "auc" else label) for k, label in _METRIC_COLUMNS] + [(k, k) for k in extra]
    numeric = {"auc", "seconds", "pearson_with_exact", "spearman_with_exact"}
    header = "<th>Method</th>" + "".join(
        f'<th class="num">{_e(label)}</th>' if key in numeric else f"<th>{_e(label)}</th>"
        for key, label in columns)
    rows = []
    for name in _ordered(list(metrics) + method_names):
        entry = metrics.get(name) or {}
        cells = []
        for key, _ in columns:
            text = _metric_cell(key, entry.get(key))
            css = ("num" if key in numeric else "") + (" na" if text == "n/a" else "")
            cells.append(f'<td class="{css.strip()}">{_e(text)}</td>')
        rows.append(f'<tr><th scope="row">{_e(name)}</th>{"".join(cells)}</tr>')
    return f'<table class="methods"><thead><tr>{header}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _summary(results: Mapping[str, Any], n_train: int, n_flipped: int | None) -> str:
    cards = [("Task", format_value(results.get("task"))), ("Training examples", str(n_train))]
    if n_flipped is not None:
        cards.append(("Flipped labels", f"{n_flipped} ({n_flipped / n_train:.1%})"))
    accuracy = results.get("validation_accuracy")
    if isinstance(accuracy, (int, float)) and not isinstance(accuracy, bool) and not math.isnan(accuracy):
        cards.append(("Validation accuracy", f"{accuracy:.1%}"))
    else:
        cards.append(("Validation accuracy", format_value(accuracy)))
    cards.append(("Wall time", format_seconds(results.get("wall_seconds"))))
    body = "".join(f'<div class="card"><div class="card-label">{_e(label)}</div>'
                   f'<div class="card-value">{_e(value)}</div></div>' for label, value in cards)
    return f'<div class="cards">{body}</div>'


def _query_text(query: Mapping[str, Any]) -> str:
    if "text" in query:
        return str(query["text"])
    parts = [f"{key}: {query[key]}" for key in ("prompt", "response") if key in query]
    return "\n".join(parts) if parts else json.dumps(dict(query), default=str)


def _queries_section(query_scores: dict[str, np.ndarray], queries: Sequence[dict], train: Sequence[dict],
                     has_flipped: bool, top_k: int) -> str:
    methods = list(query_scores)
    shown = min(len(queries), MAX_QUERIES)
    parts = []
    for j in range(shown):
        def render(name: str, j: int = j) -> str:
            column = query_scores[name][:, j]
            helpful = _example_table(column, _top(column, top_k, harmful=False), train, has_flipped,
                                     f"Most helpful for query {j}, most negative first ({name})", 200)
            harmful = _example_table(column, _top(column, top_k, harmful=True), train, has_flipped,
                                     f"Most harmful for query {j}, most positive first ({name})", 200)
            return helpful + harmful

        parts.append(f'<article class="query" id="query-{j}"><h3>Query {j}</h3>'
                     f'<pre class="query-text">{_e(_query_text(queries[j]))}</pre>'
                     f"{_per_method(methods, render)}</article>")
    note = f"Showing the first {shown} of {len(queries)} queries." if shown < len(queries) else ""
    intro = ("For each query, the training examples that lowered (helpful, most negative first) and raised "
             "(harmful, most positive first) its loss the most. " + note)
    return _section("queries", "Queries", "".join(parts), _e(intro))


# ----------------------------------------------------------------------------------------------- document
_CSS = """
:root { --fg:#1d2330; --muted:#6b7280; --line:#e5e7eb; --bg:#f7f8fa; --accent:#2f5fa7;
        --harm:#b42318; --help:#067647; --flip:#fff4e5; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg);
       font:15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header { background:#1d2d4a; color:#fff; padding:28px 0 20px; }
header .wrap, main, nav .wrap { max-width:1160px; margin:0 auto; padding:0 24px; }
header h1 { margin:0 0 4px; font-size:26px; font-weight:600; }
header .meta { color:#c7d2e5; font-size:13px; }
nav { background:#fff; border-bottom:1px solid var(--line); position:sticky; top:0; z-index:1; }
nav a { display:inline-block; padding:10px 12px 10px 0; margin-right:8px; color:var(--accent);
        text-decoration:none; font-size:14px; }
nav a:hover { text-decoration:underline; }
.howto { background:#eef3fb; border-left:4px solid var(--accent); padding:10px 14px; margin:20px 0 0;
         border-radius:4px; }
.howto .harm { color:var(--harm); font-weight:600; } .howto .help { color:var(--help); font-weight:600; }
section { background:#fff; border:1px solid var(--line); border-radius:8px; padding:18px 22px; margin:20px 0; }
h2 { margin:0 0 10px; font-size:20px; } h3 { margin:18px 0 8px; font-size:16px; }
.lead { color:var(--muted); margin:0 0 12px; font-size:14px; }
.cards { display:flex; flex-wrap:wrap; gap:12px; margin-top:20px; }
.card { background:#fff; border:1px solid var(--line); border-radius:8px; padding:10px 16px; min-width:150px; }
.card-label { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.04em; }
.card-value { font-size:20px; font-weight:600; }
table { border-collapse:collapse; width:100%; font-size:14px; margin:6px 0 10px; }
caption { text-align:left; color:var(--muted); font-size:13px; padding-bottom:4px; }
th, td { border-bottom:1px solid var(--line); padding:6px 10px; text-align:left; vertical-align:top; }
thead th { background:#f1f3f6; font-weight:600; font-size:13px; white-space:nowrap; }
tbody tr:nth-child(even) { background:#fafbfc; }
tbody th { font-weight:600; white-space:nowrap; }
table.kv { width:auto; min-width:50%; } table.kv th { color:#374151; font-weight:500; padding-right:28px; }
td.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap;
         font-family:ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size:13px; }
th.num { text-align:right; }
table.examples td.num, table.examples th.num { width:1%; }
td.na { color:var(--muted); font-style:italic; font-family:inherit; }
td.score.harm { color:var(--harm); } td.score.help { color:var(--help); }
td.text { max-width:620px; overflow-wrap:anywhere; }
tr.flipped, tbody tr.flipped:nth-child(even) { background:var(--flip); }
.badge { display:inline-block; padding:0 7px; border-radius:9px; font-size:12px; font-weight:600; }
.badge.flip { background:#fde6c8; color:#93370d; }
.muted { color:var(--muted); }
details { margin:8px 0; border:1px solid var(--line); border-radius:6px; padding:6px 12px; }
details[open] { padding-bottom:10px; }
summary { cursor:pointer; font-weight:600; }
.plots { display:flex; flex-wrap:wrap; gap:16px; }
img.plot { max-width:100%; height:auto; border:1px solid var(--line); border-radius:6px; background:#fff; }
pre { background:#f5f6f8; border:1px solid var(--line); border-radius:6px; padding:8px 10px; margin:0;
      font-size:12.5px; overflow-x:auto; white-space:pre-wrap; }
.query { border-top:2px solid var(--line); padding-top:6px; margin-top:18px; }
.query:first-of-type { border-top:0; }
footer { color:var(--muted); font-size:12px; text-align:center; padding:10px 0 30px; }
"""

_HOWTO = ('<p class="howto"><strong>How to read this:</strong> a score is the first-order change of the '
          'validation (or query) loss when that training example is up-weighted. '
          '<span class="harm">Positive = harmful</span> (raises the loss); '
          '<span class="help">negative = helpful</span> (lowers it). Mislabeled examples should rank near '
          'the top of the harmful list.</p>')


def render_report(*, results: dict, train: Sequence[dict], scores: Mapping[str, Any],
                  query_scores: Mapping[str, Any] | None = None, queries: Sequence[dict] | None = None,
                  top_k: int = 10, title: str = "datainf report") -> str:
    """The report as one HTML string; arguments as in :func:`write_report`."""
    if not isinstance(results, Mapping):
        raise DataInfError("results: expected a dict like results.json (settings, methods, ...)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise DataInfError(f"top_k: expected a positive integer, got {top_k!r}")
    has_flipped = _check_train(train)
    n_train = len(train)
    vectors = _check_scores(scores, n_train)
    per_query = _check_query_scores(query_scores, queries, n_train) if query_scores is not None else None
    flipped = np.array([bool(example.get("flipped", False)) for example in train])
    methods = list(vectors)
    k = min(top_k, n_train)

    sections = []
    nav = []

    def add(section_id: str, heading: str, body: str, intro: str = "") -> None:
        sections.append(_section(section_id, heading, body, intro))
        nav.append(f'<a href="#{section_id}">{_e(heading)}</a>')

    settings = results.get("settings") or {}
    if not isinstance(settings, Mapping):
        raise DataInfError("results['settings']: expected a flat dict of settings")
    add("settings", "Settings",
        _key_value_table(settings) if settings else '<p class="muted">No settings recorded.</p>')
    add("methods", "Methods", _methods_table(results, methods),
        "AUC: how well ranking by score (largest first) finds the flipped labels; correlations compare each "
        "method's scores with the exact inverse.")
    if has_flipped:
        if flipped.any() and not flipped.all():
            roc = _image(roc_curve_png(vectors, flipped), "ROC curves of every method for finding flipped labels")
            hist = _image(histogram_png(vectors, flipped), "Score histograms, flipped vs clean, per method")
        else:
            roc = hist = '<p class="muted">Every example is in one class (all flipped or none): no curve.</p>'
        add("roc", "Finding flipped labels (ROC)", f'<div class="plots">{roc}</div>',
            "Training examples ranked by score, largest (most harmful) first; a curve hugging the top-left "
            "corner finds the flipped labels early.")
        add("histograms", "Score distributions", f'<div class="plots">{hist}</div>',
            "Flipped examples should sit to the right (positive, harmful) of the clean ones.")
    add("harmful", "Most harmful training examples",
        _per_method(methods, lambda name: _example_table(
            vectors[name], _top(vectors[name], k, harmful=True), train, has_flipped,
            f"Top {k} by score, largest first ({name})")),
        "Largest positive scores: up-weighting these raises the validation loss.")
    add("helpful", "Most helpful training examples",
        _per_method(methods, lambda name: _example_table(
            vectors[name], _top(vectors[name], k, harmful=False), train, has_flipped,
            f"Top {k} by score, most negative first ({name})")),
        "Most negative scores: up-weighting these lowers the validation loss.")
    if per_query is not None:
        sections.append(_queries_section(per_query, queries, train, has_flipped, k))
        nav.append('<a href="#queries">Queries</a>')
    diagnostics = results.get("diagnostics")
    if diagnostics:
        body = (_key_value_table(diagnostics) if isinstance(diagnostics, Mapping)
                else f"<pre>{_e(json.dumps(diagnostics, indent=2, default=str))}</pre>")
        add("diagnostics", "Diagnostics", body)

    meta = " · ".join(_e(part) for part in (
        f"datainf {results.get('library_version', 'n/a')}", f"created {results.get('created', 'n/a')}",
        f"task {results.get('task', 'n/a')}"))
    n_flipped = int(flipped.sum()) if has_flipped else None
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f'<header><div class="wrap"><h1>{_e(title)}</h1><div class="meta">{meta}</div></div></header>'
        f'<nav><div class="wrap">{"".join(nav)}</div></nav>'
        f"<main>{_HOWTO}{_summary(results, n_train, n_flipped)}{''.join(sections)}</main>"
        "<footer>Generated by datainf. Self-contained file: no network needed to view it.</footer>"
        "</body></html>\n"
    )


def _write_atomically(path: Path, text: str) -> None:
    """Writes to a temporary file in the same folder, then renames it over ``path`` (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_report(path: str | os.PathLike, *, results: dict, train: Sequence[dict],
                 scores: Mapping[str, Any], query_scores: Mapping[str, Any] | None = None,
                 queries: Sequence[dict] | None = None, top_k: int = 10,
                 title: str = "datainf report") -> Path:
    """Writes the self-contained HTML report of an influence run to ``path`` (atomically); returns the path.

    results: JSON-able dict like the demo's results.json (library_version, created, task, settings,
        validation_accuracy, wall_seconds, methods -> {auc, seconds, pearson_with_exact,
        spearman_with_exact, damping}, optional diagnostics); missing values show as "n/a".
    train: one dict per training example: "text", "label", optionally "flipped", "true_label",
        "label_name". "flipped" (all examples or none) enables the ROC and histogram sections.
    scores: method -> (n_train,) influence on the validation loss (positive = harmful).
    query_scores: optional method -> (n_train, n_query) influence on each query's loss; needs ``queries``,
        one dict with "text" (or "prompt"/"response") per query. The first MAX_QUERIES are shown.
    top_k: rows of each harmful/helpful table.
    """
    document = render_report(results=results, train=train, scores=scores, query_scores=query_scores,
                             queries=queries, top_k=top_k, title=title)
    target = Path(path)
    _write_atomically(target, document)
    return target
