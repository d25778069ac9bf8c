"""`datainf report --group-by COLUMN` on a causal LM run whose records carry data columns (skill, source).

Every number on the page is recomputed here from the scores file and the records, without the report's code:
each query's listed examples (the sign-filtered top-k order) counted per value of the column, the share of
training examples per value, the query's own value marked, each row's colour class, and per method the mean
share of a query's listed examples in its own value. An unknown column is refused with one `error:` line
naming the columns the records have, and nothing is written.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cli_helpers import hashes  # noqa: E402
from cli_helpers import run_cli as cli  # noqa: E402
from datainf.scoring import load_scores  # noqa: E402
from test_report import Node, body_rows, header_cells, parse  # noqa: E402
from test_report_generation import K, expected_order, open_tables, tagged_run, tiny_lm  # noqa: E402,F401

COLOURS = 8  # report.css defines g0..g7


def group_report(root, capsys, column: str):
    out = root / f"groups-{column}.html"
    code, _, err = cli(["report", "--scores", str(root / "scores.safetensors"), "--out", str(out), "--top-k", str(K),
                        "--group-by", column], capsys)
    assert code == 0, err
    return parse(out)


def share(count: int, total: int) -> str:
    return f"{count} of {total} ({round(100 * count / total)}%)"


def tables_of(node: Node, css: str) -> list[Node]:
    return [t for t in node.iter("table") if css in t.attrs.get("class", "").split()]


def row_classes(table: Node) -> list[set[str]]:
    return [set(tr.attrs.get("class", "").split()) for tr in next(table.iter("tbody")).iter("tr")]


def test_group_by_skill_counts_each_querys_lists_and_colours_the_rows(tagged_run, capsys):  # noqa: F811
    root, train, queries = tagged_run
    page = group_report(root, capsys, "skill")
    loaded = load_scores(root / "scores.safetensors")
    values = sorted({r["skill"] for r in train} | {q["skill"] for q in queries})
    colour = {v: f"g{i % COLOURS}" for i, v in enumerate(values)}
    n = len(train)

    # the legend: every value, its share of the training examples
    section = page.find_id("groups")
    legend, summary = tables_of(section, "groups")[0], tables_of(section, "methods")[0]
    assert [r[0] for r in body_rows(legend)] == values
    assert [r[1] for r in body_rows(legend)] == [share(sum(t["skill"] == v for t in train), n) for v in values]

    checked = 0
    for j, query in enumerate(queries):
        article = page.find_id(f"query-{j}")
        counts = tables_of(article, "groups")
        examples = open_tables(article)
        assert len(counts) == 2 and len(examples) == 4  # per method: its counts, then helpful and harmful
        for g, method in enumerate(("datainf", "identity")):
            column = loaded.scores[method][:, j]
            helpful, harmful = expected_order(column, "helpful"), expected_order(column, "harmful")
            assert header_cells(counts[g]) == ["skill", "Training examples", "Most helpful", "Most harmful"]
            want = []
            for v in values:
                row = [v, share(sum(t["skill"] == v for t in train), n)]
                row += [share(sum(train[i]["skill"] == v for i in order), len(order)) if order else "—"
                        for order in (helpful, harmful)]
                if v == query["skill"]:
                    row[0] = f"the query's → {v}"
                want.append(row)
            assert body_rows(counts[g]) == want, (method, j)
            assert [("own" in c) for c in row_classes(counts[g])] == [v == query["skill"] for v in values]
            for (_, table), order in zip(examples[2 * g:2 * g + 2], (helpful, harmful)):
                assert [int(r[1]) for r in body_rows(table)] == order
                assert [c & set(colour.values()) for c in row_classes(table)] == [
                    {colour[train[i]["skill"]]} for i in order]
                checked += len(order)
    assert checked > 0

    # per method: the mean over queries of the share of each list in the query's own skill, and chance
    rows = {r[0]: r[1:] for r in body_rows(summary)}
    chance = sum(sum(t["skill"] == q["skill"] for t in train) / n for q in queries) / len(queries)
    for method in ("datainf", "identity"):
        matrix = loaded.scores[method]
        means = []
        for kind in ("helpful", "harmful"):
            shares = [sum(train[i]["skill"] == q["skill"] for i in order) / len(order)
                      for j, q in enumerate(queries) if (order := expected_order(matrix[:, j], kind))]
            means.append(f"{sum(shares) / len(shares):.2f}" if shares else "—")  # no query has such a list
        assert rows[method] == [str(len(queries)), *means, f"{chance:.2f}"]


def test_group_by_a_column_the_queries_lack_marks_no_own_value(tagged_run, capsys):  # noqa: F811
    """source is on the training records only: rows are grouped and coloured, no row is the query's, and
    there is no per-query share table."""
    root, train, queries = tagged_run
    page = group_report(root, capsys, "source")
    values = sorted({r["source"] for r in train})
    assert not tables_of(page.find_id("groups"), "methods")
    first = tables_of(page.find_id("query-0"), "groups")[0]
    assert [r[0] for r in body_rows(first)] == values
    assert not any("own" in c for c in row_classes(first))


def test_an_unknown_group_by_column_is_refused_and_nothing_written(tagged_run, capsys):  # noqa: F811
    root, _, _ = tagged_run
    out = root / "refused.html"
    before = hashes(root)
    code, stdout, err = cli(["report", "--scores", str(root / "scores.safetensors"), "--out", str(out),
                             "--group-by", "topic"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert "--group-by topic" in lines[0] and "no column 'topic'" in lines[0]
    assert "skill, source" in lines[0]  # the columns the records have
    assert not out.exists() and hashes(root) == before


def test_top_rows_carry_the_records_data_columns(tagged_run, capsys):  # noqa: F811
    """`datainf top` (JSON lines and CSV): each row has its training example's skill and source and its
    query's skill (train_skill, train_source, query_skill), read here from the records by the row's indices;
    writing the same --out again is allowed (the file is still recognised as a table of `top`)."""
    import csv
    import json

    root, train, queries = tagged_run
    names = {f"query {j}": j for j in range(len(queries))}
    for fmt in ("jsonl", "csv"):
        out = root / f"top.{fmt}"
        for _ in range(2):
            code, _, err = cli(["top", "--scores", str(root / "scores.safetensors"), "--k", "2", "--format", fmt,
                                "--out", str(out)], capsys)
            assert code == 0, err
        text = out.read_text(encoding="utf-8")
        rows = ([json.loads(line) for line in text.splitlines()] if fmt == "jsonl"
                else list(csv.DictReader(text.splitlines())))
        assert rows
        for row in rows:
            i, j = int(row["train_index"]), names[row["query"]]
            assert (row["train_skill"], row["train_source"], row["query_skill"]) == (
                train[i]["skill"], train[i]["source"], queries[j]["skill"])
