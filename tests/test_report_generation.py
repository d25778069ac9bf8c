"""`datainf report` on a causal LM run end to end (a tiny random Llama, LoRA, a training and a query store
with their records, `datainf score`), the HTML parsed back and checked against the scores tensor."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import re  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from cli_helpers import run_cli as cli  # noqa: E402
from cli_helpers import write_jsonl
from datainf.cli import main  # noqa: E402
from datainf.scoring import load_scores  # noqa: E402
from datainf.store import GradientStore  # noqa: E402
from test_report import Node, body_rows, header_cells, parse  # noqa: E402

K = 3
TRAIN = [
    {"prompt": "What is 2 plus 3 ?", "response": " 5"},
    {"prompt": "What is 4 plus 1 ?", "response": " 5"},
    {"prompt": "What is 7 minus 2 ?", "response": " 5"},
    {"prompt": "What is 3 times 3 ?", "response": " 9"},
    {"prompt": "What is 6 plus 2 ?", "response": " 8"},
    {"prompt": "What is 9 minus 1 ?", "response": " 8"},
    {"prompt": "What is 1 plus 1 ?", "response": " 2"},
    {"prompt": "What is 8 minus 6 ?", "response": " 2"},
]
QUERIES = [
    {"prompt": "What is 3 plus 2 ?", "response": " 5"},
    {"prompt": "What is 4 plus 4 ?", "response": " 8"},
    {"prompt": "What is 5 minus 3 ?", "response": " 2"},
]


@pytest.fixture(scope="module")
def tiny_lm(tiny_llama_dir):
    """A tiny Llama with LoRA, B initialised at random (so every block has a gradient), and its tokenizer."""
    from datainf.models.finetune import LoraSettings
    from datainf.models.llm import load_causal_lm

    lora = LoraSettings(rank=2, alpha=8, target_modules=("q_proj", "v_proj"), modules_to_save=())
    model, tok = load_causal_lm(tiny_llama_dir, lora, seed=0)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    return model, tok


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, tiny_lm):
    """Training and query stores of prompt/response records (kept in the stores), scored per query and
    against the mean query by `datainf score`."""
    from datainf.attributor import Attributor

    root = tmp_path_factory.mktemp("report-lm")
    model, tok = tiny_lm
    for records, store in ((TRAIN, "train-store"), (QUERIES, "query-store")):
        Attributor(model, task="causal_lm", store=root / store, tokenizer=tok, batch_size=4,
                   progress=False).fit(records)
    for extra, name in (([], "scores"), (["--mean-query"], "mean")):
        with pytest.raises(SystemExit) as e:
            main(["--quiet", "score", "--store", str(root / "train-store"), "--queries", str(root / "query-store"),
                  "--method", "datainf,identity", *extra, "--out", str(root / f"{name}.safetensors")])
        assert e.value.code == 0
    return root


def report(lm_run, capsys, scores="scores", extra=(), out="report.html"):
    path = lm_run / out
    code, _, err = cli(["report", "--scores", str(lm_run / f"{scores}.safetensors"), "--out", str(path),
                        "--top-k", str(K), *extra], capsys)
    assert code == 0, err
    return path


def open_tables(node: Node) -> list[tuple[str, Node]]:
    """(method, table) of every example table under ``node``: the first method's are open, each other
    method's sit in a <details> whose summary names it."""
    out = []
    method = next(h for h in node.iter("h3") if "method" in h.attrs.get("class", "")).text().strip()
    for child in node.iter():
        if child.tag == "details":
            method = next(child.iter("summary")).text().strip()
        if child.tag == "table" and "examples" in child.attrs.get("class", ""):
            out.append((method, child))
    return out


def expected_order(column: torch.Tensor, kind: str, k: int = K) -> list[int]:
    """The top-k training indices, computed independently of the report: sorted by (score, index), of the
    list's sign only (helpful: score < 0, harmful: score > 0)."""
    values = column.double().tolist()
    if kind == "helpful":
        return sorted((i for i in range(len(values)) if values[i] < 0), key=lambda i: (values[i], i))[:k]
    return sorted((i for i in range(len(values)) if values[i] > 0), key=lambda i: (-values[i], i))[:k]


def test_generation_report_per_query(lm_run, capsys):
    path = report(lm_run, capsys)
    raw = path.read_text(encoding="utf-8")
    root = parse(path)
    text = root.text()
    loaded = load_scores(lm_run / "scores.safetensors")
    assert set(loaded.scores) == {"datainf", "identity"} and loaded.scores["datainf"].shape == (8, 3)

    # never a placeholder, never "query 0", never the mislabeled-examples hint of a flipped-label run
    assert "n/a" not in raw.lower()
    assert not re.search(r"\bquery\s+\d", text, re.IGNORECASE)
    assert "mislabeled" not in text.lower()

    # the queries come first, each named by its prompt, with its prompt and response shown
    section_ids = [n.attrs["id"] for n in root.iter("section")]
    assert section_ids.index("queries") < section_ids.index("methods") < section_ids.index("settings")
    queries = root.find_id("queries")
    for j, query in enumerate(QUERIES):
        article = root.find_id(f"query-{j}")
        assert query["prompt"] in next(article.iter("h3")).text()
        shown = {n.attrs["class"].split()[-1]: n.text() for n in article.iter("pre")}
        assert shown == {"prompt": query["prompt"], "response": query["response"]}
        tables = open_tables(article)
        assert len(tables) == 4
        for (method, table), kind in zip(tables, ("helpful", "harmful") * 2):
            assert kind in table.text().lower()
            head = header_cells(table)
            assert head == ["Rank", "#", "Score", "Prompt", "Response"]  # no label column: the set has none
            rows = body_rows(table)
            want = expected_order(loaded.scores[method][:, j], kind)
            assert [int(r[1]) for r in rows] == want, (method, j, kind)
            assert [r[3] for r in rows] == [TRAIN[i]["prompt"] for i in want]
            assert [r[4] for r in rows] == [TRAIN[i]["response"].strip() for i in want]
            assert [float(r[2]) for r in rows] == pytest.approx(
                [float(loaded.scores[method][i, j]) for i in want], rel=5e-4)
        assert [m for m, _ in tables] == ["datainf", "datainf", "identity", "identity"]
    index = [li.text().strip() for li in next(queries.iter("ol")).iter("li")]
    assert index == [q["prompt"] for q in QUERIES]

    # the overall lists say they are over the mean query, and rank by the mean of the per-query scores
    helpful = root.find_id("helpful")
    heading = next(helpful.iter("h2")).text()
    assert "mean query" in heading and "averaged over the 3 queries" in heading
    method, table = open_tables(helpful)[0]
    assert method == "datainf"
    mean = loaded.scores["datainf"].double().mean(dim=1)
    assert [int(r[1]) for r in body_rows(table)] == expected_order(mean, "helpful")
    assert "mean query" in next(root.find_id("harmful").iter("h2")).text()

    # cards: what the stores and the scores recorded
    train_store = GradientStore.open(lm_run / "train-store")
    cards = {next(c.iter("div")).text().strip(): c.text() for c in root.iter("div")
             if c.attrs.get("class") == "card"}
    assert cards["Task"].startswith("Taskcausal_lm")
    assert "8" in cards["Training examples"] and "3" in cards["Queries"]
    assert train_store.fingerprints["model"] in cards["Model"]
    assert train_store.fingerprints["adapter"] in cards["Adapter"]
    assert "datainf, identity" in cards["Methods"]
    assert {"Created", "datainf version", "Scoring time"} <= set(cards)
    assert "Validation accuracy" not in cards and "Wall time" not in cards


def test_damping_summary_and_per_block_table(lm_run, capsys):
    root = parse(report(lm_run, capsys, out="damping.html"))
    loaded = load_scores(lm_run / "scores.safetensors")
    methods = root.find_id("methods")
    table = next(t for t in methods.iter("table") if "methods" in t.attrs.get("class", ""))
    head = header_cells(table)
    column = next(i for i, h in enumerate(head) if h.startswith("Damping"))
    rows = {r[0]: r for r in body_rows(table)}
    n_blocks = len(GradientStore.open(lm_run / "train-store").block_names)
    for method in ("datainf", "identity"):
        values = np.array(list(loaded.settings[method]["damping"].values()))
        assert len(values) == n_blocks and np.ptp(values) > 0
        cell = rows[method][column]
        numbers = [float(x) for x in re.findall(r"(?:min|median|max) ([0-9.e+-]+)", cell)]
        assert numbers == pytest.approx([values.min(), np.median(values), values.max()], rel=1e-2), cell
        assert f"{n_blocks} blocks" in cell and "{" not in cell
    details = root.find_id("damping-blocks")
    assert details is not None and details.tag == "details" and "open" not in details.attrs
    per_block = next(details.iter("table"))
    assert header_cells(per_block) == ["Block", "datainf", "identity"]
    got = {r[0]: r[1:] for r in body_rows(per_block)}
    for method_index, method in enumerate(("datainf", "identity")):
        for block, value in loaded.settings[method]["damping"].items():
            assert float(got[block][method_index]) == pytest.approx(value, rel=1e-3)
    assert set(got) == set(loaded.settings["datainf"]["damping"])


def test_mean_query_report(lm_run, capsys):
    path = report(lm_run, capsys, scores="mean", out="mean.html")
    root = parse(path)
    loaded = load_scores(lm_run / "mean.safetensors")
    assert loaded.scores["datainf"].shape == (8, 1)
    assert "n/a" not in path.read_text(encoding="utf-8").lower()
    queries = root.find_id("queries")
    assert "mean" in next(queries.iter("h2")).text()
    for j, query in enumerate(QUERIES):
        article = root.find_id(f"query-{j}")
        assert query["prompt"] in article.text() and query["response"] in article.text()
        assert not list(article.iter("table"))  # no per-query lists: the queries were scored as their mean
    for section, kind in (("helpful", "helpful"), ("harmful", "harmful")):
        node = root.find_id(section)
        heading = next(node.iter("h2")).text()
        assert "over the mean query" in heading and "mean gradient of the 3 queries" in heading
        for method, table in open_tables(node):
            assert [int(r[1]) for r in body_rows(table)] == expected_order(loaded.scores[method][:, 0], kind)


def test_labels_appear_only_when_the_data_has_them(lm_run, capsys):
    data = write_jsonl(lm_run / "train-labelled.jsonl",
                       [dict(r, label=f"sum-{r['response'].strip()}") for r in TRAIN])
    root = parse(report(lm_run, capsys, extra=["--data", str(data)], out="labelled.html"))
    table = open_tables(root.find_id("query-0"))[0][1]
    head = header_cells(table)
    assert head == ["Rank", "#", "Score", "Label", "Prompt", "Response"]
    for row in body_rows(table):
        assert row[3] == f"sum-{TRAIN[int(row[1])]['response'].strip()}"


def test_wrong_data_is_refused_and_nothing_is_written(lm_run, capsys):
    other = write_jsonl(lm_run / "other.jsonl", [{"prompt": f"Name a colour {i} ?", "response": " red"}
                                                 for i in range(len(TRAIN))])
    out = lm_run / "wrong.html"
    code, stdout, err = cli(["report", "--scores", str(lm_run / "scores.safetensors"), "--data", str(other),
                             "--out", str(out)], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "not the data" in lines[0], err
    assert not out.exists() and not list(lm_run.glob(".wrong.html*"))


def chat(*turns):
    roles = ("user", "assistant") * len(turns)
    return {"messages": [{"role": role, "content": text} for role, text in zip(roles, turns)]}


def test_chat_records_show_their_last_user_and_assistant_turns(tiny_lm, tmp_path, capsys):
    """Chat records (the SFT format) kept in the stores: the report shows each one's last user turn as the
    prompt and its last assistant turn as the response, and says when earlier turns are left out."""
    from datainf.attributor import Attributor
    from datainf.data.collate import TextCollator

    model, tok = tiny_lm
    base = TextCollator(tokenizer=tok, task="causal_lm")

    def collate(records):  # the word tokenizer has no chat template: join the turns as prompt + response
        return base([{"prompt": " ".join(m["content"] for m in r["messages"][:-1]),
                      "response": " " + r["messages"][-1]["content"]} for r in records])

    train = [chat(r["prompt"], r["response"].strip()) for r in TRAIN[:5]]
    train[2] = chat("What is 1 plus 1 ?", "2", TRAIN[2]["prompt"], TRAIN[2]["response"].strip())
    queries = [chat(QUERIES[0]["prompt"], QUERIES[0]["response"].strip())]
    for records, store in ((train, "train"), (queries, "queries")):
        Attributor(model, task="causal_lm", store=tmp_path / store, tokenizer=tok, collate=collate,
                   progress=False).fit(records)
    with pytest.raises(SystemExit) as e:
        main(["--quiet", "score", "--store", str(tmp_path / "train"), "--queries", str(tmp_path / "queries"),
              "--method", "identity", "--out", str(tmp_path / "s.safetensors")])
    assert e.value.code == 0
    code, _, err = cli(["report", "--scores", str(tmp_path / "s.safetensors"), "--out", str(tmp_path / "r.html"),
                        "--top-k", "5"], capsys)
    assert code == 0, err
    root = parse(tmp_path / "r.html")
    article = root.find_id("query-0")
    shown = {n.attrs["class"].split()[-1]: n.text() for n in article.iter("pre")}
    assert shown == {"prompt": QUERIES[0]["prompt"], "response": QUERIES[0]["response"].strip()}
    assert root.find_id("helpful") is None  # one query: its own lists are the only ones
    column = load_scores(tmp_path / "s.safetensors").scores["identity"][:, 0]
    table = open_tables(article)[0][1]
    rows = body_rows(table)
    assert [int(r[1]) for r in rows] == expected_order(column, "helpful", 5)
    for row in rows:
        i = int(row[1])
        prompt, response = TRAIN[i]["prompt"], TRAIN[i]["response"].strip()
        assert row[3] == (f"[last turn of 4 messages] {prompt}" if i == 2 else prompt)
        assert row[4] == response


SKILLS = ("add", "sub", "mul")


@pytest.fixture(scope="module")
def tagged_run(tmp_path_factory, tiny_lm):
    """Stores whose records carry extra columns (skill, source) and texts with markup in them, 30 queries (more
    than a page), scored per query by `datainf score`."""
    from datainf.attributor import Attributor
    from datainf.report.html import QUERIES_PER_PAGE

    root = tmp_path_factory.mktemp("report-tagged")
    model, tok = tiny_lm
    train = [dict(r, skill=SKILLS[i % 3], source=f"set-{i % 2}") for i, r in enumerate(TRAIN)]
    train[1]["prompt"] = "What is <b>4</b> & 'one' ?"
    n_query = QUERIES_PER_PAGE + 5
    queries = [{"prompt": f"What is {j} plus {j % 4} ? <i>q{j}</i>", "response": f" {j + j % 4}",
                "skill": SKILLS[j % 3]} for j in range(n_query)]
    for records, store in ((train, "train-store"), (queries, "query-store")):
        Attributor(model, task="causal_lm", store=root / store, tokenizer=tok, batch_size=8,
                   progress=False).fit(records)
    with pytest.raises(SystemExit) as e:
        main(["--quiet", "score", "--store", str(root / "train-store"), "--queries", str(root / "query-store"),
              "--method", "datainf,identity", "--out", str(root / "scores.safetensors")])
    assert e.value.code == 0
    return root, train, queries


def test_report_from_a_scores_file_shows_every_query_and_the_records_columns(tagged_run, capsys):
    """Every visible row checked against the scores file and the records, independently of the report code:
    each query (all 30, named by its prompt, with its skill), each method's helpful and harmful rows (indices
    by the sign-filtered order, scores formatted as +d.ddde+xx, prompts and responses as in the records,
    markup shown as text), and the skill and source columns."""
    from datainf.outputs import is_report

    root, train, queries = tagged_run
    path = report(root, capsys)
    raw = path.read_text(encoding="utf-8")
    assert is_report(path) and "<b>4</b>" not in raw and "<i>q" not in raw
    loaded = load_scores(root / "scores.safetensors")
    page = parse(path)
    section = page.find_id("queries")
    articles = list(section.iter("article"))
    assert len(articles) == len(queries)
    checked = 0
    for j, query in enumerate(queries):
        article = page.find_id(f"query-{j}")
        assert next(article.iter("h3")).text() == f"{j + 1}. {query['prompt']}"
        assert next(n for n in article.iter("p") if n.attrs.get("class") == "query-columns").text() == \
            f"skill: {query['skill']}"
        tables = open_tables(article)
        assert [m for m, _ in tables] == ["datainf", "datainf", "identity", "identity"]
        for (method, table), kind in zip(tables, ("helpful", "harmful") * 2):
            head = header_cells(table)
            assert head == ["Rank", "#", "Score", "skill", "source", "Prompt", "Response"]
            column = loaded.scores[method][:, j]
            want = expected_order(column, kind)
            rows = body_rows(table)
            assert [int(r[1]) for r in rows] == want, (method, j, kind)
            assert [r[2] for r in rows] == [f"{float(column[i]):+.3e}" for i in want]
            assert [(r[3], r[4], r[5], r[6]) for r in rows] == [
                (train[i]["skill"], train[i]["source"], train[i]["prompt"], train[i]["response"].strip())
                for i in want]
            checked += len(rows)
    assert checked > 0
    index = [a.text() for a in page.find_id("query-index").iter("a")]
    assert index == [q["prompt"] for q in queries]
