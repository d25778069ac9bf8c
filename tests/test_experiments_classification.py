"""Smoke runs of the classification experiments on a tiny random BERT and a small local dataset.

They check the structure of the result files and that the metrics are finite, not their values; the metric
functions themselves are tested against sklearn/scipy in test_metrics.py.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json
import math

import numpy as np
import pytest

from datainf.cli import main

WORDS_POS = ["great", "wonderful", "moving", "brilliant", "funny", "sharp", "warm", "lovely"]
WORDS_NEG = ["dull", "boring", "tedious", "clumsy", "awful", "flat", "lifeless", "weak"]


@pytest.fixture(scope="module")
def local_data(tmp_path_factory):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        y = i % 2
        words = rng.choice(WORDS_POS if y else WORDS_NEG, size=4)
        rows.append({"text": "a " + " and ".join(words) + " film", "label": y})
    path = tmp_path_factory.mktemp("data") / "local.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(argv):
    with pytest.raises(SystemExit) as e:
        main(["--quiet", *argv])
    return e.value.code


def _finite(x):
    return x is not None and math.isfinite(x)


def test_approximation_and_mislabeled_grid(tiny_bert_dir, local_data, tmp_path):
    common = ["--out", str(tmp_path), "--model", str(tiny_bert_dir), "--datasets", str(local_data), "--ranks", "1,2",
              "--seeds", "0", "--targets", "value;query,value", "--n-train", "24", "--n-val", "8", "--epochs", "1",
              "--lissa-iterations", "5"]
    assert _run(["experiment", "approximation", *common]) == 0
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 4  # 2 ranks x 2 target sets x 1 seed
    mtimes = {p: (p / "results.json").stat().st_mtime_ns for p in runs}
    # the mislabeled table comes from the same cached runs: nothing is recomputed
    assert _run(["experiment", "mislabeled", *common]) == 0
    assert {p: (p / "results.json").stat().st_mtime_ns for p in runs} == mtimes
    approx = json.loads((tmp_path / "approximation.json").read_text())
    mis = json.loads((tmp_path / "mislabeled.json").read_text())
    assert set(approx) == {"pearson_with_exact", "spearman_with_exact"} and set(mis) == {"auc", "seconds"}
    for rows in list(approx.values()) + list(mis.values()):
        assert {r["method"] for r in rows} == {"datainf", "exact", "lissa", "identity", "kfac", "ekfac"}
        assert all(_finite(r["mean"]) for r in rows)
    exact_rows = [r for r in approx["pearson_with_exact"] if r["method"] == "exact"]
    assert all(abs(r["mean"] - 1) < 1e-9 for r in exact_rows)  # exact correlates perfectly with itself
    assert "| dataset | rank |" in (tmp_path / "approximation.md").read_text()
    assert (tmp_path / "approximation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for p in runs:
        res = json.loads((p / "results.json").read_text())
        assert 0 <= res["validation_accuracy"] <= 1 and not (p / "store").exists()
        diag = res["diagnostics"]["per_method"]
        assert set(diag) == {"datainf", "lissa", "kfac", "ekfac"}
        # a correlation, up to float64 rounding (K-FAC is exact on a rank-1 block: 1 + 2e-16 happens)
        assert all(abs(v["median_block_correlation_with_exact"]) <= 1 + 1e-12 for v in diag.values())
        assert 'id="diagnostics"' in (p / "report.html").read_text()


def test_selection(tiny_bert_dir, local_data, tmp_path):
    assert _run(["experiment", "selection", "--out", str(tmp_path), "--model", str(tiny_bert_dir), "--dataset",
                 str(local_data), "--n-train", "24", "--n-val", "8", "--epochs", "1", "--rank", "1",
                 "--methods", "datainf,identity"]) == 0
    res = json.loads((tmp_path / "selection.json").read_text())
    assert set(res["selections"]) == {"all data", "random", "datainf", "identity"}
    assert res["selections"]["all data"]["n"] == 24 and res["selections"]["datainf"]["n"] == round(0.7 * 24)
    assert all(0 <= r["validation_accuracy"] <= 1 for r in res["selections"].values())
    # retraining on all the data is the scores run's own fine-tune again (same recipe, head and seed): the same
    # validation accuracy, which a retrain with another head or learning rate would not give
    scores_run = json.loads((tmp_path / "scores-run" / "results.json").read_text())
    assert res["selections"]["all data"]["validation_accuracy"] == scores_run["validation_accuracy"]


def test_scaling(tmp_path):
    assert _run(["experiment", "scaling", "--out", str(tmp_path), "--n-values", "50,100,200", "--d-values",
                 "16,64", "--blocks", "2"]) == 0
    res = json.loads((tmp_path / "scaling.json").read_text())
    assert len(res["rows"]) == 4 * (3 + 2)
    assert all(_finite(v) for v in res["exponents"].values())
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_dataset_is_one_line(tmp_path, capsys):
    assert _run(["experiment", "mislabeled", "--out", str(tmp_path), "--datasets", "imdb", "--ranks", "1",
                 "--seeds", "0"]) == 2
    assert "unknown dataset 'imdb'" in capsys.readouterr().err


def test_runs_record_the_clean_and_majority_accuracy_and_flag_a_model_that_did_not_learn(tiny_bert_dir, local_data,
                                                                                      tmp_path):
    """clean_baseline trains the same set-up on the unflipped labels; the majority-class accuracy is that of
    the validation labels (computed here independently); a run within 2 points of it is flagged."""
    from datainf.experiments.classification import accuracy_table
    from datainf.experiments.mislabeled import MislabeledSettings, run_mislabeled

    rows = [json.loads(line) for line in local_data.read_text().splitlines()]
    train, val = rows[:24], rows[24:32]
    settings = MislabeledSettings(model_dir=str(tiny_bert_dir), n_train=24, n_val=8, epochs=1, methods=("identity",),
                                  clean_baseline=True, diagnose=False)
    result = run_mislabeled(settings, tmp_path, progress=False, records=(train, val))
    labels = [r["label"] for r in val]
    majority = max(labels.count(0), labels.count(1)) / len(labels)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["majority_accuracy"] == majority and 0 <= saved["clean_validation_accuracy"] <= 1
    assert saved["learned"] == (saved["validation_accuracy"] > majority + 0.02)
    table = accuracy_table([saved, dict(saved, learned=False)])
    flagged = 1 + (not saved["learned"])      # the copy is flagged; the run itself only if it did not learn
    assert f"{majority:.3f} ± 0.000" in table and "| 2 | " in table
    assert table.splitlines()[2].endswith(f"| {flagged} |")
    assert result.clean_validation_accuracy == saved["clean_validation_accuracy"]
