"""`datainf report`: a self-contained HTML report from a scores file, laid out for the store's task.

The task comes from the scores file (the training store's task): for generations (causal_lm,
causal_lm_mean) each query's prompt and response comes first, with its own helpful and harmful training
examples; for classification, the ROC / histogram sections when a flipped column is known, and the labels.
The training texts are the training store's records, or ``--data`` checked against the store's dataset
fingerprint (so texts are never attached to the wrong scores); the queries' texts are the query store's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from datainf.cli.common import data_options
from datainf.cli.options import option, overwrite_option
from datainf.errors import DataInfError
from datainf.outputs import check_apart, check_output

GENERATION_TASKS = ("causal_lm", "causal_lm_mean")


def _extras(record: Any) -> dict[str, Any]:
    """The extra data columns of a record (e.g. "skill", "source", "id"), as `top`'s rows carry them:
    :func:`datainf.ranking.data_columns` (imported here: the CLI starts without torch)."""
    from datainf.ranking import data_columns

    return data_columns(record)


@click.command("report")
@option("--scores", required=False, default=None,
        help="A scores file from `datainf score` (.safetensors; an old .npz is still read). Required unless --tokens "
             "is given.")
@option("--data", default=None,
        help="The training data the store was made from (default: the examples kept in the training "
             "store); checked against the store's dataset fingerprint.")
@data_options
@click.option("--flipped-column", default="flipped",
              help="classification: optional boolean column of --data marking known-bad labels.")
@option("--out", "out_path", required=True,
        help="The HTML file; an existing file is replaced only if it is a datainf report (or with --overwrite).")
@overwrite_option
@click.option("--top-k", type=click.IntRange(min=1), default=10, help="Rows of each helpful / harmful list.")
@click.option("--title", default=None, help="The page's title.")
@click.option("--tokens", "tokens_path", type=click.Path(dir_okay=False), default=None,
              help="Instead of --scores: the JSON of `datainf explain --tokens --json FILE`; the page shows each "
                   "response with its tokens shaded by their influence and the top examples per token.")
@click.option("--group-by", "group_by", default=None, metavar="COLUMN",
              help="A data column of the records (e.g. skill, source): rows coloured by its value (a legend), each "
                   "query's listed examples counted per value, and the share of them in the query's own value.")
def command(scores_path: str | None, data_path: str | None, flipped_column: str, out_path: str, overwrite: bool,
            top_k: int, title: str | None, tokens_path: str | None = None, group_by: str | None = None,
            **data: Any) -> None:
    """A self-contained HTML report from a scores file, laid out for its task (generations: each query's
    prompt and response first, with its most helpful and harmful training examples); or, with --tokens, of
    an explain --tokens file, token by token."""
    from datainf.estimators.defaults import REFERENCE_METHOD
    from datainf.metrics import method_summary
    from datainf.report import write_report
    from datainf.scoring import load_scores

    if tokens_path is not None or scores_path is None:  # the token-level page (datainf.report.tokens)
        from datainf.report.tokens import read_explain_tokens, write_token_report

        if tokens_path is None or scores_path is not None:
            raise DataInfError("give --scores FILE (a scores file) or --tokens FILE (an `explain --tokens --json` "
                               "file), one of the two")
        if group_by is not None:
            raise DataInfError("--group-by groups the examples of a --scores report; leave it out with --tokens")
        check_apart(out_path, {"explain file": tokens_path})
        check_output(out_path, inputs={"explain file": tokens_path}, kind="report", overwrite=overwrite)
        write_token_report(out_path, read_explain_tokens(tokens_path), title)
        click.echo(f"wrote {out_path}")
        return

    inputs = {"scores file": scores_path, "data file": data_path}
    check_apart(out_path, inputs)
    loaded = load_scores(scores_path)
    train_meta = loaded.meta.get("train_store") or {}
    check_output(out_path, inputs={**inputs, "training store": train_meta.get("path"),  # whose records it reads
                                   "query store": (loaded.meta.get("query_store") or {}).get("path")},
                 kind="report", overwrite=overwrite)
    task = train_meta.get("task") or "classification"
    generation = task in GENERATION_TASKS
    train = _training_examples(loaded, scores_path, data_path, data, flipped_column, generation)
    queries = _query_examples(loaded)
    arrays = {name: tensor.double().numpy() for name, tensor in loaded.scores.items()}
    for name, array in arrays.items():
        if array.shape[0] != len(train):
            raise DataInfError(f"scores '{name}' have {array.shape[0]} training rows but the training data has "
                               f"{len(train)} examples; pass the data the store was made from")

    # what each entry's lists are over: each query, their mean, one query, or self-influence
    targets, overall, per_query = {}, {}, {}
    for name, array in arrays.items():
        settings = loaded.settings.get(name) or {}
        mean_query = bool((settings.get("arguments") or {}).get("mean_query"))
        if array.ndim == 1:
            targets[name] = "self" if settings.get("kind", "self_influence") == "self_influence" else "one"
            overall[name] = array
        elif array.shape[1] == 1:
            targets[name] = "mean" if mean_query else "one"
            overall[name] = array[:, 0]
            if not mean_query:
                per_query[name] = array
        else:
            targets[name] = "averaged"
            overall[name] = array.mean(axis=1)
            per_query[name] = array
    n_queries = _query_count(loaded, per_query)
    if queries is not None and n_queries is not None and len(queries) != n_queries:
        click.echo(f"warning: the query store holds {len(queries)} records for {n_queries} query columns; the "
                   "queries are shown by number", err=True)
        queries = None
    # the per-query lists: one shape for every entry (the most common one), the others only in the overall lists
    if per_query:
        columns = max({a.shape[1] for a in per_query.values()},
                      key=lambda c: sum(a.shape[1] == c for a in per_query.values()))
        per_query = {name: a for name, a in per_query.items() if a.shape[1] == columns}
        if not generation and columns == 1:
            per_query = {}  # classification: one query's lists are the overall ones (as before)
    shown_queries = None
    if per_query:
        n_columns = next(iter(per_query.values())).shape[1]
        shown_queries = queries if queries is not None else [
            {"text": f"query {j + 1} of {n_columns} (the query store's texts are not available)"}
            for j in range(n_columns)]
    elif generation and queries is not None and set(targets.values()) == {"mean"}:
        shown_queries = queries  # listed as the queries whose mean was scored

    flagged = None
    if train and all("flipped" in r for r in train):
        import numpy as np

        flagged = np.array([r["flipped"] for r in train])
    summary = method_summary(overall, flagged, reference=REFERENCE_METHOD)
    methods: dict[str, dict[str, Any]] = {}
    for name in overall:
        settings = loaded.settings.get(name) or {}
        methods[name] = {"seconds": settings.get("seconds"), "damping": settings.get("damping") or None,
                         **summary[name]}
        options = _options(settings)
        if options:
            methods[name]["Options"] = options
    kinds = set(targets.values())
    if len(kinds) > 1:
        for name in methods:
            methods[name]["Lists over"] = _TARGET_WORDS[targets[name]]
    seconds = [(loaded.settings.get(n) or {}).get("seconds") for n in overall]
    results = {
        "task": task,
        "library_version": loaded.meta.get("library_version"),
        "created": loaded.meta.get("created"),
        "fingerprints": train_meta.get("fingerprints"),
        "n_query": n_queries,
        "scoring_seconds": sum(seconds) if seconds and all(isinstance(s, (int, float)) for s in seconds) else None,
        "settings": _settings(loaded, scores_path, data_path),
        "methods": methods,
    }
    from datainf.ranking import RECORD_KEYS

    columns = list(dict.fromkeys(k for r in [*train, *(shown_queries or [])] for k in r if k not in RECORD_KEYS))
    if group_by is not None and group_by not in columns:
        where = f"--data {data_path}" if data_path is not None else "the training store's records"
        raise DataInfError(f"--group-by {group_by}: {where} have no column '{group_by}'; "
                           + (f"their data columns: {', '.join(columns)}" if columns else
                              "they have no data columns besides the text (add one, e.g. skill, to the data "
                              "given to `datainf grads`)"))
    write_report(out_path, results=results, train=train, scores=overall, query_scores=per_query or None,
                 queries=shown_queries if per_query or generation else None, top_k=top_k,
                 title=title or f"datainf report: {Path(scores_path).name}", generation=generation,
                 scores_over=_scores_over(kinds, targets, n_queries, queries), columns=columns, group_by=group_by)
    click.echo(f"wrote {out_path}")


_TARGET_WORDS = {"averaged": "the mean of the per-query scores", "mean": "the mean query gradient",
                 "one": "the one query", "self": "self-influence"}


def _scores_over(kinds: set[str], targets: dict[str, str], n_queries: int | None,
                 queries: list[dict] | None) -> str:
    """The overall lists' heading qualifier: what they rank against, said explicitly."""
    of = f"the {n_queries} queries" if n_queries else "the queries"
    if kinds == {"averaged"}:
        return f"over the mean query (each example's scores averaged over {of})"
    if kinds == {"mean"}:
        return f"over the mean query (scored against the mean gradient of {of})"
    if kinds == {"self"}:
        return "self-influence (each training example's influence on its own loss)"
    if kinds == {"one"}:
        if queries and len(queries) == 1:
            from datainf.report.html import query_name

            return f"for the query “{query_name(queries[0], 60)}”"
        return "for the one query"
    return "per method over the mean query or its own target (see “Lists over” in Methods)"


def _options(settings: dict[str, Any]) -> str:
    """The scoring options that change what a score means, in words ('' when defaults)."""
    arguments = settings.get("arguments") or {}
    words = []
    if arguments.get("normalize"):
        words.append("normalized (cosine after preconditioning)")
    damping = arguments.get("damping")
    if isinstance(damping, (int, float)):
        words.append(f"damping given: {damping:g}")
    elif damping is not None:
        words.append("damping given per block")
    for key, value in (arguments.get("options") or {}).items():
        words.append(f"{key}={value}")
    mismatch = (settings.get("diagnostics") or {}).get("mismatch")
    if mismatch:
        words.append("stores differ (allowed): " + "; ".join(map(str, mismatch)))
    return ", ".join(words)


def _query_count(loaded: Any, per_query: dict[str, Any]) -> int | None:
    store = loaded.meta.get("query_store") or {}
    if isinstance(store.get("n_examples"), int):
        return store["n_examples"]
    if per_query:
        return int(next(iter(per_query.values())).shape[1])
    return None


def _settings(loaded: Any, scores_path: str, data_path: str | None) -> dict[str, Any]:
    """The settings table: flat rows, fingerprints written out, no nested JSON."""
    out: dict[str, Any] = {"scores file": scores_path}
    if data_path is not None:
        out["training data"] = f"{data_path} (checked against the store's dataset fingerprint)"
    for key, what in (("train_store", "training store"), ("query_store", "query store")):
        store = loaded.meta.get(key)
        if not store:
            continue
        out[what] = store.get("path")
        out[f"{what}: examples"] = store.get("n_examples")
        out[f"{what}: blocks"] = store.get("blocks")
        out[f"{what}: task"] = store.get("task")
        fingerprints = store.get("fingerprints") or {}
        if fingerprints:
            out[f"{what}: fingerprints"] = ", ".join(f"{k} {v}" for k, v in fingerprints.items())
    for name, settings in loaded.settings.items():
        arguments = settings.get("arguments") or {}
        shown = {k: v for k, v in arguments.items() if k in ("method", "mean_query", "normalize", "dtype", "device",
                                                           "chunk_size") and v is not None}
        if shown:
            out[f"{name}: arguments"] = ", ".join(f"{k}={v}" for k, v in shown.items())
    skip = {"format", "version", "train_store", "query_store", "library_version", "created"}
    out.update({k: v for k, v in loaded.meta.items() if k not in skip})
    return out


def _training_examples(loaded: Any, scores_path: str, data_path: str | None, data: dict[str, Any],
                       flipped_column: str, generation: bool) -> list[dict]:
    """What the report shows of each training example: prompt / response (or text), label when known,
    flipped when --data has that column (classification)."""
    from datainf.cli.top import training_records
    from datainf.ranking import record_parts
    from datainf.store import GradientStore

    train_meta = loaded.meta.get("train_store") or {}
    path = train_meta.get("path")
    if data_path is None:
        if not path or not Path(path).is_dir():
            raise DataInfError(f"{scores_path}: its training store ({path or 'not recorded'}) is not there to read "
                               "the training examples from; pass --data with the training data")
        expected = (train_meta.get("fingerprints") or {}).get("dataset")
        found = GradientStore.open(path).fingerprints.get("dataset")
        if expected is not None and found != expected:
            raise DataInfError(f"the training store {path} now holds other data than the one {scores_path} was "
                               "scored on (dataset fingerprints differ); pass --data with that data")
    records = training_records(loaded, data_path, data)
    if records is None:
        raise DataInfError(f"the training store {path} keeps no records of its examples; pass --data with the "
                           "training data")
    if len(records) != loaded.n_train:
        raise DataInfError(f"the training data has {len(records)} examples but the scores have {loaded.n_train}")
    shown = []
    for record in records:
        parts = record_parts(record)
        example = {k: parts[k] for k in ("prompt", "response", "turns", "text", "label", "label_name") if k in parts}
        if "prompt" in example:
            example.pop("text", None)
        shown.append({**example, **_extras(record)})
    if data_path is not None:
        split = data.get("split")
        label_column = data.get("label_column") or "label"
        if generation:
            labels = _column(data_path, split, label_column)
            if labels is not None:
                for example, label in zip(shown, labels):
                    example["label"] = label
        else:
            raw = _column(data_path, split, label_column)
            if raw is not None and any(isinstance(v, str) for v in raw):
                for example, name in zip(shown, raw):
                    example["label_name"] = str(name)
            flags = _column(data_path, split, flipped_column)
            if flags is not None:
                for example, flag in zip(shown, flags):
                    example["flipped"] = str(flag).strip().lower() in ("1", "true", "yes")
    return shown


def _column(path: str, split: str | None, column: str) -> list[Any] | None:
    """The values of one column of a data file, or None when some row lacks it."""
    from datainf.data.tables import read_table

    rows, columns = read_table(path, split)
    if column not in columns:
        return None
    values = [row.get(column) for row in rows]
    return None if any(v is None for v in values) else values


def _query_examples(loaded: Any) -> list[dict] | None:
    """Each query's prompt / response (or text, label) from the query store's records, when the store is still
    the one that was scored (same dataset fingerprint); else None (queries are then shown by number)."""
    from datainf.ranking import record_parts
    from datainf.store import GradientStore

    meta = loaded.meta.get("query_store") or {}
    path = meta.get("path")
    if not path or not Path(path).is_dir():
        return None
    store = GradientStore.open(path)
    expected = (meta.get("fingerprints") or {}).get("dataset")
    if expected is not None and store.fingerprints.get("dataset") != expected:
        click.echo(f"warning: the query store {path} now holds other queries than the scored ones; the queries "
                   "are shown by number", err=True)
        return None
    records = store.records()
    if records is None:
        return None
    out = []
    for record in records:
        parts = record_parts(record)
        query = {k: parts[k] for k in ("prompt", "response", "turns", "text", "label") if k in parts}
        if "prompt" in query:
            query.pop("text", None)
        out.append({**query, **_extras(record)})
    return out
