"""The self-contained HTML report: parsed back with the stdlib html.parser and checked section by section."""

from __future__ import annotations

import base64
import os
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from datainf.errors import DataInfError
from datainf.report import histogram_png, roc_auc, roc_curve_png, roc_points, write_report
from datainf.report.html import MISSING

PNG_HEADER = b"\x89PNG\r\n\x1a\n"
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
EVIL = "<script>alert('pwned')</script> & <b>bold</b>"


# ------------------------------------------------------------------------------------------- tiny DOM
class Node:
    def __init__(self, tag: str, attrs: dict, parent: Node | None) -> None:
        self.tag, self.attrs, self.parent, self.children = tag, attrs, parent, []

    def text(self) -> str:
        return "".join(child if isinstance(child, str) else child.text() for child in self.children)

    def iter(self, tag: str | None = None):
        for child in self.children:
            if isinstance(child, Node):
                if tag is None or child.tag == tag:
                    yield child
                yield from child.iter(tag)

    def find_id(self, element_id: str) -> Node | None:
        return next((node for node in self.iter() if node.attrs.get("id") == element_id), None)


class TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {}, None)
        self.current = self.root

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs), self.current)
        self.current.children.append(node)
        if tag not in VOID:
            self.current = node

    def handle_startendtag(self, tag, attrs):
        self.current.children.append(Node(tag, dict(attrs), self.current))

    def handle_endtag(self, tag):
        node = self.current
        while node is not self.root and node.tag != tag:
            node = node.parent
        assert node is not self.root, f"unbalanced </{tag}>"
        self.current = node.parent

    def handle_data(self, data):
        self.current.children.append(data)


def parse(path) -> Node:
    builder = TreeBuilder()
    builder.feed(path.read_text(encoding="utf-8"))
    builder.close()
    assert builder.current is builder.root, "unclosed elements"
    return builder.root


def body_rows(table: Node) -> list[list[str]]:
    tbody = next(table.iter("tbody"))
    return [[cell.text().strip() for cell in row.children if isinstance(cell, Node)]
            for row in tbody.iter("tr")]


def header_cells(table: Node) -> list[str]:
    return [cell.text().strip() for cell in next(table.iter("thead")).iter("th")]


def first_table(section: Node) -> Node:
    """The first method's table: the one not inside a <details> block."""
    for table in section.iter("table"):
        parent = table.parent
        while parent is not None and parent.tag != "details":
            parent = parent.parent
        if parent is None:
            return table
    raise AssertionError("no open table")


# ------------------------------------------------------------------------------------------- fake run
N_TRAIN = 40
METHOD_NAMES = ("datainf", "exact", "lissa", "identity")


def fake_run(with_flipped: bool = True, seed: int = 0):
    rng = np.random.default_rng(seed)
    flipped = np.zeros(N_TRAIN, dtype=bool)
    flipped[rng.choice(N_TRAIN, size=8, replace=False)] = True
    train = []
    for index in range(N_TRAIN):
        example = {"text": f"review number {index}", "label": int(index % 2), "label_name": ["neg", "pos"][index % 2]}
        if with_flipped:
            example |= {"flipped": bool(flipped[index]), "true_label": int(index % 2) ^ int(flipped[index])}
        train.append(example)
    train[5]["text"] = EVIL
    base = rng.normal(size=N_TRAIN) + 3.0 * flipped
    scores = {
        "datainf": base + 0.1 * rng.normal(size=N_TRAIN),
        "exact": torch.tensor(base),
        "lissa": base + 0.5 * rng.normal(size=N_TRAIN),
        "identity": rng.normal(size=N_TRAIN),
    }
    results = {
        "library_version": "0.1.0", "created": "2026-11-29T18:00:00", "task": "classification",
        "settings": {"model": "tiny-bert", "n_train": N_TRAIN, "noise_fraction": 0.2, "lora_rank": 4},
        "validation_accuracy": 0.8, "wall_seconds": 300.0,
        "methods": {
            "datainf": {"auc": 0.75, "seconds": 0.4, "pearson_with_exact": 0.6, "spearman_with_exact": 0.55,
                        "damping": "paper rule per block"},
            "exact": {"auc": 0.8126, "seconds": 2.5},
            "lissa": {"auc": None, "seconds": 1.0},
            "identity": None,
        },
        "diagnostics": {"lissa": {"relative_residual": 0.01}, "n_blocks": 6},
    }
    return results, train, scores, flipped


# ------------------------------------------------------------------------------------------- tests
def test_full_report_sections_tables_and_images(tmp_path):
    results, train, scores, flipped = fake_run()
    path = write_report(tmp_path / "report.html", results=results, train=train, scores=scores, top_k=5)
    assert path == tmp_path / "report.html"
    root = parse(path)

    for section_id in ("settings", "methods", "roc", "histograms", "harmful", "helpful", "diagnostics"):
        section = root.find_id(section_id)
        assert section is not None and section.tag == "section", section_id
        assert section.text().strip(), section_id
    assert root.find_id("queries") is None
    assert "positive" in root.text().lower() and "harmful" in root.text().lower()

    settings = {row[0]: row[1] for row in body_rows(next(root.find_id("settings").iter("table")))}
    assert settings["model"] == "tiny-bert" and settings["n_train"] == str(N_TRAIN)

    methods_table = next(root.find_id("methods").iter("table"))
    rows = {row[0]: row for row in body_rows(methods_table)}
    assert list(rows) == list(METHOD_NAMES)
    auc_column = header_cells(methods_table).index("AUC (flipped)")
    assert rows["datainf"][auc_column] == "0.750"
    assert rows["exact"][auc_column] == "0.813"
    # not measured: a dash in the cell, never "n/a"
    assert rows["lissa"][auc_column] == MISSING and rows["identity"][auc_column] == MISSING
    assert set(rows["identity"][1:]) == {MISSING}
    assert "n/a" not in path.read_text(encoding="utf-8")

    # harmful: the largest scores, descending, and the top one is the flipped example with the largest score
    datainf = scores["datainf"]
    harmful = first_table(root.find_id("harmful"))
    head = header_cells(harmful)
    harmful_rows = body_rows(harmful)
    assert len(harmful_rows) == 5
    expected = [int(i) for i in sorted(range(N_TRAIN), key=lambda i: -datainf[i])[:5]]
    assert [int(row[head.index("#")]) for row in harmful_rows] == expected
    top = expected[0]
    assert flipped[top] and datainf[top] == max(datainf[flipped])
    assert harmful_rows[0][head.index("Flipped")] == "yes"
    # the cell is printed as "+d.ddde±xx": 4 significant digits, so at most 5e-4 relative rounding
    assert float(harmful_rows[0][head.index("Score")]) == pytest.approx(datainf[top], rel=5e-4)
    assert harmful_rows[0][head.index("Text")] == f"review number {top}"

    helpful_rows = body_rows(first_table(root.find_id("helpful")))
    assert int(helpful_rows[0][1]) == int(np.argmin(datainf))
    # every other method sits in its own <details> block
    summaries = [node.text().strip() for node in root.find_id("harmful").iter("summary")]
    assert summaries == ["exact", "lissa", "identity"]

    images = list(root.iter("img"))
    assert len(images) == 2
    for image in images:
        source = image.attrs["src"]
        assert source.startswith("data:image/png;base64,")
        assert base64.b64decode(source.split(",", 1)[1]).startswith(PNG_HEADER)

    diagnostics = root.find_id("diagnostics").text()
    assert "relative_residual" in diagnostics and "n_blocks" in diagnostics


def test_text_is_escaped_and_file_is_self_contained(tmp_path):
    results, train, scores, _ = fake_run()
    scores["datainf"][5] = 100.0  # the evil text tops the harmful list
    path = write_report(tmp_path / "r.html", results=results, train=train, scores=scores, title="<i>t</i>")
    raw = path.read_text(encoding="utf-8")
    assert "<script" not in raw and "<b>bold" not in raw and "<i>t</i>" not in raw
    assert "&lt;script&gt;" in raw
    root = parse(path)
    assert not list(root.iter("script"))
    harmful_rows = body_rows(first_table(root.find_id("harmful")))
    assert harmful_rows[0][-1] == EVIL  # shown as text, round-trips exactly
    for node in root.iter():
        for attribute in ("src", "href"):
            value = node.attrs.get(attribute) or ""
            assert not value.startswith(("http:", "https:", "//")), value
    assert not list(root.iter("link"))


def test_flipped_sections_absent_without_flags(tmp_path):
    results, train, scores, _ = fake_run(with_flipped=False)
    root = parse(write_report(tmp_path / "r.html", results=results, train=train, scores=scores))
    assert root.find_id("roc") is None and root.find_id("histograms") is None
    assert not list(root.iter("img"))
    harmful = first_table(root.find_id("harmful"))
    assert "Flipped" not in header_cells(harmful)
    assert len(body_rows(harmful)) == 10


def test_queries_section(tmp_path):
    results, train, scores, _ = fake_run()
    del results["diagnostics"]
    rng = np.random.default_rng(1)
    n_query = 25
    query_scores = {"datainf": rng.normal(size=(N_TRAIN, n_query)),
                    "exact": torch.tensor(rng.normal(size=(N_TRAIN, n_query)))}
    queries = [{"text": f"prompt {j} -> response {j}"} for j in range(n_query)]
    path = write_report(tmp_path / "r.html", results=results, train=train, scores=scores,
                        query_scores=query_scores, queries=queries, top_k=3)
    root = parse(path)
    assert root.find_id("diagnostics") is None
    section = root.find_id("queries")
    assert section is not None
    articles = [node for node in section.iter("article")]
    assert len(articles) == n_query  # every query (25: one page, not split)
    assert not [node for node in section.iter("details") if "query-page" in node.attrs.get("class", "")]
    for j in (0, 7, 24):
        article = root.find_id(f"query-{j}")
        assert f"prompt {j} -> response {j}" in article.text()
        helpful, harmful = [table for table in article.iter("table")][:2]
        column = query_scores["datainf"][:, j]
        assert [int(row[1]) for row in body_rows(harmful)] == list(np.argsort(-column)[:3])
        assert [int(row[1]) for row in body_rows(helpful)] == list(np.argsort(column)[:3])


def test_atomic_write_leaves_no_temporary_files(tmp_path, monkeypatch):
    results, train, scores, _ = fake_run()
    path = tmp_path / "out" / "report.html"
    write_report(path, results=results, train=train, scores=scores)
    assert sorted(os.listdir(path.parent)) == ["report.html"]
    before = path.read_bytes()

    def broken_replace(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_report(path, results=results, train=train, scores=scores, title="second run")
    assert sorted(os.listdir(path.parent)) == ["report.html"]
    assert path.read_bytes() == before


def test_roc_points_and_auc_match_sklearn():
    rng = np.random.default_rng(3)
    for trial in range(5):
        positives = rng.random(60) < 0.3
        scores = np.round(rng.normal(size=60) + positives, 1 if trial % 2 else 6)  # with and without ties
        fpr, tpr = roc_points(scores, positives)
        expected_fpr, expected_tpr, _ = roc_curve(positives, scores, drop_intermediate=False)
        np.testing.assert_allclose(fpr, expected_fpr)
        np.testing.assert_allclose(tpr, expected_tpr)
        assert roc_auc(torch.tensor(scores), positives) == pytest.approx(roc_auc_score(positives, scores))
    assert roc_auc([1.0, 2.0], [True, True]) is None


def test_plot_functions_return_png():
    rng = np.random.default_rng(4)
    positives = rng.random(30) < 0.3
    scores = {"datainf": rng.normal(size=30), "exact": torch.randn(30)}
    assert roc_curve_png(scores, positives).startswith(PNG_HEADER)
    assert histogram_png(scores, positives).startswith(PNG_HEADER)
    assert histogram_png({"constant": np.zeros(30)}, positives).startswith(PNG_HEADER)


@pytest.mark.parametrize("change, message", [
    (lambda run: run[2].__setitem__("lissa", np.zeros(N_TRAIN - 1)), "lissa"),
    (lambda run: run[2].__setitem__("exact", np.full(N_TRAIN, np.nan)), "NaN"),
    (lambda run: run[1][3].pop("flipped"), "flipped"),
    (lambda run: run[1][2].pop("text"), r"train\[2\]"),
])
def test_bad_input_raises(tmp_path, change, message):
    run = fake_run()
    change(run)
    results, train, scores, _ = run
    with pytest.raises(DataInfError, match=message):
        write_report(tmp_path / "r.html", results=results, train=train, scores=scores)
    assert not os.listdir(tmp_path)


def test_bad_query_input_raises(tmp_path):
    results, train, scores, _ = fake_run()
    with pytest.raises(DataInfError, match="queries"):
        write_report(tmp_path / "r.html", results=results, train=train, scores=scores,
                     query_scores={"datainf": np.zeros((N_TRAIN, 2))})
    with pytest.raises(DataInfError, match="shape"):
        write_report(tmp_path / "r.html", results=results, train=train, scores=scores,
                     query_scores={"datainf": np.zeros((N_TRAIN, 2))}, queries=[{"text": "only one"}])
    with pytest.raises(DataInfError, match="top_k"):
        write_report(tmp_path / "r.html", results=results, train=train, scores=scores, top_k=0)


def cards(root: Node) -> dict[str, str]:
    """Card label -> value text."""
    out = {}
    for card in root.iter("div"):
        if card.attrs.get("class") == "card":
            label, value = [node for node in card.iter("div")][:2]
            out[label.text().strip()] = value.text().strip()
    return out


def test_cards_leave_out_what_was_not_recorded(tmp_path):
    results, train, scores, _ = fake_run(with_flipped=False)
    for key in ("library_version", "created", "validation_accuracy", "wall_seconds"):
        del results[key]
    path = write_report(tmp_path / "r.html", results=results, train=train, scores=scores)
    raw = path.read_text(encoding="utf-8")
    assert "n/a" not in raw
    root = parse(path)
    assert set(cards(root)) == {"Task", "Training examples", "Methods"}
    assert "Mislabeled" not in root.text()  # no flipped labels: no hint about them
    header = next(root.iter("header")).text()
    assert "datainf" in header and "created" not in header

    results, train, scores, _ = fake_run()
    got = cards(parse(write_report(tmp_path / "full.html", results=results, train=train, scores=scores)))
    assert got["Created"] == "2026-11-29 18:00" and got["datainf version"] == "0.1.0"
    assert got["Validation accuracy"] == "80.0%" and got["Wall time"] == "5 min 00 s"
    assert got["Flipped labels"].startswith("8 ")
    assert "Mislabeled examples should rank near the top" in parse(tmp_path / "full.html").text()


def test_per_block_damping_is_summarized_with_the_table_collapsed(tmp_path):
    results, train, scores, _ = fake_run()
    damping = {f"layer.{i}.lora_B": value for i, value in enumerate((4e-3, 1e-3, 2e-2, 5e-4, 9e-3))}
    results["methods"]["exact"]["damping"] = damping
    results["methods"]["lissa"]["damping"] = {"layer.0.lora_B": 0.5}
    root = parse(write_report(tmp_path / "r.html", results=results, train=train, scores=scores))
    table = next(root.find_id("methods").iter("table"))
    head = header_cells(table)
    column = next(i for i, name in enumerate(head) if name.startswith("Damping"))
    rows = {row[0]: row for row in body_rows(table)}
    assert rows["exact"][column] == "min 5.00e-04 · median 4.00e-03 · max 2.00e-02 (5 blocks)"
    assert rows["lissa"][column] == "5.00e-01 (1 block)"
    assert rows["datainf"][column] == "paper rule per block"
    details = root.find_id("damping-blocks")
    assert details.tag == "details" and "open" not in details.attrs
    per_block = next(details.iter("table"))
    assert header_cells(per_block) == ["Block", "exact", "lissa"]
    got = {row[0]: row[1:] for row in body_rows(per_block)}
    assert list(got) == list(damping)
    assert [float(got[block][0]) for block in damping] == list(damping.values())
    assert got["layer.0.lora_B"][1] == "5.000e-01" and got["layer.1.lora_B"][1] == MISSING
    assert "{" not in table.text()  # no dict printed in a cell
