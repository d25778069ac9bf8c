"""Issue 33, readers that keep the text (defects 2, 3 and 10b).

* Every data format the reader accepts (JSON Lines, JSON arrays, CSV, TSV, parquet, a ``save_to_disk``
  folder) gives back exactly the texts a library-independent writer (json, csv, pyarrow, datasets) put in
  the file, whatever the characters: line breaks inside quoted CSV fields, U+2028 / U+2029 / U+0085 and the
  other characters ``str.splitlines`` breaks at. The store's own records come back as they were written.
  (There is no one-text-per-line format, so no restriction applies.)
* The same end to end, through ``datainf finetune`` / ``grads`` / ``store verify``.
* Deeply nested JSON in any JSON file the library reads is one ``error:`` line naming the file, exit 2,
  never a RecursionError's traceback, and nothing on disk changed.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cli_helpers import (  # noqa: E402
    hashes,
    refused,
    run_cli,  # noqa: E402
)
from datainf.data.tables import read_table  # noqa: E402
from datainf.data.text import load_lm_records, load_records  # noqa: E402
from datainf.errors import DataInfError  # noqa: E402
from datainf.store import GradientStore  # noqa: E402

#: the characters a reader that splits lines on more than "\n" (str.splitlines) or parses CSV line by line breaks
BREAKERS = ["\n", "\r\n", "\r", "\u2028", "\u2029", "\x85", "\x1c", "\x1d", "\x1e", "\v", "\f"]
#: and the characters that CSV / TSV / JSON must quote or escape
SPECIAL = ['"', "'", ",", "\t", "\\", " ", "\x00", "\ufeff", "é", "日本", "🙂"]

texts = st.lists(st.sampled_from(BREAKERS + SPECIAL) | st.text(max_size=6), max_size=8).map("".join)
#: rows of a prompt/response file: two arbitrary texts each
rows_strategy = st.lists(st.tuples(texts, texts), min_size=1, max_size=4)
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def write_csv(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    """The csv module's own writer (on a file opened with newline="", as its documentation asks)."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_data(path: Path, rows: list[dict], kind: str) -> Path:
    """``rows`` written to ``path`` by a writer that is not the library's, in format ``kind``."""
    if kind in ("csv", "tsv"):
        return write_csv(path, rows, "\t" if kind == "tsv" else ",")
    if kind in ("jsonl", "jsonl-crlf", "jsonl-in-.json"):
        end = "\r\n" if kind == "jsonl-crlf" else "\n"
        path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + end for r in rows).encode("utf-8"))
        return path
    if kind == "json":
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
        return path
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
        return path
    if kind == "save_to_disk":
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(path))
        return path
    raise AssertionError(kind)


SUFFIX = {"csv": ".csv", "tsv": ".tsv", "jsonl": ".jsonl", "jsonl-crlf": ".jsonl", "jsonl-in-.json": ".json",
          "json": ".json", "parquet": ".parquet", "save_to_disk": ""}


def check_round_trip(kind: str, pairs: list[tuple[str, str]]) -> None:
    rows = [{"prompt": p, "response": r, "id": str(i)} for i, (p, r) in enumerate(pairs)]
    with tempfile.TemporaryDirectory() as tmp:
        path = write_data(Path(tmp) / f"data{SUFFIX[kind]}", rows, kind)
        got, columns = read_table(path)
        assert columns == ["prompt", "response", "id"]
        assert got == rows
        records = load_lm_records(path, format="prompt-response")
        assert records == [{"prompt": p, "response": r} for p, r in pairs]
        assert [r["text"] for r in load_records(path, text_column="prompt", label_column=None)] == [p for p, _ in pairs]


# --------------------------------------------------------------------------------------------------
# defects 2 and 3: every format, and the store's records, keep every character
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl", "jsonl-crlf", "jsonl-in-.json", "json"])
@FAST
@given(pairs=rows_strategy)
def test_every_text_format_gives_back_the_texts_written(kind, pairs):
    """CSV / TSV (quoted fields with line breaks of every kind), JSON Lines (a raw U+2028 inside a string is
    valid JSON), JSON arrays: read_table, load_records and load_lm_records give back exactly the texts."""
    check_round_trip(kind, pairs)


@pytest.mark.parametrize("kind", ["parquet", "save_to_disk"])
@SLOW
@given(pairs=rows_strategy)
def test_parquet_and_saved_datasets_give_back_the_texts_written(kind, pairs):
    check_round_trip(kind, pairs)


def test_the_issue_examples_by_hand(tmp_path):
    """The issue's own cases, without Hypothesis: a multi-line review in a CSV, and a JSONL row with a raw
    U+2028 (refused as "not valid JSON" before)."""
    path = tmp_path / "d.csv"
    path.write_bytes(b'text,label\n"a multi\nline review",pos\n"cr\r\nlf",neg\n')
    assert [r["text"] for r in read_table(path)[0]] == ["a multi\nline review", "cr\r\nlf"]
    path = tmp_path / "d.jsonl"
    path.write_bytes('{"text": "one\u2028two\x85three", "label": 1}\n'.encode())
    assert read_table(path)[0] == [{"text": "one\u2028two\x85three", "label": 1}]


def test_a_malformed_csv_row_is_named_by_its_line(tmp_path):
    """A field the csv module cannot take (over its size limit) is one error naming the file's line, not a
    traceback; the line counts the line breaks inside the quoted fields before it."""
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"two\nlines",1\n' + "x" * (csv.field_size_limit() + 1) + ",0\n", encoding="utf-8")
    with pytest.raises(DataInfError, match=r"d\.csv: line 4 cannot be read as CSV"):
        read_table(path)


#: a tiny store: one block, 3 rows a chunk (the records ride along)
def _store_with_records(path: Path, records: list[dict]) -> GradientStore:
    n = len(records)
    fps = {"model": "m" * 16, "adapter": "a" * 16, "task": "t" * 16, "dataset": "d" * 16}
    with GradientStore.create(path, blocks={"w": (2,)}, n_examples=n, fingerprints=fps, chunk_size=3) as store:
        for i in store.missing_chunks():
            rows = store.chunk_rows(i)
            store.write_chunk(i, {"w": torch.arange(2 * len(rows), dtype=torch.float32).reshape(len(rows), 2) + 1})
        store.write_records(records)
        store.finalize()
    return GradientStore.open(path)


@FAST
@given(items=st.lists(st.tuples(texts, texts), min_size=1, max_size=5))
def test_the_store_gives_back_the_records_written(items):
    """Records written through the store's writer come back identical through its reader (and verify agrees),
    whatever the characters, in the values and in the keys."""
    records = [{"text": a, "label": i, b or "empty": [a, {"x": b}]} for i, (a, b) in enumerate(items)]
    with tempfile.TemporaryDirectory() as tmp:
        store = _store_with_records(Path(tmp) / "s", records)
        assert store.records() == records
        assert store.verify() == []
        # and any line reader splitting on everything str.splitlines splits on still sees one record a line
        assert len((Path(tmp) / "s" / "records.jsonl").read_text(encoding="utf-8").splitlines()) == len(records)


def test_a_store_written_before_keeps_its_u2028_records_readable(tmp_path):
    """A records.jsonl of an earlier version (raw U+2028 / U+0085, ensure_ascii=False) reads back too: the reader
    splits on "\\n" only."""
    records = [{"text": "one\u2028two"}, {"text": "three\x85four\u2029"}]
    store = _store_with_records(tmp_path / "s", [{"text": ""}] * 2)
    raw = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    (tmp_path / "s" / "records.jsonl").write_bytes(raw)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    manifest["records"] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    assert GradientStore.open(store.path).records() == records


# --------------------------------------------------------------------------------------------------
# end to end through the CLI
# --------------------------------------------------------------------------------------------------

REVIEWS = [
    ("a multi\nline review", "pos"), ("boring from\r\nstart to finish", "neg"), ("warm\u2028and funny", "pos"),
    ('she said "no"\rand left', "neg"), ("next\x85line, really", "pos"), ("tab\there\u2029para", "neg"),
    ("an absolute delight", "pos"), ("painfully bad acting", "neg"),
]


@pytest.fixture(scope="module")
def flow(tmp_path_factory, tiny_bert_dir):
    """An adapter fine-tuned on plain sentences (JSON Lines) and a store of them, both made by the CLI."""
    from cli_helpers import write_jsonl
    from conftest import SENTENCES
    from datainf.cli import main

    root = tmp_path_factory.mktemp("readers")
    data = write_jsonl(root / "train.jsonl", [{"text": t, "label": ["neg", "pos"][y]} for t, y in SENTENCES])
    model = ["--model", str(tiny_bert_dir)]
    for argv in (["finetune", *model, "--train", str(data), "--out", str(root / "adapter"), "--epochs", "1",
                  "--batch-size", "4", "--device", "cpu"],
                 ["grads", *model, "--adapter", str(root / "adapter"), "--data", str(data), "--store",
                  str(root / "store"), "--chunk-size", "4"]):
        with pytest.raises(SystemExit) as e:
            main(["--quiet", *argv])
        assert e.value.code == 0, argv[0]
    return root


def test_grads_and_finetune_keep_the_line_breaks_of_a_csv(flow, tiny_bert_dir, tmp_path, capsys):
    """Issue 33 defect 2: a CSV of reviews with line breaks inside quoted fields (\\n, \\r\\n, \\r, U+2028, ...):
    the store `grads` makes holds each review exactly as the csv module wrote it, and `store verify` passes on
    it; `finetune` reads the same file (exit 0)."""
    data = write_csv(tmp_path / "reviews.csv", [{"text": t, "label": y} for t, y in REVIEWS])
    model = ["--model", str(tiny_bert_dir)]
    code, _, err = run_cli(["grads", *model, "--adapter", str(flow / "adapter"), "--data", str(data), "--store",
                            str(tmp_path / "store"), "--chunk-size", "3"], capsys)
    assert code == 0, err
    records = GradientStore.open(tmp_path / "store").records()
    assert [r["text"] for r in records] == [t for t, _ in REVIEWS]
    code, _, err = run_cli(["store", "verify", str(tmp_path / "store")], capsys)
    assert code == 0, err
    code, _, err = run_cli(["finetune", *model, "--train", str(data), "--out", str(tmp_path / "adapter"), "--epochs",
                            "1", "--batch-size", "4", "--device", "cpu"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("kind", ["json", "parquet"])
def test_a_store_made_from_a_json_array_or_parquet_reads_back(flow, tiny_bert_dir, tmp_path, kind, capsys):
    """Issue 33 defect 3: texts with U+2028 / U+2029 / U+0085 given through a JSON array or parquet made a store
    that could not read its own records.jsonl (verify, top, report, explain failed)."""
    root = flow
    rows = [{"text": t, "label": y} for t, y in REVIEWS]
    data = write_data(tmp_path / f"d.{kind}", rows, kind)
    code, _, err = run_cli(["grads", "--model", str(tiny_bert_dir), "--adapter", str(root / "adapter"), "--data",
                            str(data), "--store", str(tmp_path / "store")], capsys)
    assert code == 0, err
    code, _, err = run_cli(["store", "verify", str(tmp_path / "store")], capsys)
    assert code == 0, err
    assert [r["text"] for r in GradientStore.open(tmp_path / "store").records()] == [t for t, _ in REVIEWS]


# --------------------------------------------------------------------------------------------------
# defect 10b: deeply nested JSON is one error line naming the file
# --------------------------------------------------------------------------------------------------

DEEP = "[" * 100000 + "]" * 100000


def test_deeply_nested_data_row(flow, tiny_bert_dir, tmp_path, capsys):
    """A data row of JSON nested 100000 deep: `grads` names the file and line (JSONL), or the file (a JSON
    array); the CSV cell of chat turns names its row and column."""
    root = flow
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "fine", "label": 0}\n{"text": "deep", "label": ' + DEEP + "}\n")
    array = tmp_path / "d.json"
    array.write_text('[{"text": "fine", "label": 0}, {"text": "deep", "label": ' + DEEP + "}]")
    before = hashes(tmp_path, root / "adapter")
    for data, where in ((jsonl, f"{jsonl}: line 2"), (array, str(array))):
        refused(["grads", "--model", str(tiny_bert_dir), "--adapter", str(root / "adapter"), "--data", str(data),
                 "--store", str(tmp_path / "store")], capsys, where, "nested too deeply")
    assert hashes(tmp_path, root / "adapter") == before and not (tmp_path / "store").exists()
    chat = write_csv(tmp_path / "chat.csv", [{"messages": "[" * 60000 + "]" * 60000}])  # within csv's field limit
    with pytest.raises(DataInfError, match=r"chat\.csv: row 0, column 'messages' must be a list"):
        load_lm_records(chat)


def test_deeply_nested_manifest(flow, tmp_path, capsys):
    """A store whose manifest.json is nested 100000 deep: `store verify` and `top` name the manifest."""
    root = flow
    store = shutil.copytree(root / "store", tmp_path / "store")
    (store / "manifest.json").write_text(DEEP)
    before = hashes(tmp_path)
    refused(["store", "verify", str(store)], capsys, f"store {store}: manifest.json", "nested too deeply")
    assert hashes(tmp_path) == before


def test_deeply_nested_model_and_adapter_configs(flow, tiny_bert_dir, tmp_path, capsys):
    """A model folder's config.json or an adapter's adapter_config.json nested 100000 deep: `grads` names the
    file (config.json was a RecursionError's traceback; adapter_config.json blamed the model's fit)."""
    root = flow
    model = shutil.copytree(tiny_bert_dir, tmp_path / "model")
    adapter = shutil.copytree(root / "adapter", tmp_path / "adapter")
    (model / "config.json").write_text(DEEP)
    (adapter / "adapter_config.json").write_text(DEEP)
    data = root / "train.jsonl"
    before = hashes(tmp_path, data)
    refused(["grads", "--model", str(model), "--adapter", str(root / "adapter"), "--data", str(data), "--store",
             str(tmp_path / "s1")], capsys, str(model / "config.json"), "nested too deeply")
    refused(["grads", "--model", str(tiny_bert_dir), "--adapter", str(adapter), "--data", str(data), "--store",
             str(tmp_path / "s2")], capsys, str(adapter / "adapter_config.json"), "nested too deeply")
    assert hashes(tmp_path, data) == before


def test_deeply_nested_trainer_state(tmp_path, capsys):
    """A checkpoint folder whose trainer_state.json is nested 100000 deep: explain's learning-rate weights name
    that file (before any model is loaded)."""
    fps = {"model": "m" * 16, "adapter": "a" * 16, "task": "t" * 16, "dataset": "d" * 16}
    for name in ("s1", "s2"):
        with GradientStore.create(tmp_path / name, blocks={"w": (2,)}, n_examples=2, fingerprints=fps,
                                  meta={"task": "causal_lm"}) as store:
            store.write_chunk(0, {"w": torch.ones(2, 2)})
            store.finalize()
    first, second = tmp_path / "checkpoint-2", tmp_path / "checkpoint-4"
    first.mkdir(), second.mkdir(), (tmp_path / "model").mkdir()
    (first / "datainf_checkpoint.json").write_text(json.dumps({"step": 2, "learning_rate": 0.01}))
    (second / "trainer_state.json").write_text(DEEP)
    before = hashes(tmp_path)
    refused(["explain", "--model", str(tmp_path / "model"), "--adapter", str(first), "--store", str(tmp_path / "s1"),
             "--adapter", str(second), "--store", str(tmp_path / "s2"), "--prompt", "hi"], capsys,
            str(second / "trainer_state.json"), "nested too deeply")
    assert hashes(tmp_path) == before


def test_deeply_nested_scores_file(tmp_path, capsys):
    """A .safetensors scores file whose datainf metadata is nested 100000 deep: `top` and `report` name it."""
    from safetensors.torch import save_file

    scores = tmp_path / "scores.safetensors"
    save_file({"datainf": torch.zeros(3)}, str(scores), metadata={"datainf": DEEP})
    before = hashes(tmp_path)
    refused(["top", "--scores", str(scores)], capsys, str(scores), "nested too deeply")
    refused(["report", "--scores", str(scores), "--out", str(tmp_path / "r.html")], capsys, str(scores),
            "nested too deeply")
    assert hashes(tmp_path) == before


def test_every_json_reader_names_the_file_for_deep_json(tmp_path):
    """The library's other JSON readers (adapter_config.json, a datainf_head.json, a legacy .npz scores file's
    settings, a conversation file) refuse deep nesting with the file's name, as a DataInfError."""
    import numpy as np

    from datainf.cli.explain import read_conversation
    from datainf.data.tables import read_json_object
    from datainf.scoring import load_scores

    deep = tmp_path / "adapter_config.json"
    deep.write_text(DEEP)
    with pytest.raises(DataInfError, match="adapter_config.json holds JSON nested too deeply"):
        read_json_object(deep)
    with pytest.raises(DataInfError, match="adapter_config.json holds JSON nested too deeply"):
        read_conversation(str(deep))
    np.savez(tmp_path / "old.npz", datainf=np.zeros(3))
    (tmp_path / "old.json").write_text(DEEP)
    with pytest.warns(DeprecationWarning), pytest.raises(DataInfError, match=r"old\.json holds JSON nested too"):
        load_scores(tmp_path / "old.npz")
