"""Smoke runs of the classification experiments on a tiny random BERT and a small local dataset.

They check the structure of the result files and that the metrics are finite, not their values; the metric
functions themselves are tested against sklearn/scipy in test_metrics.py.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json
import math
import threading
from dataclasses import replace

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


def test_selection_grid(tiny_bert_dir, local_data, tmp_path, monkeypatch):
    from datainf.experiments import classification
    from datainf.experiments.classification import grid_cells, retrain_on
    from datainf.experiments.mislabeled import MislabeledSettings, noisy_split
    from datainf.scoring import load_scores

    common = ["--out", str(tmp_path), "--model", str(tiny_bert_dir), "--datasets", str(local_data), "--ranks", "1",
              "--seeds", "0", "--targets", "value", "--n-train", "24", "--n-val", "8", "--epochs", "1",
              "--lissa-iterations", "5", "--no-clean-baseline"]
    # the selection grid reads the mislabeled grid's own runs: scored once, not again
    assert _run(["experiment", "mislabeled", *common, "--methods", "datainf,identity,exact"]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    scored_at = (run_dir / "results.json").stat().st_mtime_ns
    assert _run(["experiment", "selection", *common, "--methods", "datainf,identity"]) == 0
    assert (run_dir / "results.json").stat().st_mtime_ns == scored_at
    run = json.loads((run_dir / "results.json").read_text())
    res = json.loads((run_dir / "selection.json").read_text())
    assert set(res["selections"]) == {"all data", "random", "datainf", "identity"}
    n_train = len((run_dir / "train.jsonl").read_text().splitlines())
    n_keep = round(0.7 * n_train)
    assert res["n_keep"] == n_keep and res["selections"]["all data"]["n"] == n_train
    # each method keeps its n_keep lowest (most helpful) scores, recomputed here from the scores file
    train = [json.loads(line) for line in (run_dir / "train.jsonl").read_text().splitlines()]
    for method in ("datainf", "identity"):
        s = load_scores(run_dir / "scores.safetensors").scores[method][:, 0].double().numpy()
        kept = res["selections"][method]["kept"]
        assert len(kept) == n_keep and s[kept].max() <= np.delete(s, kept).min()
        assert res["selections"][method]["flipped_kept"] == sum(train[i]["flipped"] for i in kept)
    assert len(set(res["selections"]["random"]["kept"])) == n_keep
    # "all data" is the run's own model, not a retrain: retraining on everything with the run's recipe must
    # give the same model, to the validation loss (a retrain with another head, learning rate or seed would not)
    ((settings, _),) = grid_cells(MislabeledSettings(model_dir=str(tiny_bert_dir), n_train=24, n_val=8, epochs=1,
                                                     pooling="mean", head_learning_rate=1e-2, length_buckets=True),
                                  [str(local_data)], [1], [0], tmp_path, [("value",)])
    records = classification.load_dataset_records(str(local_data), 24, 8, 0)
    tr, val, num_labels = noisy_split(settings, records)
    assert [r["label"] for r in tr] == [r["label"] for r in train]  # the same noisy split the run scored
    all_idx = np.arange(len(tr))
    again_all = retrain_on(settings, tr, val, num_labels, all_idx, False)
    assert again_all["accuracy"] == run["validation_accuracy"] and again_all["loss"] == run["validation_loss"]
    assert res["selections"]["all data"]["validation_accuracy"] == run["validation_accuracy"]
    assert "| dataset | rank |" in (tmp_path / "selection.md").read_text()

    # a rerun reuses the cached selections; a method the run scored but no selection kept retrains only its own
    retrained = []
    monkeypatch.setattr(classification, "retrain_on", lambda *a, **k: retrained.append(a[4]) or {"accuracy": 0.5})
    assert _run(["experiment", "selection", *common, "--methods", "datainf,identity"]) == 0
    assert retrained == []
    assert _run(["experiment", "selection", *common, "--methods", "datainf,exact"]) == 0
    assert len(retrained) == 1
    again = json.loads((run_dir / "selection.json").read_text())
    assert again["selections"]["datainf"] == res["selections"]["datainf"] and "exact" in again["selections"]
    # another --keep on the same folder is refused, and selection.json is left as it was
    saved = (run_dir / "selection.json").read_bytes()
    assert _run(["experiment", "selection", *common, "--methods", "datainf", "--keep", "0.5"]) == 2
    assert (run_dir / "selection.json").read_bytes() == saved
    # a selection made from an earlier results.json of this folder (the run redone since) is refused, not reused
    results_text = (run_dir / "results.json").read_text()
    (run_dir / "results.json").write_text(json.dumps({**run, "created": "2000-01-01T00:00:00"}))
    assert _run(["experiment", "selection", *common, "--methods", "datainf"]) == 2
    assert (run_dir / "selection.json").read_bytes() == saved
    (run_dir / "results.json").write_text(results_text)

    # while another process holds the run's lock, a grid waits, then reuses the run that process wrote
    made = []
    monkeypatch.setattr(classification, "run_mislabeled", lambda *a, **k: made.append(a) or pytest.fail("ran twice"))
    cell = replace(settings, lissa_iterations=5, clean_baseline=False, methods=("datainf", "identity", "exact"))
    (run_dir / "results.json").unlink()
    got = []
    with classification.run_lock(run_dir):
        waiting = threading.Thread(target=lambda: got.append(classification.grid_run(cell, run_dir, False)))
        waiting.start()
        waiting.join(timeout=1.0)
        assert waiting.is_alive() and not got  # blocked on the lock, not running the experiment
        (run_dir / "results.json").write_text(results_text)  # the other process finishes its run
    waiting.join(timeout=30)
    assert got == [run] and made == []


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
    assert list(tmp_path.iterdir()) == []  # refused before any run folder was made
    # an empty --ranks (or --seeds, --datasets, --targets) is one error line too, not an empty summary
    assert _run(["experiment", "selection", "--out", str(tmp_path / "g"), "--ranks", ",", "--seeds", "0"]) == 2
    assert "--ranks is empty" in capsys.readouterr().err and not (tmp_path / "g").exists()


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


def test_mislabeled_variant_rows_score_their_spec_and_reach_the_table(tiny_bert_dir, local_data, tmp_path):
    """A variant row (`variants`, as the demo adds the classifier's mean-query default) is scored on the same
    fine-tune: `identity:normalize` is the identity row divided by both gradients' norms (checked with the stored
    training gradients' norms: identity / variant / ||g_k|| is one number, ||v||); its AUC is the one its scores
    give; the printed table has the row; a variant naming a plain method is that method's row already."""
    import torch

    from datainf.experiments.mislabeled import MislabeledSettings, format_table, run_mislabeled
    from datainf.metrics import roc_auc
    from datainf.scoring import load_scores
    from datainf.store import GradientStore

    rows = [json.loads(line) for line in local_data.read_text().splitlines()]
    settings = MislabeledSettings(model_dir=str(tiny_bert_dir), n_train=24, n_val=8, epochs=1, methods=("identity",),
                                  variants=("identity:normalize", "identity"), diagnose=False)
    assert settings.variants == ("identity:normalize",)
    result = run_mislabeled(settings, tmp_path, progress=False, records=(rows[:24], rows[24:32]))
    assert set(result.methods) == {"identity", "identity:normalize"}
    scores = load_scores(tmp_path / "scores.safetensors").scores
    store = GradientStore.open(tmp_path / "store")
    g_norm = torch.cat([store.load(n, dtype=torch.float64).reshape(24, -1) for n in store.block_names], 1).norm(dim=1)
    got = scores["identity:normalize"].double()[:, 0]
    v_norm = scores["identity"].double()[:, 0] / (got * g_norm)
    assert float((v_norm - v_norm[0]).abs().max()) <= 1e-5 * float(v_norm.abs().max())
    flipped = [json.loads(line)["flipped"] for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert result.methods["identity:normalize"].auc == pytest.approx(roc_auc(got.numpy(), flipped), abs=1e-6)
    assert "identity:normalize" in format_table(result)
