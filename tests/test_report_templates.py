"""The report from Jinja2 templates: markup out of the Python code, autoescaping on, templates shipped as package
data, the page written through datainf.atomic; every query shown (paged when there are many), and the extra
data columns of the records (e.g. "skill", "source") in the tables."""

from __future__ import annotations

import io
import re
import tokenize
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest

import datainf.report
from datainf import atomic
from datainf.errors import DataInfError
from datainf.outputs import REPORT_MARKER, is_report
from datainf.report import render_report, write_report
from datainf.report.html import MISSING, QUERIES_PER_PAGE
from test_report import EVIL, Node, body_rows, fake_run, header_cells, parse

REPORT = Path(datainf.report.__file__).resolve().parent  # the sources under test: src/datainf/report
ROOT = REPORT.parents[2]
TAG = re.compile(r"<[A-Za-z/]")


def tag_strings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string literal of a Python file holding a tag ('<' then a letter or '/'); an
    f-string counts once, with its literal parts joined."""
    found, parts = [], []
    for token in tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline):
        kind = tokenize.tok_name[token.type]
        if kind == "STRING" and TAG.search(token.string):
            found.append((token.start[0], token.string))
        elif kind == "FSTRING_START":
            parts.append("")
        elif kind == "FSTRING_MIDDLE" and parts:
            parts[-1] += token.string
        elif kind == "FSTRING_END" and parts:
            text = parts.pop()
            if TAG.search(text):
                found.append((token.start[0], text))
    return found


def test_markup_lives_in_templates_not_in_python():
    """Issue 30's target: at most 10 tag-bearing Python strings in report/ (there were 92, docstrings
    included); the markup is in report/templates."""
    found = {f"{path.name}:{line}": text[:60] for path in sorted(REPORT.glob("*.py")) for line, text in tag_strings(path)}
    assert len(found) <= 10, found
    assert {"report.html.j2", "macros.html.j2", "report.css", "images.html.j2"} <= {
        p.name for p in (REPORT / "templates").iterdir()}


def test_templates_are_package_data_and_jinja2_a_dependency():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert any(re.fullmatch(r"jinja2\s*>=\s*3\.1", d, re.IGNORECASE) for d in project["project"]["dependencies"])
    globs = project["tool"]["setuptools"]["package-data"]["datainf.report"]
    templates = [p.relative_to(REPORT).as_posix() for p in (REPORT / "templates").iterdir()]
    assert templates and all(any(fnmatch(name, glob) for glob in globs) for name in templates), (templates, globs)


def test_autoescape_is_on():
    from datainf.report.render import environment

    environment_ = environment()
    assert environment_.autoescape is True
    text = environment_.from_string("<p>{{ value }}</p>").render(value=EVIL)
    assert text == "<p>&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;</p>"


def test_the_page_is_written_through_atomic_and_recognised_as_a_report(tmp_path, monkeypatch):
    written = []
    real = atomic.write_text

    def spy(path, text, **kwargs):
        written.append(Path(path))
        return real(path, text, **kwargs)

    monkeypatch.setattr(atomic, "write_text", spy)
    results, train, scores, _ = fake_run()
    path = write_report(tmp_path / "r.html", results=results, train=train, scores=scores)
    assert written == [path]
    text = path.read_text(encoding="utf-8")
    assert REPORT_MARKER in text[-4096:] and is_report(path)


# ------------------------------------------------------------------------------------------- every query, paged
def many_queries(n_query: int, seed: int = 0):
    results, train, scores, _ = fake_run(with_flipped=False, seed=seed)
    rng = np.random.default_rng(seed + 1)
    query_scores = {"datainf": rng.normal(size=(len(train), n_query)), "exact": rng.normal(size=(len(train), n_query))}
    queries = [{"prompt": f"question {j} <about> & things", "response": f"answer {j}"} for j in range(n_query)]
    return results, train, scores, query_scores, queries


def pages_of(section: Node) -> list[Node]:
    return [n for n in section.iter("details") if "query-page" in n.attrs.get("class", "")
            and n.attrs.get("id") != "query-index"]


def test_every_query_is_shown_in_collapsed_pages(tmp_path):
    n_query = 500
    results, train, scores, query_scores, queries = many_queries(n_query)
    path = tmp_path / "many.html"
    path.write_text(render_report(results=results, train=train, scores=scores, query_scores=query_scores,
                                  queries=queries, top_k=2, generation=True), encoding="utf-8")
    root = parse(path)
    section = root.find_id("queries")
    articles = list(section.iter("article"))
    assert [a.attrs["id"] for a in articles] == [f"query-{j}" for j in range(n_query)]
    for j, article in enumerate(articles):  # each named by its prompt's text, never "query N"
        name = next(article.iter("h3")).text()
        assert name == f"{j + 1}. {queries[j]['prompt']}", name
    pages = pages_of(section)
    per_page = QUERIES_PER_PAGE
    assert len(pages) == -(-n_query // per_page)
    assert ["open" in p.attrs for p in pages] == [True] + [False] * (len(pages) - 1)
    for number, page in enumerate(pages):
        ids = [a.attrs["id"] for a in page.iter("article")]
        assert ids == [f"query-{j}" for j in range(number * per_page, min((number + 1) * per_page, n_query))]
        assert next(page.iter("summary")).text() == f"Queries {number * per_page + 1}–{(number + 1) * per_page} of 500"
    index = root.find_id("query-index")
    assert index.tag == "details" and "open" not in index.attrs
    links = [a.attrs["href"] for a in index.iter("a")]
    assert links == [f"#query-{j}" for j in range(n_query)]
    for j in (0, 137, 499):  # a query's lists: computed here, independently
        article = root.find_id(f"query-{j}")
        helpful, harmful = list(article.iter("table"))[:2]
        column = query_scores["datainf"][:, j]
        want_helpful = [i for i in np.argsort(column, kind="stable") if column[i] < 0][:2]
        want_harmful = [i for i in np.argsort(-column, kind="stable") if column[i] > 0][:2]
        assert [int(r[1]) for r in body_rows(helpful)] == want_helpful
        assert [int(r[1]) for r in body_rows(harmful)] == want_harmful
        assert [r[2] for r in body_rows(harmful)] == [f"{column[i]:+.3e}" for i in want_harmful]


def test_a_few_queries_are_not_paged(tmp_path):
    results, train, scores, query_scores, queries = many_queries(QUERIES_PER_PAGE)
    path = write_report(tmp_path / "r.html", results=results, train=train, scores=scores, query_scores=query_scores,
                        queries=queries, top_k=2)
    section = parse(path).find_id("queries")
    assert len(list(section.iter("article"))) == QUERIES_PER_PAGE and not pages_of(section)


# ------------------------------------------------------------------------------------------- extra data columns
def test_extra_columns_are_shown_in_the_rows_and_beside_each_query(tmp_path):
    results, train, scores, query_scores, queries = many_queries(3)
    skills = ("math", "code", "<chat>")
    for i, example in enumerate(train):
        example["skill"] = skills[i % 3]
        if i % 4:
            example["source"] = f"set-{i % 4}"
    for j, query in enumerate(queries):
        query["skill"] = skills[j]
    path = write_report(tmp_path / "r.html", results=results, train=train, scores=scores, query_scores=query_scores,
                        queries=queries, top_k=4, columns=["skill", "source"])
    root = parse(path)
    assert "<chat>" not in path.read_text(encoding="utf-8")  # escaped
    tables = [t for t in root.iter("table") if "examples" in t.attrs.get("class", "")]
    assert len(tables) == 2 * len(scores) + 3 * 2 * len(query_scores)  # overall lists, each query's lists
    for table in tables:
        head = header_cells(table)
        assert head[head.index("Label") + 1:] == ["skill", "source", "Text"]
        for row in body_rows(table):
            example = train[int(row[1])]
            assert row[head.index("skill")] == example["skill"]
            assert row[head.index("source")] == example.get("source", MISSING)
    for j, query in enumerate(queries):
        article = root.find_id(f"query-{j}")
        shown = next(n for n in article.iter("p") if n.attrs.get("class") == "query-columns").text()
        assert shown == f"skill: {query['skill']}"
    with pytest.raises(DataInfError, match="columns"):
        render_report(results=results, train=train, scores=scores, columns="skill")
