"""The Attributor end to end on a tiny random BERT, checked against a loop of single-example backward calls.

The model runs in float64 and the store keeps float64 (``store_dtype="float64"``), so every comparison is
against a float64 reference at FLOAT64_TOL (tests/reference.py); a gradient stored in the wrong row, a
chunk recomputed from other data or a scoring path that drops the mean over queries is an O(1) error."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import pytest
import torch
from transformers import AutoTokenizer

import datainf
from datainf.attributor import Attributor
from datainf.data.assets import minilm_dir
from datainf.data.collate import TextCollator
from datainf.errors import DataInfError
from datainf.scoring import load_scores
from reference import assert_close_to, assert_per_example_close
from tiny_models import tiny_bert_classifier


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_dir())


def _model(seed=0):
    return tiny_bert_classifier(vocab_size=30522, seed=seed, lora_targets=("value",)).double()


F64 = {"store_dtype": "float64", "progress": False}


def _loop_gradients(model, tokenizer, records):
    """Independent reference: one forward and one backward per example, no hooks, no padding."""
    collate = TextCollator(tokenizer=tokenizer)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = {n: [] for n in params}
    model.eval()
    for r in records:
        batch = collate([r])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
        grads = torch.autograd.grad(loss, list(params.values()))
        for n, g in zip(params, grads):
            out[n].append(g.detach().clone())
    return {n: torch.stack(v) for n, v in out.items()}


def test_scores_match_loop_reference(tmp_path, tokenizer, sentence_records):
    model = _model()
    train, val = sentence_records[:9], sentence_records[9:]
    att = Attributor(model, task="classification", store=tmp_path / "s", tokenizer=tokenizer, batch_size=4,
                     chunk_size=4, **F64)
    store = att.fit(train)
    assert store.complete and store.n_examples == 9
    ref_train = _loop_gradients(model, tokenizer, train)
    ref_val = _loop_gradients(model, tokenizer, val)
    assert set(ref_train) == set(store.block_names)
    # float64 throughout: the damping of these untrained LoRA blocks is ~1e-9, where float32 would lose ~1e-4
    for method in ("datainf", "exact", "identity"):
        got = att.scores(val, method=method)
        assert got.dtype == torch.float64
        want = datainf.influence(ref_train, ref_val, method=method)
        assert_close_to(got, want, what=method)
        mean = att.scores(val, method=method, mean_query=True)
        assert_close_to(mean[:, 0], want.mean(1), what=f"{method}, mean query")
    selfs = att.self_influence(method="datainf")
    assert_close_to(selfs, datainf.self_influence(ref_train, method="datainf"), what="self-influence")
    # scores are saved next to the store, with what produced them
    saved = load_scores(tmp_path / "s" / "scores" / "influence-identity-mean.safetensors")
    assert torch.equal(saved.scores["identity"], mean)
    settings = saved.settings["identity"]
    assert settings["arguments"]["method"] == "identity" and settings["arguments"]["mean_query"] is True
    assert set(settings["damping"]) == set(store.block_names)
    assert saved.meta["train_store"]["fingerprints"] == store.fingerprints


def test_ekfac_uses_the_stores_curvature(tmp_path, tokenizer, sentence_records):
    from datainf.estimators.kfac import curvature_from_gradients

    model = _model()
    att = Attributor(model, store=tmp_path / "s", tokenizer=tokenizer, **F64)
    att.fit(sentence_records[:9])
    ref_train = _loop_gradients(model, tokenizer, sentence_records[:9])
    ref_val = _loop_gradients(model, tokenizer, sentence_records[9:])
    got = att.scores(sentence_records[9:], method="ekfac")
    want = datainf.influence(ref_train, ref_val, "ekfac", factors=curvature_from_gradients(ref_train))
    assert_close_to(got, want, what="ekfac")
    saved = tmp_path / "s" / "kfac.safetensors"
    stamp = saved.stat().st_mtime_ns
    att.scores(sentence_records[9:], method="kfac", save=False)
    assert saved.stat().st_mtime_ns == stamp  # computed once, then reused


def test_fit_resumes_without_recomputing(tmp_path, tokenizer, sentence_records):
    model = _model()
    calls = []

    class Failing(TextCollator):
        def __call__(self, records):
            calls.append(len(records))
            if fail_after[0] is not None and len(calls) > fail_after[0]:
                raise KeyboardInterrupt("simulated kill")
            return super().__call__(records)

    fail_after = [3]
    collate = Failing(tokenizer=tokenizer)
    att = Attributor(model, store=tmp_path / "s", collate=collate, batch_size=2, chunk_size=4, **F64)
    with pytest.raises(KeyboardInterrupt):
        att.fit(sentence_records)
    # chunk 0 (examples 0-3, two batches) is stored; the first batch of chunk 1 failed
    first = len(calls)
    fail_after[0] = None
    calls.clear()
    att.fit(sentence_records)
    # shape probe (1 example) + chunks 1 and 2 (examples 4-11) in batches of 2: chunk 0 was not recomputed
    assert calls == [1, 2, 2, 2, 2]
    assert first == 3 + 1
    ref = _loop_gradients(model, tokenizer, sentence_records)
    assert_per_example_close({name: att.store.load(name) for name in att.store.block_names}, ref)


def test_store_of_another_adapter_is_refused(tmp_path, tokenizer, sentence_records):
    Attributor(_model(seed=0), store=tmp_path / "s", tokenizer=tokenizer, progress=False).fit(sentence_records)
    with pytest.raises(DataInfError, match="adapter"):
        Attributor(_model(seed=5), store=tmp_path / "s", tokenizer=tokenizer, progress=False).fit(sentence_records)
    relabelled = [dict(r, label=1 - r["label"]) if i == 3 else r for i, r in enumerate(sentence_records)]
    with pytest.raises(DataInfError, match="dataset"):
        Attributor(_model(seed=0), store=tmp_path / "s", tokenizer=tokenizer, progress=False).fit(relabelled)
    with pytest.raises(DataInfError, match="number of examples"):
        Attributor(_model(seed=0), store=tmp_path / "s", tokenizer=tokenizer,
                   progress=False).fit(sentence_records[:-1])


def test_hf_dataset_and_top(tmp_path, tokenizer, sentence_records):
    import datasets

    model = _model()
    att = Attributor(model, store=tmp_path / "s", tokenizer=tokenizer, **F64)
    att.fit(datasets.Dataset.from_list(sentence_records))
    ref = _loop_gradients(model, tokenizer, sentence_records)
    assert_per_example_close({name: att.store.load(name) for name in att.store.block_names}, ref)
    scores = att.scores(sentence_records[:2], method="identity", save=False)
    rows = att.top(scores, k=3, queries=sentence_records[:2], method="identity")
    assert len(rows) == 2 * 2 * 3  # queries x (helpful, harmful) x k
    for j in range(2):
        order = torch.argsort(scores[:, j])
        helpful = [r for r in rows if r["query"] == f"query {j}" and r["kind"] == "helpful"]
        harmful = [r for r in rows if r["query"] == f"query {j}" and r["kind"] == "harmful"]
        assert [r["train_index"] for r in helpful] == order[:3].tolist()
        assert [r["train_index"] for r in harmful] == order.flip(0)[:3].tolist()
        for r in helpful + harmful:  # the texts of the store's own records, and the query's
            assert r["train_text"] == sentence_records[r["train_index"]]["text"]
            assert r["score"] == pytest.approx(float(scores[r["train_index"], j]), rel=1e-12)
            assert r["query_text"] == sentence_records[j]["text"] and r["rank"] in (1, 2, 3)


def test_empty_dataset_and_missing_store(tmp_path, tokenizer):
    att = Attributor(_model(), store=tmp_path / "s", tokenizer=tokenizer, progress=False)
    with pytest.raises(DataInfError, match="empty"):
        att.fit([])
    with pytest.raises(DataInfError, match="fit"):
        att.self_influence()
