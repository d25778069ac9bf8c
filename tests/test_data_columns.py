"""Data columns of a queries file (e.g. skill) travel into `explain`'s answers: each Query read from the
file keeps its row's plain values under keys other than the format's columns, each Answer writes them in
the JSON (``columns``) and in every CSV row (``query_COLUMN``), read back here against the file's rows."""

from __future__ import annotations

import csv
import io

import torch

from cli_helpers import write_jsonl
from datainf.explaining import Answer, Checkpoint, Explanation, read_queries

ROWS = [{"prompt": "What is 2 plus 3 ?", "response": " 5", "system": "be brief", "skill": "add", "id": 7},
        {"prompt": "What is 9 minus 1 ?", "skill": "sub", "id": 8, "tags": ["not", "plain"]}]


def test_a_queries_files_data_columns_reach_the_answers_json_and_csv(tmp_path):
    from datainf.cli.explain import _write_csv  # the CSV writer of `explain --csv`

    path = write_jsonl(tmp_path / "queries.jsonl", ROWS)
    queries = read_queries(path)
    want = [{"skill": r["skill"], "id": r["id"]} for r in ROWS]  # prompt/response/system: the format; tags: a list
    assert [dict(q.columns) for q in queries] == want
    answers = [Answer(prompt=q.prompt, response=q.response or "(generated)", generated=q.response is None,
                      rows=[{"method": "identity", "query": f"query {j}", "kind": "helpful", "rank": 1,
                             "train_index": j, "score": -1.0, "train_skill": "add"}],
                      scores={"identity": torch.zeros(2)}, columns=dict(q.columns))
               for j, q in enumerate(queries)]
    explanation = Explanation(answers=answers, arguments={}, checkpoints=[Checkpoint("adapter", "store", 1.0)],
                              model="m", k=1, n_train=2)
    assert [a["columns"] for a in explanation.to_json()["answers"]] == want
    out = tmp_path / "answers.csv"
    _write_csv(out, explanation.csv_rows())
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [(r["query_skill"], int(r["query_id"]), r["train_skill"]) for r in rows] == [
        (w["skill"], w["id"], "add") for w in want]
