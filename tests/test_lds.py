"""LDS and LOO: the metric against scipy on hand-made data, and a smoke run on a tiny model (structure only)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from datainf.cli import main
from datainf.errors import DataInfError
from datainf.experiments import lds as lds_module


def test_lds_metric_matches_scipy():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(30, 4))
    masks = rng.random((25, 30)) < 0.5
    losses = masks @ scores + rng.normal(scale=0.5, size=(25, 4))  # a linear datamodel plus noise
    mean, per_query = lds_module.lds(scores, masks, losses)
    want = [spearmanr(masks.astype(float) @ scores[:, j], losses[:, j]).statistic for j in range(4)]
    np.testing.assert_allclose(per_query, want, rtol=1e-12)
    assert mean == pytest.approx(np.mean(want)) and mean > 0.5
    # scores with the wrong sign predict the opposite
    assert lds_module.lds(-scores, masks, losses)[0] == pytest.approx(-mean)


def test_lds_smoke_and_resume(tiny_bert_dir, tmp_path, sentence_records, monkeypatch):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sentence_records * 2))
    argv = ["--quiet", "experiment", "lds", "--out", str(tmp_path / "out"), "--model", str(tiny_bert_dir),
            "--dataset", str(data), "--n-train", "12", "--n-query", "4", "--epochs", "1", "--subsets", "3",
            "--loo-examples", "2", "--loo-seeds", "2", "--methods", "datainf,identity"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    res = json.loads((tmp_path / "out" / "lds.json").read_text())
    assert set(res["methods"]) == {"datainf", "identity"}
    for r in res["methods"].values():
        assert all(math.isfinite(r[k]) for k in ("lds", "loo_pearson", "loo_spearman", "seconds"))
    assert len(list((tmp_path / "out" / "subsets").glob("*.json"))) == 3
    assert len(list((tmp_path / "out" / "loo").glob("*.json"))) == 2 + 2 * 2
    # a rerun finds every retrain cached and trains nothing
    calls = []
    monkeypatch.setattr(lds_module.ClassifierTrainer, "fit", lambda *a, **k: calls.append(1))
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0 and calls == []


def test_lds_on_a_causal_lm_and_refuses_other_settings(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    argv = ["--quiet", "experiment", "lds", "--task", "math", "--out", str(out), "--model", str(tiny_llama_dir),
            "--classes", "3", "--n-train", "9", "--n-query", "3", "--rank", "2", "--epochs", "1", "--subsets", "3",
            "--loo-examples", "2", "--loo-seeds", "1", "--methods", "datainf,identity,exact", "--device", "cpu"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    res = json.loads((out / "lds.json").read_text())
    assert res["settings"]["task"] == "math" and res["settings"]["alpha"] == 32.0 and res["n_flipped"] == 0
    assert set(res["methods"]) == {"datainf", "identity", "exact"}
    for r in res["methods"].values():
        assert all(math.isfinite(r[k]) for k in ("lds", "loo_pearson", "loo_spearman", "seconds"))
    losses = [json.loads(p.read_text()) for p in sorted((out / "subsets").glob("*.json"))]
    assert len(losses) == 3 and all(len(q) == 3 and min(q) > 0 for q in losses)  # summed NLL per query
    # more subsets in the same folder: the cached retrains are reused, only the new one is trained
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "subsets").glob("*.json")}
    more = list(argv)
    more[more.index("--subsets") + 1] = "4"
    with pytest.raises(SystemExit) as e:
        main(more)
    assert e.value.code == 0
    after = {p.name: p.stat().st_mtime_ns for p in (out / "subsets").glob("*.json")}
    assert len(after) == 4 and all(after[name] == t for name, t in stamps.items())
    # the same folder with other training settings is refused in one line, before any training
    capsys.readouterr()
    calls = []
    monkeypatch.setattr(lds_module.CausalLMTrainer, "fit", lambda *a, **k: calls.append(1))
    other = list(argv)
    other[other.index("--epochs") + 1] = "2"
    with pytest.raises(SystemExit) as e:
        main(other)
    assert e.value.code == 2 and calls == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings (epochs)" in err[0]


def test_lds_settings_errors():
    with pytest.raises(DataInfError, match="multiples of --classes"):
        lds_module.LdsSettings(task="sentences", n_train=25, n_query=10)
    with pytest.raises(DataInfError, match="unknown --task"):
        lds_module.LdsSettings(task="poetry")
    s = lds_module.LdsSettings(task="sentences", n_train=20, n_query=10)
    assert (s.rank, s.alpha, s.learning_rate, s.batch_size) == (8, 32.0, 1e-3, 8)
    c = lds_module.LdsSettings()
    assert (c.rank, c.alpha, c.epochs, c.learning_rate) == (4, 4.0, 4, 3e-3)


def test_lds_variant_rows_are_cached_by_name_and_score_what_their_spec_says(tiny_bert_dir, tmp_path,
                                                                            sentence_records, monkeypatch):
    """`--variant identity:normalize` adds a row whose scores are the identity row's divided by both gradients'
    norms (checked against the stored training gradients' norms: the ratio identity / variant / ||g_k|| is one
    number per query, ||v_j||); its LDS is scipy's Spearman of its subset sums; a rerun reuses the cached
    variant and trains nothing; a bad spec is refused before anything is trained."""
    from scipy.stats import spearmanr

    from datainf.store import GradientStore

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sentence_records * 2))
    out = tmp_path / "out"
    argv = ["--quiet", "experiment", "lds", "--out", str(out), "--model", str(tiny_bert_dir), "--dataset", str(data),
            "--n-train", "12", "--n-query", "4", "--epochs", "1", "--subsets", "3", "--loo-examples", "0",
            "--methods", "identity"]
    with pytest.raises(SystemExit) as e:
        main([*argv, "--variant", "identity:normalize"])
    assert e.value.code == 0
    res = json.loads((out / "lds.json").read_text())
    assert set(res["methods"]) == {"identity", "identity:normalize"}
    plain = torch.tensor(json.loads((out / "scores.json").read_text())["identity"], dtype=torch.float64)
    cosine = torch.tensor(json.loads((out / "scores-variants.json").read_text())["identity:normalize"],
                          dtype=torch.float64)
    store = GradientStore.open(out / "variants" / "store")
    g_norm = torch.cat([store.load(n, dtype=torch.float64).reshape(12, -1) for n in store.blocks()], dim=1).norm(dim=1)
    v_norm = plain / (cosine * g_norm[:, None])  # (12, 4): every row the same ||v_j||
    assert float((v_norm - v_norm[0]).abs().max()) <= 1e-5 * float(v_norm.abs().max())
    masks = lds_module.subset_masks(lds_module.LdsSettings(n_train=12, n_query=4, subsets=3, loo_examples=0), 12)
    losses = [json.loads((out / "subsets" / f"{i:04d}.json").read_text()) for i in range(3)]
    want = sum(spearmanr(masks.astype(float) @ cosine[:, j].numpy(), [r[j] for r in losses]).statistic
               for j in range(4)) / 4
    assert res["methods"]["identity:normalize"]["lds"] == pytest.approx(want, abs=1e-12)
    calls = []
    monkeypatch.setattr(lds_module.ClassifierTrainer, "fit", lambda *a, **k: calls.append(1))
    with pytest.raises(SystemExit) as e:
        main([*argv, "--variant", "identity:normalize"])
    assert e.value.code == 0 and calls == []
    with pytest.raises(SystemExit) as e:
        main([*argv, "--variant", "identity:bogus=1"])
    assert e.value.code == 2 and calls == []
