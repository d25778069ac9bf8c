"""The LLM identification experiment end to end on a tiny random Llama (no downloads), and its metrics
against an independent computation."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from datainf.data.generation import make_task  # noqa: E402
from datainf.errors import DataInfError  # noqa: E402
from datainf.experiments.llm_identification import (  # noqa: E402
    LLMIdentificationSettings,
    identification_metrics,
    run_llm_identification,
)
from datainf.models.finetune import LoraSettings, TrainSettings  # noqa: E402
from datainf.models.llm import load_causal_lm  # noqa: E402
from datainf.scoring import load_scores  # noqa: E402
from reference import FLOAT32_TOL, FLOAT64_TOL  # noqa: E402

METHODS = ("datainf", "identity", "exact", "lissa", "ekfac")  # the experiment's default


def _check_outputs(out, results, n_train, n_test, methods=METHODS):
    for name in ("results.json", "scores.safetensors", "train.jsonl", "test.jsonl", "report.html"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    assert saved["n_train"] == n_train and saved["n_test"] == n_test
    assert set(saved["methods"]) == set(methods)
    for m in methods:
        entry = saved["methods"][m]
        assert 0.0 <= entry["auc"] <= 1.0 and 0.0 <= entry["recall"] <= 1.0
        assert math.isfinite(entry["seconds"])
        assert len(saved["per_query"][m]["auc"]) == n_test
    if "exact" in methods:
        assert math.isfinite(saved["methods"]["datainf"]["pearson_with_exact"])
    loaded = load_scores(out / "scores.safetensors")
    for m in methods:
        assert loaded.scores[m].shape == (n_train, n_test) and bool(loaded.scores[m].isfinite().all())
    assert len(loaded.meta["train_labels"]) == n_train and len(loaded.meta["test_labels"]) == n_test
    assert (out / "store").is_dir()
    assert sum(1 for _ in (out / "train.jsonl").open()) == n_train
    assert results["methods"].keys() == saved["methods"].keys()


def test_run_llm_identification_on_a_tiny_llama(tiny_llama_dir, tmp_path):
    lora = LoraSettings(rank=2, alpha=8, target_modules=("q_proj", "v_proj"), modules_to_save=())
    model, tok = load_causal_lm(tiny_llama_dir, lora, seed=0)
    settings = LLMIdentificationSettings(task="sentences", classes=3, train_per_class=4, test_per_class=2,
                                         train=TrainSettings(epochs=1, batch_size=4), lissa_iterations=5,
                                         grad_batch_size=4)
    result = run_llm_identification(settings, tmp_path, progress=False, model=model, tokenizer=tok)
    _check_outputs(tmp_path, result.to_dict(), n_train=12, n_test=6)
    assert result.trainable_parameters == 2 * 2 * (2 * 32 + 2 * 32)  # layers x (q, v) x (A + B)
    assert math.isfinite(result.test_loss_before) and math.isfinite(result.test_loss_after)


def test_cli_command_runs_the_whole_pipeline(tiny_llama_dir, tmp_path):
    from datainf.cli import cli

    out = tmp_path / "out"
    args = ["--quiet", "experiment", "llm-identification", "--task", "math-reasoning", "--out", str(out),
            "--model", str(tiny_llama_dir), "--classes", "3", "--train-per-class", "3", "--test-per-class", "1",
            "--epochs", "1", "--rank", "2", "--alpha", "4", "--methods", "datainf,exact,identity",
            "--lissa-iterations", "3", "--device", "cpu", "--seed", "1"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "datainf" in result.output and "AUC" in result.output
    _check_outputs(out, None or json.loads((out / "results.json").read_text()), n_train=9, n_test=3,
                   methods=("datainf", "exact", "identity"))


def test_cli_bad_input_is_one_line(tiny_llama_dir, tmp_path):
    from datainf.cli import main

    for extra in (["--methods", "datainf,nope"], ["--load-in-8bit", "--model", str(tiny_llama_dir)],
                  ["--classes", "11", "--model", str(tiny_llama_dir)], ["--model", str(tmp_path)]):
        with pytest.raises(SystemExit) as exc:
            main(["--quiet", "experiment", "llm-identification", "--out", str(tmp_path / "o"), "--device", "cpu",
                  *extra])
        assert exc.value.code == 2, extra



def test_settings_hold_one_train_and_one_lora_settings_and_refuse_fields_the_fine_tune_ignores():
    """The fine-tune's fields live in one TrainSettings (defaults: the paper's), written nested into
    results.json's settings; the fields finetune_causal_lm has no use for are refused, not silently dropped."""
    from datainf.experiments.common import settings_dict

    settings = LLMIdentificationSettings()
    assert (settings.train.epochs, settings.train.learning_rate, settings.train.batch_size,
            settings.train.max_length) == (2, 1e-3, 8, 128)
    assert settings_dict(settings)["train"]["learning_rate"] == 1e-3 and "epochs" not in settings_dict(settings)
    for bad, word in ((TrainSettings(weight_decay=0.1), "train.weight_decay"),
                      (TrainSettings(head_learning_rate=1e-3), "train.head_learning_rate"),
                      (TrainSettings(length_buckets=True), "train.length_buckets")):
        with pytest.raises(DataInfError, match=word):
            LLMIdentificationSettings(train=bad)
    with pytest.raises(DataInfError, match="TrainSettings"):
        LLMIdentificationSettings(train={"epochs": 1})
    # the adapter's fields live in one LoraSettings the same way; a causal LM has no head to save
    assert settings.lora == LoraSettings(rank=8, alpha=32.0, dropout=0.05, target_modules=("q_proj", "v_proj"),
                                         modules_to_save=())
    assert settings_dict(settings)["lora"]["rank"] == 8 and "rank" not in settings_dict(settings)
    with pytest.raises(DataInfError, match="modules_to_save"):
        LLMIdentificationSettings(lora=LoraSettings())


# ---------------------------------------------------------------------------------------------- metrics
def _independent_metrics(scores, train_labels, query_labels):
    aucs, recalls = [], []
    for j, label in enumerate(query_labels):
        pos = (train_labels == label).astype(int)
        aucs.append(roc_auc_score(pos, -scores[:, j]))
        k = int(pos.sum())
        top = np.argsort(scores[:, j], kind="stable")[:k]  # most negative = most helpful first
        recalls.append(pos[top].sum() / k)
    return float(np.mean(aucs)), float(np.mean(recalls)), aucs, recalls


def test_identification_metrics_match_sklearn_and_a_sort():
    rng = np.random.default_rng(0)
    train_labels = np.repeat(np.arange(4), 7)
    query_labels = np.array([0, 1, 2, 3, 1, 0])
    # same-class examples get lower (more helpful) scores on average; continuous, so no ties
    scores = rng.normal(size=(28, 6)) - 1.5 * (train_labels[:, None] == query_labels[None, :])
    got = identification_metrics(scores, train_labels, query_labels)
    auc, recall, aucs, recalls = _independent_metrics(scores, train_labels, query_labels)
    assert got["auc"] == pytest.approx(auc, abs=1e-12)
    assert got["recall"] == pytest.approx(recall, abs=1e-12)
    np.testing.assert_allclose(got["auc_per_query"], aucs, atol=1e-12)
    np.testing.assert_allclose(got["recall_per_query"], recalls, atol=1e-12)


def test_identification_metrics_hand_made_cases():
    train_labels = np.array([0, 0, 1, 1, 2, 2])
    query_labels = np.array([0, 2])
    perfect = np.array([[-5.0, 1.0], [-4.0, 2.0], [1.0, 3.0], [2.0, 4.0], [3.0, -9.0], [4.0, -8.0]])
    got = identification_metrics(perfect, train_labels, query_labels)
    assert got["auc"] == 1.0 and got["recall"] == 1.0
    # query 0: its class ranked last by helpfulness -> AUC 0, recall 0; harmful is not helpful
    got = identification_metrics(-perfect, train_labels, query_labels)
    assert got["auc"] == 0.0 and got["recall"] == 0.0
    # one of the two same-class examples in the top 2 -> recall 1/2; it beats 4 of 4 and the other 2 of 4
    scores = np.array([[-5.0], [0.5], [-4.0], [1.0], [2.0], [0.0]])
    got = identification_metrics(scores, train_labels, np.array([0]))
    assert got["recall"] == 0.5 and got["auc"] == pytest.approx((4 + 2) / 8)
    with pytest.raises(DataInfError):
        identification_metrics(scores[:5], train_labels, np.array([0]))


# ------------------------------------------------------------------------------------------ datainf.llm
def test_finetune_lowers_the_response_loss_and_ignores_the_prompt(tiny_llama_dir):
    import torch.nn.functional as F

    from datainf.data.collate import TextCollator
    from datainf.models.llm import finetune_causal_lm, response_loss, response_nll

    lora = LoraSettings(rank=4, alpha=16, target_modules=("q_proj", "v_proj"), modules_to_save=())
    model, tok = load_causal_lm(tiny_llama_dir, lora, seed=0)
    records = [{"prompt": r["prompt"], "response": r["response"]} for r in make_task("math", classes=3, per_class=4)]
    # response_nll against a direct computation: each example alone, cross-entropy of its response tokens.
    # A float64 copy of the model, so both agree to float64 rounding (tests/reference.py); a prompt token
    # counted in the loss or a padded position is an O(1) error
    batch = TextCollator(tok, task="causal_lm", max_length=128)(records[:3])
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        total, n_tokens = response_nll(model64, batch)
        want, count = 0.0, 0
        for i in range(3):
            keep = batch["attention_mask"][i].bool()
            ids, labels = batch["input_ids"][i][keep], batch["labels"][i][keep]
            logits = model64(input_ids=ids[None]).logits[0]
            response = (labels != -100).nonzero().flatten()
            response = response[response > 0]
            want += float(F.cross_entropy(logits[response - 1], ids[response], reduction="sum"))
            count += len(response)
    assert n_tokens == count
    assert float(total) == pytest.approx(want, rel=FLOAT64_TOL)
    before = response_loss(model, tok, records)
    stats = finetune_causal_lm(model, tok, records, epochs=4, lr=1e-2, batch_size=4, progress=False)
    assert stats["steps"] == 12 and len(stats["losses"]) == 12
    assert response_loss(model, tok, records) < before
    assert not model.training


def test_two_processes_converting_smollm2_at_once_convert_it_once(tmp_path, monkeypatch):
    import threading
    import time

    import datainf.models.llm as llm

    monkeypatch.setenv("DATAINF_CACHE", str(tmp_path))
    conversions = []

    def slow_convert(target):  # stands in for the 20 s GGUF conversion; writes what _is_complete looks for
        conversions.append(target)
        time.sleep(0.5)
        target.mkdir()
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            (target / name).write_text("{}")

    monkeypatch.setattr(llm, "_convert_smollm2", slow_convert)
    got = []
    threads = [threading.Thread(target=lambda: got.append(llm.smollm2_dir())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    # the second caller waited on the cache lock and found the first one's folder complete
    assert got == [tmp_path / llm.SMOLLM2_NAME] * 2 and len(conversions) == 1


def test_smollm2_dir_never_trusts_an_incomplete_cache(tmp_path, monkeypatch):
    import datainf.models.llm as llm

    monkeypatch.setenv("DATAINF_CACHE", str(tmp_path))
    target = tmp_path / llm.SMOLLM2_NAME
    target.mkdir()
    (target / "config.json").write_text("{}")  # an interrupted conversion: no weights

    def no_gguf():
        raise DataInfError("no gguf here")

    monkeypatch.setattr(llm, "smollm2_gguf", no_gguf)
    with pytest.raises(DataInfError, match="no gguf"):
        llm.smollm2_dir()
    for name in ("model.safetensors", "tokenizer.json"):
        (target / name).write_text("x")
    assert llm.smollm2_dir() == target  # complete: used as is, no conversion
    with pytest.raises(DataInfError, match="no gguf"):
        llm.smollm2_dir(rebuild=True)


def test_paper_protocol_gradients_are_the_prompt_only_mean_lm_loss(tiny_llama_dir, tmp_path):
    """--protocol paper: every influence gradient is of the mean LM loss over the prompt's tokens, as the
    research code's LORAEngineGeneration computes it (labels = input_ids of the prompt alone). Checked against
    an independent single-example backward of Hugging Face's own loss on the tokenized prompt."""
    from datainf.store import GradientStore

    lora = LoraSettings(rank=2, alpha=8, target_modules=("q_proj", "v_proj"), modules_to_save=())
    model, tok = load_causal_lm(tiny_llama_dir, lora, seed=0)
    with torch.no_grad():  # make the EOS's NLL far from the other tokens' (a random model gives each ~log V)
        model.get_output_embeddings().weight[tok.eos_token_id] *= 300
    settings = LLMIdentificationSettings(task="math", classes=2, train_per_class=3, test_per_class=1,
                                         train=TrainSettings(epochs=1, batch_size=3), grad_batch_size=2,
                                         protocol="paper", normalize=True,
                                         methods=("datainf", "identity", "lissa"), lissa_iterations=3,
                                         variants=("identity:normalize",))
    result = run_llm_identification(settings, tmp_path, progress=False, model=model, tokenizer=tok)
    assert result.protocol == "paper" and set(result.methods) == {
        "datainf", "identity", "lissa", "datainf+normalized", "identity+normalized",  # lissa is not normalized
        "identity:normalize"}  # a variant row, named by its spec
    store = GradientStore.open(tmp_path / "store")
    assert store.manifest["meta"]["task"] == "causal_lm_mean"
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    model.eval()
    for i, record in enumerate(train):
        ids = torch.tensor([tok(record["prompt"])["input_ids"]])
        loss = model(input_ids=ids, labels=ids).loss  # the mean over the prompt's predicted tokens
        grads = torch.autograd.grad(loss, list(params.values()))
        for (name, _), g in zip(params.items(), grads):
            stored = store.block(name)[i].reshape(g.shape)
            scale = max(float(store.block(n)[i].abs().max()) for n in params)
            assert float((stored - g).abs().max()) <= FLOAT32_TOL * scale, (name, i)
    # the response NLL after fine-tuning, with and without the EOS this protocol never trains on, against
    # Hugging Face's own loss on each test prompt + response (labels only on the response's tokens)
    test = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    sums, counts = {"with": 0.0, "without": 0.0}, {"with": 0, "without": 0}
    with torch.no_grad():
        for record in test:
            prompt_ids = tok(record["prompt"])["input_ids"]
            ids = tok(record["prompt"] + record["response"])["input_ids"]
            assert ids[: len(prompt_ids)] == prompt_ids  # the prompt's tokens are a prefix here
            for kind, row in (("without", ids), ("with", ids + [tok.eos_token_id])):
                labels = [-100] * len(prompt_ids) + row[len(prompt_ids):]
                loss = model(input_ids=torch.tensor([row]), labels=torch.tensor([labels])).loss
                sums[kind] += float(loss) * (len(row) - len(prompt_ids))
                counts[kind] += len(row) - len(prompt_ids)
    assert counts["with"] == counts["without"] + len(test)
    eos_mean = (sums["with"] - sums["without"]) / len(test)
    assert abs(eos_mean - sums["without"] / counts["without"]) > 0.5  # so the two losses below differ
    for kind, value in (("with", result.test_response_loss_after),
                        ("without", result.test_response_loss_after_without_eos)):
        expected = sums[kind] / counts[kind]
        assert abs(value - expected) <= FLOAT32_TOL * max(1.0, expected), (kind, value, expected)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["test_response_loss_after_without_eos"] == result.test_response_loss_after_without_eos
    # normalized identity is minus the cosine of the stored gradients
    loaded = load_scores(tmp_path / "scores.safetensors")
    G = torch.cat([store.block(n)[0:6].double() for n in store.block_names], dim=1)
    assert float(loaded.scores["identity+normalized"].abs().max()) <= 1 + 1e-6
    assert G.shape[0] == 6
    # the variant row: identity / variant / ||g_k|| is the same number for every training row k (||v_j||)
    for row in ("identity:normalize", "identity+normalized"):
        v_norm = loaded.scores["identity"].double() / (loaded.scores[row].double() * G.norm(dim=1)[:, None])
        assert float((v_norm - v_norm[0]).abs().max()) <= 1e-4 * float(v_norm.abs().max()), row


# The sum over checkpoints (step 0 included, finetune's weights) is checked in tests/test_experiments_eval.py.
