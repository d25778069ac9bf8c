"""Issue 17, "Nothing lost, nothing wrongly trusted": one test (or a few) per defect a hostile test of the CLI
and the store found, on a tiny random BERT with LoRA. Each reproduces the defect's input and asserts the
refusal (one `error:` line, exit status 2, the message) and that nothing on disk changed (every file of the
folders involved hashed before and after), or, where the defect was a wrong success, the right result.

Store-level checks (each corruption by the library, the lock race between writers) are in test_store.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from cli_helpers import (  # noqa: E402
    hashes,
    refused,
    write_jsonl,  # noqa: E402
)
from cli_helpers import run_cli as run  # noqa: E402
from datainf.cli import main  # noqa: E402
from datainf.errors import DataInfError  # noqa: E402
from datainf.scoring import load_scores  # noqa: E402
from datainf.store import GradientStore  # noqa: E402

# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def inodes(store: Path) -> dict[str, tuple[int, int]]:
    """chunk file ("00001/b0000.npy") -> (inode, mtime): which chunk files a run rewrote."""
    return {str(p.relative_to(store / "chunks")): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted((store / "chunks").rglob("*")) if p.is_file() and not p.parent.name.startswith(".")}


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------------------------------
# the flow every test starts from: finetune (string labels) -> grads (train, validation) -> score
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rel(tmp_path_factory, tiny_bert_dir):
    from conftest import SENTENCES

    root = tmp_path_factory.mktemp("reliability")
    names = {0: "neg", 1: "pos"}
    train = write_jsonl(root / "train.jsonl", [{"text": t, "label": names[y], "flipped": i % 5 == 0}
                                               for i, (t, y) in enumerate(SENTENCES)])
    # a validation file that holds only "pos": it must get the training mapping's id (1), not its own (0)
    val = write_jsonl(root / "val.jsonl", [{"text": t, "label": "pos"} for t, y in SENTENCES[:6] if y == 1])
    outputs = {}
    model = ["--model", str(tiny_bert_dir)]
    for key, argv in {
        "finetune": ["finetune", *model, "--train", str(train), "--out", str(root / "adapter"), "--epochs", "1",
                     "--batch-size", "4", "--device", "cpu"],
        "grads": ["grads", *model, "--adapter", str(root / "adapter"), "--data", str(train), "--store",
                  str(root / "train-store"), "--chunk-size", "4", "--batch-size", "3"],
        "grads-val": ["grads", *model, "--adapter", str(root / "adapter"), "--data", str(val), "--store",
                      str(root / "val-store")],
        "score": ["score", "--store", str(root / "train-store"), "--queries", str(root / "val-store"), "--method",
                  "datainf,identity", "--out", str(root / "scores.safetensors")],
    }.items():
        with pytest.raises(SystemExit) as e:
            main(["--quiet", *argv])
        assert e.value.code == 0, (key, e.value.code)
        outputs[key] = e
    # an adapter from elsewhere (no datainf_finetune.json) and another adapter (other weights), for pairing
    foreign = copy(root / "adapter", root / "foreign-adapter")
    (foreign / "datainf_finetune.json").unlink()
    other = copy(root / "adapter", root / "other-adapter")
    from safetensors.torch import load_file, save_file

    weights = load_file(str(other / "adapter_model.safetensors"))
    key = next(k for k in weights if "lora_B" in k)
    weights[key] = weights[key] + 0.05
    save_file(weights, str(other / "adapter_model.safetensors"))
    return root, train, val


def grads_argv(tiny_bert_dir, adapter: Path, data: Path, store: Path, *extra: str) -> list[str]:
    return ["grads", "--model", str(tiny_bert_dir), "--adapter", str(adapter), "--data", str(data), "--store",
            str(store), "--chunk-size", "4", "--batch-size", "3", *extra]


# --------------------------------------------------------------------------------------------------
# 1. finetune --out deleted whatever folder it was given (its notes, or the base model itself)
# --------------------------------------------------------------------------------------------------


def test_1_finetune_never_deletes_a_folder_it_did_not_write(rel, tiny_bert_dir, tmp_path, capsys):
    _, train, _ = rel
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "ideas.txt").write_text("my notes")
    model = copy(tiny_bert_dir, tmp_path / "model")
    before = hashes(notes, model)
    base = ["finetune", "--train", str(train), "--epochs", "1", "--device", "cpu"]
    refused([*base, "--model", str(model), "--out", str(notes)], capsys,
            "holds ideas.txt, which `datainf finetune` does not write")
    refused([*base, "--model", str(model), "--out", str(model)], capsys, f"--out {model} is the model folder")
    refused([*base, "--model", str(model), "--out", str(model / "adapter")], capsys, "lies inside the model folder")
    assert hashes(notes, model) == before


# --------------------------------------------------------------------------------------------------
# 2. a classification store could never be resumed: PEFT's re-initialized original_module was fingerprinted
# --------------------------------------------------------------------------------------------------

_FINGERPRINT = """
import json, sys
from datainf.cli.common import load_model
from datainf.store import fingerprint_model
model, _ = load_model(sys.argv[1], sys.argv[2], "classification", None, "cpu")
print(json.dumps(fingerprint_model(model)))
"""


def test_2_the_same_adapter_has_the_same_fingerprint_in_fresh_processes(rel, tiny_bert_dir):
    root, _, _ = rel
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

    def fingerprint(adapter: Path) -> dict[str, str]:
        proc = subprocess.run([sys.executable, "-c", _FINGERPRINT, str(tiny_bert_dir), str(adapter)],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    first, second = fingerprint(root / "adapter"), fingerprint(root / "adapter")
    other = fingerprint(root / "other-adapter")
    assert first == second
    assert other["adapter"] != first["adapter"] and other["model"] == first["model"]
    assert GradientStore.open(root / "train-store").fingerprints["adapter"] == first["adapter"]


def test_2_a_classification_store_reruns_and_resumes_from_the_cli(rel, tiny_bert_dir, tmp_path, capsys):
    root, train, _ = rel
    store = copy(root / "train-store", tmp_path / "store")
    argv = grads_argv(tiny_bert_dir, root / "adapter", train, store)
    before, ids = hashes(store), inodes(store)
    code, _, err = run(argv, capsys)  # a rerun on a finished store: nothing to do
    assert code == 0, err
    assert hashes(store) == before and inodes(store) == ids
    shutil.rmtree(store / "chunks" / "00001")  # what a kill -9 before chunk 1 was renamed into place leaves
    manifest = json.loads((store / "manifest.json").read_text())
    (store / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    code, _, err = run(argv, capsys)
    assert code == 0, err
    after = inodes(store)
    assert {k: v for k, v in after.items() if not k.startswith("00001")} == \
        {k: v for k, v in ids.items() if not k.startswith("00001")}  # chunks 0 and 2 were not rewritten
    assert hashes(store) == before  # chunk 1 recomputed to the same bytes


# --------------------------------------------------------------------------------------------------
# 3. shards had no integrity check: wrong scores with exit 0, raw ValueError, "aborted" (exit 130)
# --------------------------------------------------------------------------------------------------


def _overwrite(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[-8:] = np.array([3.0, -7.0], dtype=np.float32).tobytes()
    file.write_bytes(bytes(data))


def _swap(a: Path, b: Path) -> None:
    a.rename(a.with_name("swap"))
    b.rename(a)
    a.with_name("swap").rename(b)


def _edit(store: Path, **changes) -> None:
    manifest = json.loads((store / "manifest.json").read_text())
    (store / "manifest.json").write_text(json.dumps({**manifest, **changes}))


#: corruption -> (how, the words of verify's message, whether scoring reads the damaged file)
CORRUPTIONS = {
    "overwritten values": (lambda s: _overwrite(s / "chunks/00001/b0000.npy"),
                           "chunk 1 (chunks/00001) b0000.npy does not match its sha256 checksum", True),
    "swapped chunk folders": (lambda s: _swap(s / "chunks/00000", s / "chunks/00001"),
                              "chunk 0 (chunks/00000) holds chunk 1 (examples 4..7), not chunk 0", True),
    "edited n_examples": (lambda s: _edit(s, n_examples=11),
                          "chunk 2 holds examples 8..11, but manifest.json (n_examples=11, chunk_size=4) puts "
                          "examples 8..10 in it", True),
    "truncated shard": (lambda s: (s / "chunks/00002/b0001.npy").write_bytes(
        (s / "chunks/00002/b0001.npy").read_bytes()[:100]), "chunk 2 (chunks/00002) b0001.npy has 100 bytes", True),
    "zero-byte shard": (lambda s: (s / "chunks/00000/b0002.npy").write_bytes(b""),
                        "chunk 0 (chunks/00000) b0002.npy has 0 bytes", True),
    "bad sq_norms": (lambda s: _overwrite(s / "chunks/00001/sq_norms.npy"),
                     "chunk 1 (chunks/00001) sq_norms.npy does not match its sha256 checksum", True),
}
# (every corruption is now read by scoring: since the streaming reads, scores use the stored squared norms
# instead of recomputing them, so a damaged sq_norms.npy is refused by `score` too)


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_3_every_corruption_is_refused_by_verify_and_by_score(case, rel, tmp_path, capsys):
    root, _, _ = rel
    store = copy(root / "train-store", tmp_path / "store")
    corrupt, words, scored = CORRUPTIONS[case]
    corrupt(store)
    before = hashes(store)
    line = refused(["store", "verify", str(store)], capsys, words)
    assert "rerun `datainf grads`" in line or "new --store" in line, line
    out = tmp_path / "scores.safetensors"
    score = ["score", "--store", str(store), "--self", "--method", "identity", "--out", str(out)]
    if scored:
        refused(score, capsys, words.split(" (")[0] if case == "edited n_examples" else words)
    else:  # scoring does not read the damaged file: the scores are right
        assert run(score, capsys)[0] == 0
        out.unlink()
    if case == "bad sq_norms":  # the store's own norms are refused
        with pytest.raises(DataInfError, match="sq_norms.npy does not match its sha256 checksum"):
            GradientStore.open(store).sq_norms()
    assert hashes(store) == before and not out.exists()
    code, stdout, err = run(["store", "verify", str(root / "train-store")], capsys)
    assert code == 0 and "ok (12 examples, 3 chunks" in stdout, err


@pytest.mark.parametrize("case", ["overwritten values", "swapped chunk folders", "zero-byte shard"])
def test_3_rerunning_grads_recomputes_just_the_bad_chunks(case, rel, tiny_bert_dir, tmp_path, capsys):
    root, train, _ = rel
    good = root / "train-store"
    store = copy(good, tmp_path / "store")
    corrupt, _, _ = CORRUPTIONS[case]
    corrupt(store)
    bad = {"overwritten values": {1}, "swapped chunk folders": {0, 1}, "zero-byte shard": {0}}[case]
    ids = inodes(store)
    code, _, err = run(grads_argv(tiny_bert_dir, root / "adapter", train, store), capsys)
    assert code == 0, err
    after = inodes(store)
    for name, ident in ids.items():
        if int(name[:5]) not in bad:
            assert after[name] == ident, name  # the good chunks were kept as they were
    set_aside = sorted(p.name[:14] for p in (store / "chunks").glob(".corrupt-*"))
    assert set_aside == sorted(f".corrupt-{i:05d}" for i in bad)  # moved aside, never deleted
    for i in range(3):  # every chunk now equals the uncorrupted store's
        for f in (good / "chunks" / f"{i:05d}").iterdir():
            assert f.read_bytes() == (store / "chunks" / f"{i:05d}" / f.name).read_bytes()
    assert run(["store", "verify", str(store)], capsys)[0] == 0


# --------------------------------------------------------------------------------------------------
# 4. mismatches went unnoticed: stores of other adapters scored together; report took any data file
# --------------------------------------------------------------------------------------------------


def test_4_score_refuses_a_query_store_of_another_adapter(rel, tiny_bert_dir, tmp_path, capsys):
    root, _, val = rel
    other = tmp_path / "other-val"
    assert run(grads_argv(tiny_bert_dir, root / "other-adapter", val, other), capsys)[0] == 0
    out = tmp_path / "scores.safetensors"
    before = hashes(root / "train-store", other)
    refused(["score", "--store", str(root / "train-store"), "--queries", str(other), "--out", str(out)], capsys,
            "was made with a different adapter")
    assert not out.exists() and hashes(root / "train-store", other) == before
    code, _, err = run(["score", "--store", str(root / "train-store"), "--queries", str(other), "--allow-mismatch",
                        "--method", "identity", "--out", str(out)], capsys)
    assert code == 0 and "differ in adapter" in err
    assert load_scores(out).meta["allow_mismatch"] is True


def test_4_report_and_top_refuse_data_that_is_not_the_stores(rel, tmp_path, capsys):
    root, train, _ = rel
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    shuffled = write_jsonl(tmp_path / "shuffled.jsonl", rows[1:] + rows[:1])  # same rows, other order
    scores = root / "scores.safetensors"
    out = tmp_path / "report.html"
    before = hashes(shuffled, scores)
    refused(["report", "--scores", str(scores), "--data", str(shuffled), "--out", str(out)], capsys,
            "is not the data the scores' training store was made from")
    refused(["top", "--scores", str(scores), "--data", str(shuffled), "--out", str(tmp_path / "top.jsonl")], capsys,
            "is not the data the scores' training store was made from")
    assert hashes(shuffled, scores) == before and list(tmp_path.iterdir()) == [shuffled]
    code, _, err = run(["report", "--scores", str(scores), "--data", str(train), "--out", str(out)], capsys)
    assert code == 0, err


# --------------------------------------------------------------------------------------------------
# 5. labels were remapped per file; fractions and lists became class ids; {0, 1, 7} made an 8-class head
# --------------------------------------------------------------------------------------------------


def test_5_one_label_mapping_for_the_run(rel, tiny_bert_dir, tmp_path, capsys):
    root, train, val = rel
    marker = json.loads((root / "adapter" / "datainf_finetune.json").read_text())
    assert marker["label_names"] == ["neg", "pos"] and marker["num_labels"] == 2
    for store in ("train-store", "val-store"):
        labels = GradientStore.open(root / store).manifest["meta"]["labels"]
        assert labels == {"names": ["neg", "pos"], "num_labels": 2}
    assert {r["label"] for r in GradientStore.open(root / "val-store").records()} == {1}  # "pos" is 1, as in training
    # an adapter from elsewhere carries no mapping: the validation file alone would map "pos" to 0 ...
    alone = tmp_path / "val-alone"
    code, out, err = run(grads_argv(tiny_bert_dir, root / "foreign-adapter", val, alone), capsys)
    assert code == 0 and "labels 0=pos" in out, err
    scores = tmp_path / "scores.safetensors"
    before = hashes(root / "train-store", alone)
    refused(["score", "--store", str(root / "train-store"), "--queries", str(alone), "--out", str(scores)], capsys,
            "reads class names as 0=pos but the training store")
    assert hashes(root / "train-store", alone) == before and not scores.exists()
    # ... and --labels-from the training store reads it with the training mapping
    mapped = tmp_path / "val-mapped"
    code, out, err = run(grads_argv(tiny_bert_dir, root / "foreign-adapter", val, mapped, "--labels-from",
                                    str(root / "train-store")), capsys)
    assert code == 0 and "labels 0=neg, 1=pos, from the training store" in out, err
    assert {r["label"] for r in GradientStore.open(mapped).records()} == {1}


@pytest.mark.parametrize("labels, adapter, words", [
    ([0, 1, 1.5, 0], "adapter", "row 2 has label 1.5 (float) in column 'label', which is neither a whole class id nor "
                                "a class name"),
    ([0, [1], 1, 0], "adapter", "row 1 has label [1] (list)"),
    ([0, True, 1, 0], "adapter", "row 1 has label True (bool)"),
    # without a mapping from the adapter, the file's own labels must be of one kind
    ([0, 2, 10, "unknown"], "foreign-adapter", "mixes class ids and class names (row 0 has 0, row 3 has 'unknown')"),
    # with the adapter's mapping, a name it lacks is refused
    (["neg", "pos", "meh", "pos"], "adapter", "row 2 has label 'meh', which is not one of the run's class names "
                                              "(0=neg, 1=pos"),
])
def test_5_labels_that_are_not_class_ids_are_refused_by_row(labels, adapter, words, rel, tiny_bert_dir, tmp_path,
                                                            capsys):
    root, _, _ = rel
    data = write_jsonl(tmp_path / "data.jsonl", [{"text": f"text {i}", "label": y} for i, y in enumerate(labels)])
    store = tmp_path / "store"
    refused(grads_argv(tiny_bert_dir, root / adapter, data, store), capsys, words)
    assert not store.exists()


@pytest.mark.parametrize("label, words", [(1.5, "training example 3 has label 1.5; classification needs an "
                                                  "integer class id"),
                                           ([1], "training example 3 has label [1]"),
                                           (7, "training example 3 has label 7, but the classifier has 2 classes")])
def test_5_the_attributor_refuses_labels_that_are_no_class_before_writing(label, words, tmp_path):
    from datainf import Attributor
    from tiny_models import tiny_bert_classifier

    records = [{"input_ids": [1, 5, 6, 9], "label": np.int64(i % 2)} for i in range(6)]  # numpy ids are ids
    records[3]["label"] = label
    store = tmp_path / "store"
    attributor = Attributor(tiny_bert_classifier(), store=store, chunk_size=2, progress=False)
    with pytest.raises(DataInfError, match=words.replace("[", "\\[").replace("]", "\\]")):
        attributor.fit(records)
    assert not store.exists()
    records[3]["label"] = 1.0  # a whole number is that class
    assert attributor.fit(records).n_examples == 6


def test_5_finetune_refuses_label_ids_with_gaps(tiny_bert_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": f"text {i}", "label": y}
                                                   for i, y in enumerate([0, 1, 7, 0, 1, 7])])
    out = tmp_path / "adapter"
    refused(["finetune", "--model", str(tiny_bert_dir), "--train", str(data), "--out", str(out), "--device", "cpu"],
            capsys, "so ids 2, 3, 4, 5, 6 never occur and the classifier would get a 8-class head; relabel them 0..2, "
                    "or pass --num-labels 8")
    assert not out.exists()
    code, stdout, err = run(["finetune", "--model", str(tiny_bert_dir), "--train", str(data), "--out", str(out),
                             "--num-labels", "8", "--epochs", "1", "--device", "cpu"], capsys)
    assert code == 0 and "8 classes" in stdout, err
    assert json.loads((out / "datainf_finetune.json").read_text())["num_labels"] == 8


# --------------------------------------------------------------------------------------------------
# 6. a non-finite loss was stored as if fine: NaN logits gave a zero gradient, an infinite loss a finite one
# --------------------------------------------------------------------------------------------------

POISON = 7  # a token id: the examples holding it get a NaN or infinite loss


def _poisoned_task(kind: str):
    def loss(model, batch):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits
        poisoned = (batch["input_ids"] == POISON).any(dim=1)[:, None]
        if kind == "nan":  # masked: autograd routes no gradient to the NaN, so the gradient is exactly zero
            logits = torch.where(poisoned, torch.full_like(logits, float("nan")), logits)
        else:  # the true class's logit at -inf: the loss is inf, its gradient finite
            true = torch.nn.functional.one_hot(batch["labels"], logits.shape[1]).bool()
            logits = torch.where(poisoned & true, torch.full_like(logits, float("-inf")), logits)
        return torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")

    return loss


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_6_a_non_finite_loss_is_refused_by_index_or_dropped_and_recorded(kind, tmp_path):
    from datainf import Attributor
    from tiny_models import tiny_bert_classifier

    def data(bad: int) -> list[dict]:
        return [{"input_ids": [1, 5, 6, 9] if i != bad else [1, POISON, 6, 9], "label": i % 2} for i in range(10)]

    model = tiny_bert_classifier()

    def attributor(store: Path, **options):
        return Attributor(model, task=_poisoned_task(kind), store=store, chunk_size=4, batch_size=3, progress=False,
                          **options)

    store = tmp_path / "store"
    with pytest.raises(DataInfError, match=f"example 2 of the data has a non-finite loss \\({kind}\\)") as err:
        attributor(store).fit(data(2))
    assert "--skip-nonfinite" in str(err.value) and "\n" not in str(err.value)
    assert not store.exists()  # refused in its first chunk: nothing left behind
    with pytest.raises(DataInfError, match=f"example 5 of the data has a non-finite loss \\({kind}\\)"):
        attributor(store).fit(data(5))
    partial = GradientStore.open(store, allow_incomplete=True)  # refused in chunk 1: chunk 0 is kept, resumable
    assert partial.missing_chunks() == [1, 2] and not partial.complete
    shutil.rmtree(store)
    records = data(5)
    fitted = attributor(store, skip_nonfinite=True).fit(records)
    assert fitted.n_examples == 9
    assert fitted.manifest["meta"]["nonfinite"] == {"policy": "skip", "dropped": [{"row": 5, "loss": kind}],
                                                    "source_rows": 10}
    kept = [r for i, r in enumerate(records) if i != 5]
    assert fitted.records() == kept
    clean = Attributor(model, task=_poisoned_task(kind), store=tmp_path / "clean", chunk_size=4, batch_size=3,
                       progress=False).fit(kept)
    for name in clean.block_names:  # the other examples' gradients are those of a run without the bad one
        assert torch.equal(clean.load(name), fitted.load(name))


def test_6_cli_nonfinite_loss_then_skip_nonfinite(rel, tiny_bert_dir, tmp_path, capsys):
    """A base model whose embedding of one word is NaN: every example with that word has a NaN loss."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from conftest import SENTENCES

    root, train, _ = rel
    model = copy(tiny_bert_dir, tmp_path / "nan-model")
    token = AutoTokenizer.from_pretrained(str(model)).convert_tokens_to_ids("plot")  # only in row 5
    weights = load_file(str(model / "model.safetensors"))
    key = next(k for k in weights if k.endswith("word_embeddings.weight"))
    weights[key][token] = float("nan")
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    store = tmp_path / "store"
    refused(grads_argv(model, root / "adapter", train, store, "--chunk-size", "8"), capsys,
            "example 5 of the data has a non-finite loss (nan): its gradient would be stored as if it were fine")
    assert not store.exists()  # refused in its first chunk: nothing written
    code, out, err = run(grads_argv(model, root / "adapter", train, store, "--skip-nonfinite"), capsys)
    assert code == 0 and "dropped 1 examples with a non-finite loss: rows 5" in out, err
    assert GradientStore.open(store).manifest["meta"]["nonfinite"]["dropped"] == [{"row": 5, "loss": "nan"}]
    scores = tmp_path / "self.safetensors"
    assert run(["score", "--store", str(store), "--self", "--method", "identity", "--out", str(scores)], capsys)[0] == 0
    code, _, err = run(["report", "--scores", str(scores), "--data", str(train), "--out",
                        str(tmp_path / "report.html")], capsys)  # the original file: row 5 is left out for it
    assert code == 0, err
    code, out, err = run(["top", "--scores", str(scores), "--data", str(train), "--k", "11"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out.strip().splitlines()]
    values = load_scores(scores).scores["identity"]  # k = n: each example once, in the list of its sign
    assert "the plot makes no sense" not in out and len(rows) == int((values < 0).sum() + (values > 0).sum()) == 11
    for row in rows:  # store row -> row of the data file, which lacks nothing
        assert row["train_data_row"] == row["train_index"] + (row["train_index"] >= 5)
        assert row["train_text"] == SENTENCES[row["train_data_row"]][0]


# --------------------------------------------------------------------------------------------------
# 7. a tiny damping gave all-NaN scores with exit 0
# --------------------------------------------------------------------------------------------------


def test_7_a_damping_that_makes_scores_non_finite_is_refused(rel, tmp_path, capsys):
    root, _, _ = rel
    out = tmp_path / "scores.safetensors"
    before = hashes(root / "train-store")
    refused(["score", "--store", str(root / "train-store"), "--self", "--method", "datainf", "--damping", "1e-45",
             "--out", str(out)], capsys, "method 'datainf' gave NaN or infinite scores (damping 1e-45)")
    assert not out.exists() and hashes(root / "train-store") == before


# --------------------------------------------------------------------------------------------------
# 8. outputs overwrote other files: scores by their settings JSON, a store's manifest
# --------------------------------------------------------------------------------------------------


def test_8_outputs_never_overwrite_other_files(rel, tmp_path, capsys):
    root, _, _ = rel
    mine = tmp_path / "x.json"
    mine.write_text('{"mine": true}')
    store = copy(root / "train-store", tmp_path / "store")
    before = hashes(mine, store)
    score = ["score", "--store", str(store), "--self", "--method", "identity", "--out"]
    refused([*score, str(mine)], capsys, "scores are written as .safetensors; name it")
    refused([*score, str(store / "manifest.npz")], capsys, "scores are written as .safetensors")
    refused([*score, str(store / "manifest.safetensors")], capsys, "lies inside the training store")
    refused(["report", "--scores", str(root / "scores.safetensors"), "--data", str(root / "train.jsonl"), "--out",
             str(root / "scores.safetensors")], capsys, "is the scores file")
    assert hashes(mine, store) == before


# --------------------------------------------------------------------------------------------------
# 9. two writers could both take over a stale lock (the race itself: test_store.py); a live one is refused
# --------------------------------------------------------------------------------------------------


def test_9_a_second_writer_is_refused_while_the_first_lives(rel, tiny_bert_dir, tmp_path, capsys):
    import socket

    root, train, _ = rel
    store = copy(root / "train-store", tmp_path / "store")
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (store / "lock").write_text(json.dumps({"pid": writer.pid, "host": socket.gethostname(), "token": "t"}))
        before = hashes(store)
        refused(grads_argv(tiny_bert_dir, root / "adapter", train, store), capsys,
                f"is being written by process {writer.pid}")
        assert hashes(store) == before
    finally:
        writer.kill()
        writer.wait()
    code, _, err = run(grads_argv(tiny_bert_dir, root / "adapter", train, store), capsys)  # now stale: taken over
    assert code == 0 and not (store / "lock").exists(), err


# --------------------------------------------------------------------------------------------------
# 10. raw tracebacks instead of one `error:` line and exit 2
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", ["adapter", "foreign-adapter"])
def test_10_a_label_beyond_the_classes_is_refused_before_anything_is_written(adapter, rel, tiny_bert_dir, tmp_path,
                                                                             capsys):
    root, _, _ = rel
    labels = [0, 1] * 4 + [0, 7, 1, 0]  # row 9 (chunk 2 of 3) has a class the 2-way classifier lacks
    data = write_jsonl(tmp_path / "data.jsonl", [{"text": f"text {i}", "label": y} for i, y in enumerate(labels)])
    store = tmp_path / "store"
    words = {"adapter": "row 9 has label 7 in column 'label', but the classifier has 2 classes (ids 0..1)",
             "foreign-adapter": "training example 9 has label 7, but the classifier has 2 classes (ids 0..1)"}[adapter]
    refused(grads_argv(tiny_bert_dir, root / adapter, data, store), capsys, words)
    assert not store.exists()


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_10_a_file_that_is_not_utf8_is_one_error_line(suffix, rel, tiny_bert_dir, tmp_path, capsys):
    root, _, _ = rel
    data = tmp_path / f"data.{suffix}"
    if suffix == "jsonl":
        data.write_bytes(b'{"text": "fine", "label": 0}\n{"text": "caf\xe9", "label": 1}\n')
    else:
        data.write_bytes(b"text,label\nfine,0\ncaf\xe9,1\n")
    store = tmp_path / "store"
    line = 2 if suffix == "jsonl" else 3  # (the CSV's header is its line 1)
    refused(grads_argv(tiny_bert_dir, root / "adapter", data, store), capsys, f"line {line} is not UTF-8")
    assert not store.exists()


@pytest.mark.parametrize("edit, words", [
    (dict(chunk_size=0), "manifest.json has chunk_size=0"),
    (dict(n_examples="12"), "manifest.json has n_examples='12'"),
    (dict(blocks=[{"name": "a", "shape": "x"}]), "manifest.json has block 'a' with shape 'x'"),
    (dict(fingerprints=None), "manifest.json has no mapping of fingerprints"),
])
def test_10_a_bad_manifest_is_one_error_line(edit, words, rel, tiny_bert_dir, tmp_path, capsys):
    root, train, _ = rel
    store = copy(root / "train-store", tmp_path / "store")
    _edit(store, **edit)
    before = hashes(store)
    out = tmp_path / "scores.safetensors"
    refused(["score", "--store", str(store), "--self", "--out", str(out)], capsys, words)
    refused(["store", "verify", str(store)], capsys, words)
    refused(grads_argv(tiny_bert_dir, root / "adapter", train, store), capsys, words)
    assert hashes(store) == before and not out.exists()


def _not_scores(tmp_path: Path, root: Path) -> dict[str, Path]:
    text = tmp_path / "notes.safetensors"
    text.write_text("just some text")
    array = tmp_path / "array.npz"
    with open(array, "wb") as f:
        np.save(f, np.arange(3.0))  # a .npy under a .npz name
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    return {"text": text, "npy": array, "broken zip": broken, "empty": empty,
            "adapter weights": root / "adapter" / "adapter_model.safetensors",
            "a store's manifest": root / "train-store" / "manifest.json"}


@pytest.mark.parametrize("what", ["text", "npy", "broken zip", "empty", "adapter weights", "a store's manifest"])
def test_10_a_file_that_is_not_scores_is_one_error_line(what, rel, tmp_path, capsys):
    root, train, _ = rel
    files = _not_scores(tmp_path, root)
    given = files[what]
    before = hashes(tmp_path, root / "adapter", root / "train-store")
    out = tmp_path / "out"
    refused(["report", "--scores", str(given), "--data", str(train), "--out", str(out / "report.html")], capsys,
            "scores file")
    refused(["top", "--scores", str(given), "--out", str(out / "top.jsonl")], capsys, "scores file")
    assert hashes(tmp_path, root / "adapter", root / "train-store") == before and not out.exists()


# --------------------------------------------------------------------------------------------------
# 11. smaller: a huge line tokenized in full; ekfac seconds without the curvature fit; datainf.kfac after
#     `import datainf`; grads --max-length 0 accepted
# --------------------------------------------------------------------------------------------------


def test_11_a_huge_line_is_cut_before_it_is_tokenized(tiny_bert_dir):
    from transformers import AutoTokenizer

    from datainf.data.collate import CHARS_PER_TOKEN, TextCollator

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert_dir))
    seen = []

    class Spy:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, texts, *args, **kwargs):
            seen.extend(len(t) for t in texts)
            return tokenizer(texts, *args, **kwargs)

    huge = "word " * 2_000_000  # 10 MB on one line
    t0 = time.perf_counter()
    batch = TextCollator(tokenizer=Spy(), task="classification", max_length=32)([{"text": huge, "label": 0}])
    assert time.perf_counter() - t0 < 5.0
    assert max(seen) <= CHARS_PER_TOKEN * 32 and batch["input_ids"].shape == (1, 32)


def test_11_ekfac_seconds_include_the_curvature_fit(rel, tmp_path, capsys):
    root, _, _ = rel
    store = copy(root / "train-store", tmp_path / "store")
    out = tmp_path / "scores.safetensors"
    code, stdout, err = run(["score", "--store", str(store), "--self", "--method", "ekfac", "--out", str(out)], capsys)
    assert code == 0, err
    settings = load_scores(out).settings["ekfac"]
    assert settings["curvature_seconds"] > 0 and settings["seconds"] >= settings["curvature_seconds"]
    assert "curvature fit" in stdout


def test_11_kfac_after_a_plain_import_datainf():
    child = "import datainf\nf = datainf.kfac.curvature_from_gradients\nprint(f.__module__)\n"
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", child], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "datainf.estimators.kfac"


def test_11_grads_max_length_zero_is_refused(rel, tiny_bert_dir, tmp_path, capsys):
    root, train, _ = rel
    store = tmp_path / "store"
    refused(grads_argv(tiny_bert_dir, root / "adapter", train, store, "--max-length", "0"), capsys,
            "Invalid value for '--max-length': 0 is not in the range x>=2")
    assert not store.exists()


# --------------------------------------------------------------------------------------------------
# 12. a store larger than its disk's free space was computed until the disk filled, hours in
# --------------------------------------------------------------------------------------------------


def test_12_a_store_that_cannot_fit_on_its_disk_is_refused_before_any_gradient(rel, tiny_bert_dir, tmp_path, capsys,
                                                                               monkeypatch):
    """The bytes a store needs, counted here from its manifest's block shapes (float32 entries plus one float64
    squared norm per block and example), against a disk that reports one byte less than that free: refused
    with one line, nothing written; with exactly that much free the same command runs."""
    import datainf.store.gradient_store as gradient_store

    root, train, _ = rel
    manifest = json.loads((root / "train-store" / "manifest.json").read_text())
    per_example = sum(int(np.prod(b["shape"])) * 4 + 8 for b in manifest["blocks"])
    need = manifest["n_examples"] * per_example
    real = shutil.disk_usage

    def disk_with(free: int):
        return lambda path: real(path)._replace(free=free)

    argv = grads_argv(tiny_bert_dir, root / "adapter", train, tmp_path / "new-store")
    monkeypatch.setattr(gradient_store.shutil, "disk_usage", disk_with(need - 1))
    line = refused(argv, capsys, f"need {gradient_store._size(need)}")
    assert "--project K" in line and not (tmp_path / "new-store").exists()
    # a store half done needs room for its missing chunks only; refused, it is left as it was
    store = copy(root / "train-store", tmp_path / "half")
    shutil.rmtree(store / "chunks" / "00001")
    (store / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    before = hashes(store)
    missing = len(range(4, 8)) * per_example
    monkeypatch.setattr(gradient_store.shutil, "disk_usage", disk_with(missing - 1))
    refused(grads_argv(tiny_bert_dir, root / "adapter", train, store), capsys, f"need {gradient_store._size(missing)}")
    assert hashes(store) == before
    monkeypatch.setattr(gradient_store.shutil, "disk_usage", disk_with(missing))
    code, _, err = run(grads_argv(tiny_bert_dir, root / "adapter", train, store), capsys)
    assert code == 0, err

    def chunk_files(folder: Path) -> dict[str, str]:
        return {str(Path(k).relative_to(folder)): v for k, v in hashes(folder / "chunks").items()}

    assert chunk_files(store) == chunk_files(root / "train-store")  # chunk 1 recomputed, the same bytes
