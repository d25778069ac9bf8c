"""Projected per-example gradients (``ProjectionSettings``): the hooks' projected gradients against an
explicit projection of independently computed full gradients, reproducible matrices, refused mismatches,
and every method on a projected store.

The reference: full per-example gradients from a loop of single-example backward calls on the UNPADDED
examples (tests/test_gradients.py), then ``P_out^T G P_in`` written out here with the module's matrices.
Models run in float64, so hooks and reference agree to float64 rounding (tests/reference.py, FLOAT64_TOL);
a projection applied on the wrong side, with the wrong module's matrix, after a padded position leaked, or
a side left unprojected is an O(1) difference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import datainf  # noqa: E402
from datainf.errors import DataInfError  # noqa: E402
from datainf.estimators import ScoreArguments, method_names  # noqa: E402
from datainf.gradients import (  # noqa: E402
    GradientDict,
    ProjectionSettings,
    module_key,
    per_example_gradients,
    projected_shape,
)
from datainf.scoring import check_pair, score_store  # noqa: E402
from datainf.store import GradientStore  # noqa: E402
from reference import FLOAT32_TOL, FLOAT64_TOL, assert_close_to, assert_per_example_close  # noqa: E402
from test_gradients import reference_gradients  # noqa: E402
from tiny_models import (  # noqa: E402
    random_causal_lm_batch,
    random_classification_batch,
    tiny_bert_classifier,
    tiny_llama_causal_lm,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

K = 8  # smaller than the tiny models' width 32, larger than the LoRA rank 4


def explicit_projection(grads: dict[str, torch.Tensor], projection: ProjectionSettings) -> dict[str, torch.Tensor]:
    """Full per-example gradients (B, *shape) projected by hand: each side larger than k multiplied by the
    module's matrix (out side: P_out^T G; in side: G P_in; a bias: g P_out)."""
    out = {}
    for name, g in grads.items():
        key = module_key(name)
        if g.dim() == 2:  # a bias (or any 1-D parameter): its out side
            out[name] = g @ projection.matrix(key, "out", g.shape[1], g.dtype) if g.shape[1] > projection.dim else g
            continue
        g = g.reshape(g.shape[0], g.shape[1], -1)
        rows, cols = g.shape[1], g.shape[2]
        if rows > projection.dim:
            g = projection.matrix(key, "out", rows, g.dtype).T @ g
        if cols > projection.dim:
            g = g @ projection.matrix(key, "in", cols, g.dtype)
        out[name] = g
    return out


# ------------------------------------------------------------------------------------------------ equality
def test_bert_projected_gradients_equal_the_explicit_projection():
    """LoRA A (4 x 32 -> 4 x 8), B (32 x 4 -> 8 x 4), a 12-class head (12 x 32 -> 8 x 8: both sides) and its
    bias (12 -> 8), on a padded batch of uneven lengths."""
    model = tiny_bert_classifier(num_labels=12).double()
    batch = random_classification_batch(6, num_labels=12, seed=1)
    assert batch["attention_mask"].sum(1).unique().numel() > 1
    projection = ProjectionSettings(dim=K, seed=5)
    actual = per_example_gradients(model, batch, "classification", projection=projection)
    expected = explicit_projection(reference_gradients(model, batch, "classification"), projection)
    assert all(a.dtype == torch.float64 for a in actual.values())
    assert_per_example_close(actual, expected, tol=FLOAT64_TOL)
    shapes = {tuple(a.shape[1:]) for n, a in actual.items() if "lora_A" in n} | {
        tuple(a.shape[1:]) for n, a in actual.items() if "lora_B" in n}
    assert shapes == {(4, K), (K, 4)}
    head = "base_model.model.classifier.modules_to_save.default"
    assert actual[f"{head}.weight"].shape[1:] == (K, K) and actual[f"{head}.bias"].shape[1:] == (K,)  # both sides


@pytest.mark.parametrize("padding", ["right", "left"])
def test_llama_projected_gradients_equal_the_explicit_projection(padding):
    """q_proj / v_proj LoRA on the hooks, and an embedding LoRA (raw parameters: the single-example fallback
    path, projected after the fact by the same rule)."""
    model = tiny_llama_causal_lm(lora_targets=("q_proj", "v_proj", "embed_tokens")).double()
    batch = random_causal_lm_batch(5, padding=padding, seed=3)
    projection = ProjectionSettings(dim=K, seed=1)
    actual = per_example_gradients(model, batch, "causal_lm", projection=projection)
    expected = explicit_projection(reference_gradients(model, batch, "causal_lm"), projection)
    assert_per_example_close(actual, expected, tol=FLOAT64_TOL)
    embedding = [n for n in actual if "lora_embedding" in n]
    # (PEFT starts lora_embedding_A at zero, so only its A has a non-zero gradient here)
    assert len(embedding) == 2 and any(actual[n].abs().sum() > 0 for n in embedding)
    assert {tuple(actual[n].shape[1:]) for n in embedding} == {(4, K), (K, 4)}  # (r, vocab 100), (32, r)


def test_float32_model_within_the_float32_bound():
    """The float32 path itself, against the float64 reference projected the same way: FLOAT32_TOL
    (tests/reference.py: under 1e4 accumulated terms; the projection adds sums of 32 terms)."""
    projection = ProjectionSettings(dim=K, seed=2)
    batch = random_causal_lm_batch(4, padding="right", seed=7)
    actual = per_example_gradients(tiny_llama_causal_lm(), batch, "causal_lm", projection=projection)
    assert all(a.dtype == torch.float32 for a in actual.values())
    expected = explicit_projection(reference_gradients(tiny_llama_causal_lm().double(), batch, "causal_lm"),
                                   projection)
    assert_per_example_close(actual, expected, tol=FLOAT32_TOL)


class _Plain(nn.Module):
    """A plain model with a full trainable Linear (both sides wider than k) behind an embedding."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 24)
        self.hidden = nn.Linear(24, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(self.embed(input_ids)).mean(dim=1)))


def test_full_matrices_and_fallback_parameters():
    """A full Linear weight (16 x 24 -> 8 x 8), biases (16 -> 8; 3 stays), and an embedding (a raw
    parameter, 20 x 24 -> 8 x 8 after the fact) against the per-example loop."""
    model = _Plain().double()
    gen = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, 20, (5, 6), generator=gen), "labels": torch.randint(0, 3, (5,), generator=gen)}

    def loss(m, b):
        return nn.functional.cross_entropy(m(b["input_ids"]), b["labels"], reduction="none")

    projection = ProjectionSettings(dim=K, seed=9)
    actual = per_example_gradients(model, batch, loss, projection=projection)
    full = {}
    for i in range(5):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        grads = torch.autograd.grad(loss(model, one).sum(), list(model.parameters()))
        for (name, _), g in zip(model.named_parameters(), grads):
            full.setdefault(name, []).append(g)
    expected = explicit_projection({k: torch.stack(v) for k, v in full.items()}, projection)
    assert_per_example_close(actual, expected, tol=FLOAT64_TOL)
    assert {n: tuple(a.shape[1:]) for n, a in actual.items()} == {
        "embed.weight": (K, K), "hidden.weight": (K, K), "hidden.bias": (K,), "out.weight": (3, K), "out.bias": (3,)}
    assert projected_shape((3, 4), projection) == (3, 4)  # no side larger than k: untouched


# ------------------------------------------------------------------------------------------------ the matrices
def test_matrices_are_seeded_scaled_and_distinct():
    p = ProjectionSettings(dim=16, seed=3)
    a = p.matrix("layer.lora_A.default", "in", 40)
    assert a.shape == (40, 16) and torch.equal(a, ProjectionSettings(16, 3).matrix("layer.lora_A.default", "in", 40))
    others = [ProjectionSettings(16, 4).matrix("layer.lora_A.default", "in", 40),   # another seed
              p.matrix("layer.lora_B.default", "in", 40),                             # another module
              p.matrix("layer.lora_A.default", "out", 40)]                            # another side
    for other in others:
        assert (a - other).abs().max() > 0.1
    assert not torch.equal(ProjectionSettings(17, 3).matrix("layer.lora_A.default", "in", 40)[:, :16], a)
    wide = ProjectionSettings(dim=20000, seed=0).matrix("m", "in", 12, torch.float64)
    # entries N(0, 1/k): P P^T -> I (the JL scaling); at k = 20000 each entry of P P^T is within ~4/sqrt(k)
    assert (wide @ wide.T - torch.eye(12, dtype=torch.float64)).abs().max() < 0.05


def test_matrices_are_the_same_in_a_fresh_process():
    code = textwrap.dedent("""
        import json, sys
        from datainf.gradients import ProjectionSettings
        m = ProjectionSettings(dim=8, seed=11).matrix("base.layer.0.q_proj.lora_A.default", "in", 32)
        print(json.dumps(m.double().flatten().tolist()))
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    theirs = torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]), dtype=torch.float64)
    mine = ProjectionSettings(dim=8, seed=11).matrix("base.layer.0.q_proj.lora_A.default", "in", 32).double().flatten()
    assert torch.equal(theirs, mine)


def test_settings_are_validated():
    for bad in ({"dim": 0}, {"dim": 2.5}, {"dim": 4, "seed": -1}, {"dim": True}):
        with pytest.raises(DataInfError, match="projection"):
            ProjectionSettings(**bad)
    assert ProjectionSettings.from_dict(ProjectionSettings(4, 2).to_dict()) == ProjectionSettings(4, 2)
    assert ProjectionSettings.from_dict(None) is None


# ------------------------------------------------------------------------------------------------ stores
WORDS = ["good", "bad", "fine", "dull", "great", "awful", "witty", "slow"]


def _records(n: int) -> list[dict]:
    return [{"text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(2 + i % 4)), "label": i % 3}
            for i in range(n)]


def _collate(records):
    """Word ids of the records' texts, right-padded (a tokenizer-free collate for the tiny BERT)."""
    vocab = {w: i + 1 for i, w in enumerate(WORDS)}
    ids = [[vocab[w] for w in r["text"].split()] for r in records]
    length = max(map(len, ids))
    input_ids = torch.zeros(len(ids), length, dtype=torch.long)
    mask = torch.zeros(len(ids), length, dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(input_ids),
            "labels": torch.tensor([r["label"] for r in records])}


def _attributor(model, store, projection, **kw):
    return datainf.Attributor(model, task="classification", store=store, collate=_collate, batch_size=4,
                              chunk_size=5, store_dtype="float64", progress=False, projection=projection, **kw)


@pytest.fixture(scope="module")
def projected(tmp_path_factory):
    """A projected float64 store of 18 examples (tiny BERT, 3 classes) and its attributor."""
    root = tmp_path_factory.mktemp("projected")
    model = tiny_bert_classifier(num_labels=3).double()
    projection = ProjectionSettings(dim=K, seed=4)
    attributor = _attributor(model, root / "train", projection)
    attributor.fit(_records(18))
    return root, model, projection, attributor


def test_store_records_the_projection(projected):
    root, model, projection, attributor = projected
    store = attributor.store
    p = store.projection
    assert (p["dim"], p["seed"], p["kind"]) == (K, 4, "gaussian-kronecker")
    assert {n: tuple(b["shape"]) for n, b in p["blocks"].items()} == store.block_shapes
    a = next(n for n in store.block_names if "lora_A" in n)
    assert p["blocks"][a]["full_shape"] == [4, 32] and store.block_shapes[a] == (4, K)
    # the task fingerprint says so too: an unprojected store of the same data has another one
    plain = _attributor(model, root / "plain", None)
    assert plain._task_fingerprint() != attributor._task_fingerprint()
    # and the stored rows are the hooks' projected gradients
    direct = per_example_gradients(model, _collate(_records(18)[:4]), projection=projection)
    assert_close_to(store.load(a)[:4], direct[a], what="stored vs direct")


def test_two_fresh_attributors_give_the_same_store(projected, tmp_path):
    root, model, projection, attributor = projected
    again = _attributor(model, tmp_path / "again", ProjectionSettings(dim=K, seed=4))
    again.fit(_records(18))
    for name in attributor.store.block_names:
        assert torch.equal(again.store.load(name), attributor.store.load(name))
    assert again.store.fingerprints == attributor.store.fingerprints
    other = _attributor(model, tmp_path / "other", ProjectionSettings(dim=K, seed=5)).gradients(_records(3))
    a = next(n for n in other if "lora_A" in n)
    assert (other[a] - attributor.store.load(a)[:3]).abs().max() > 1e-3 * other[a].abs().max()


def test_mismatched_projections_are_refused(projected, tmp_path):
    root, model, projection, attributor = projected
    train = attributor.store
    queries = _records(4)
    # a query store of another seed: refused, even with allow_mismatch
    other = _attributor(model, tmp_path / "q-seed", ProjectionSettings(dim=K, seed=6))
    other.fit(queries)
    for allow in (False, True):
        with pytest.raises(DataInfError, match=r"projection \(k=8, seed 4 vs k=8, seed 6\)"):
            check_pair(train, other.store, allow_mismatch=allow)
    # an unprojected query store
    plain = _attributor(model, tmp_path / "q-plain", None)
    plain.fit(queries)
    with pytest.raises(DataInfError, match=r"projection \(k=8, seed 4 vs none\)"):
        score_store(train, plain.store, ScoreArguments())
    # in-memory queries: tagged with another projection, or full-size
    with pytest.raises(DataInfError, match="computed with projection k=8, seed 6"):
        attributor.score(other.gradients(queries), save=False)
    with pytest.raises(DataInfError, match="full \\(unprojected\\) gradients"):
        score_store(train, dict(plain.gradients(queries)), ScoreArguments())
    # resuming the store with another projection
    with pytest.raises(DataInfError, match=r"different projection \(k=8, seed 4 != k=16, seed 4\)"):
        _attributor(model, root / "train", ProjectionSettings(dim=16, seed=4)).fit(_records(18))
    # the same projection is accepted: the attributor projects its own queries with the store's matrices
    assert attributor.scores(queries, save=False).shape == (18, 4)


@pytest.mark.parametrize("method", method_names())
def test_a_projected_store_scores_with_every_method(projected, method):
    """Every method on the projected store equals the same method on the projected gradients in memory
    (float64 store and compute); K-FAC/EK-FAC fit their curvature on the projected block shapes."""
    root, model, projection, attributor = projected
    store = attributor.store
    queries = attributor.gradients(_records(5))
    options = {"iterations": 30} if method == "lissa" else {}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lissa at 30 iterations may warn that it has not converged
        result = attributor.score(queries, method=method, save=False, **options)
        train = {n: store.load(n) for n in store.block_names}
        extra = {}
        if get_needs_curvature(method):
            from datainf.estimators.kfac import curvature_from_gradients

            curvature = curvature_from_gradients(train)
            assert {n: b.shape for n, b in curvature.blocks.items()} == {
                n: (s if len(s) == 2 else (s[0], 1)) for n, s in store.block_shapes.items()}
            extra["factors"] = curvature
        want = datainf.influence(train, dict(queries), method, **options, **extra)
    assert result.scores.shape == (18, 5) and bool(torch.isfinite(result.scores).all())
    assert_close_to(result.scores, want, tol=FLOAT64_TOL, what=method)


def get_needs_curvature(method: str) -> bool:
    from datainf.estimators import get_method

    return get_method(method).needs_curvature


def test_cli_grads_project_and_score(tmp_path, tiny_bert_dir, capsys):
    """`datainf grads --project K --project-seed S` makes a projected store; a query store of another seed
    is refused by `datainf score` in one line."""
    from conftest import SENTENCES
    from datainf.cli import main

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in SENTENCES))

    def run(*argv):
        with pytest.raises(SystemExit) as e:
            main(["--quiet", *argv])
        return e.value.code, capsys.readouterr()

    code, _ = run("finetune", "--model", str(tiny_bert_dir), "--train", str(data), "--out", str(tmp_path / "adapter"),
                  "--epochs", "1", "--batch-size", "4", "--device", "cpu")
    assert code == 0
    common = ["grads", "--model", str(tiny_bert_dir), "--adapter", str(tmp_path / "adapter"), "--data", str(data),
              "--device", "cpu", "--project", "16"]
    code, out = run(*common, "--store", str(tmp_path / "train"))
    assert code == 0 and "projected, k=16, seed 0" in out.out
    code, _ = run(*common, "--store", str(tmp_path / "val"), "--project-seed", "1")
    assert code == 0
    store = GradientStore.open(tmp_path / "train")
    assert store.projection["dim"] == 16 and all(max(s) <= 16 for s in store.block_shapes.values())
    code, out = run("score", "--store", str(tmp_path / "train"), "--queries", str(tmp_path / "val"),
                    "--out", str(tmp_path / "s.safetensors"))
    assert code == 2 and out.err.startswith("error:") and "projection (k=16, seed 0 vs k=16, seed 1)" in out.err
    assert len(out.err.strip().splitlines()) == 1
    code, out = run("score", "--store", str(tmp_path / "train"), "--self", "--out", str(tmp_path / "s.safetensors"))
    assert code == 0


def test_a_projected_store_keeps_its_labels_and_its_checksums(projected, tmp_path, capsys):
    """A projected classification store records its projection beside the run's label mapping and non-finite
    policy; its chunks carry chunk.json checksums, which `datainf store verify` checks and which scoring
    checks on the direct memory maps (a damaged projected chunk is refused, not scored); `store info` names
    the projection, and a store preconditioned from it keeps the projection and the labels."""
    from datainf.cli import main
    from datainf.scoring import precondition_store

    root, model, projection, _ = projected
    attributor = _attributor(model, tmp_path / "train", projection, label_names=["neg", "mid", "pos"])
    store = attributor.fit(_records(18))
    meta = store.manifest["meta"]
    assert store.projection["dim"] == K and store.projection["seed"] == 4
    assert meta["labels"] == {"names": ["neg", "mid", "pos"], "num_labels": 3}
    assert meta["nonfinite"] == {"policy": "refuse", "dropped": []}
    assert store.has_checksums and json.loads((tmp_path / "train/chunks/00001/chunk.json").read_text())["chunk"] == 1

    def run(*argv):
        with pytest.raises(SystemExit) as e:
            main(["--quiet", *argv])
        return e.value.code, capsys.readouterr()

    code, out = run("store", "verify", str(tmp_path / "train"))
    assert code == 0 and "sha256 checksums and squared norms verified" in out.out
    code, out = run("store", "info", str(tmp_path / "train"))
    assert code == 0 and "projection: k=8, seed 4" in out.out
    pre = precondition_store(GradientStore.open(tmp_path / "train"), tmp_path / "pre", ScoreArguments(method="ekfac"))
    assert pre.projection == store.projection and pre.manifest["meta"]["labels"] == meta["labels"]
    assert pre.has_checksums and pre.verify() == []
    # a damaged projected chunk: refused by verify and by every read through the direct maps, norms included
    file = tmp_path / "train/chunks/00001/b0000.npy"
    data = bytearray(file.read_bytes())
    data[-8:] = bytes(reversed(data[-8:])) if data[-8:] != bytes(reversed(data[-8:])) else b"\x01" * 8
    file.write_bytes(bytes(data))
    code, out = run("store", "verify", str(tmp_path / "train"))
    assert code == 2 and "chunk 1 (chunks/00001) b0000.npy does not match its sha256 checksum" in out.err
    for method in ("identity", "datainf"):
        with pytest.raises(DataInfError, match="b0000.npy does not match its sha256 checksum"):
            score_store(GradientStore.open(tmp_path / "train"), None, ScoreArguments(method=method))
    with pytest.raises(DataInfError, match="b0000.npy does not match its sha256 checksum"):
        GradientStore.open(tmp_path / "train").block(store.block_names[0])[:]


def test_gradient_dict_keeps_its_projection():
    d = GradientDict({"a": torch.zeros(2, 3)}, projection=ProjectionSettings(4, 1))
    assert d.projection_dict == {"dim": 4, "seed": 1, "kind": "gaussian-kronecker"} and dict(d).keys() == {"a"}


# ------------------------------------------------------------------------------------------------ explain
from test_cli_llm import chat_model_dir, flow  # noqa: E402,F401  (the tiny chat Llama, its adapter and data)


def test_explain_projects_its_query_as_the_store_was_made(flow, chat_model_dir, tmp_path, capsys):  # noqa: F811
    """`datainf explain` against a projected store projects the query with the store's matrices (its scores
    equal the library's on projected gradients), and against that store preconditioned once for ekfac gives
    the same answer in one pass."""
    from datainf.attributor import Attributor
    from datainf.cli import main
    from datainf.data.collate import TextCollator
    from datainf.models.llm import load_causal_lm_adapter

    root, data, records = flow

    def run(*argv):
        with pytest.raises(SystemExit) as e:
            main(["--quiet", *argv])
        return e.value.code, capsys.readouterr()

    store = tmp_path / "projected"
    code, out = run("grads", "--task", "causal_lm", "--model", str(chat_model_dir), "--adapter", str(root / "adapter"),
                    "--data", str(data), "--store", str(store), "--dtype", "float64", "--model-dtype", "float64",
                    "--project", "8", "--project-seed", "3")
    assert code == 0, out.err
    code, out = run("store", "precondition", "--method", "ekfac", str(store), str(tmp_path / "pre"))
    assert code == 0, out.err
    prompt, response = "the old fox finds the book", "book the finds fox old the"
    answers = {}
    for name, method in (("projected", "datainf"), ("projected", "ekfac"), ("pre", "ekfac")):
        target = tmp_path / f"{name}-{method}.json"
        code, out = run("explain", "--model", str(chat_model_dir), "--adapter", str(root / "adapter"), "--store",
                        str(tmp_path / name), "--prompt", prompt, "--response", response, "--method", method,
                        "--k", "3", "--json", str(target), "--model-dtype", "float64")
        assert code == 0, out.err
        answers[name, method] = json.loads(target.read_text())["answers"][0]["rows"]
    # independent: the query's projected gradient from the library (float64 model), scored in memory
    model, tok = load_causal_lm_adapter(chat_model_dir, root / "adapter", dtype=torch.float64)
    att = Attributor(model, task="causal_lm", store=store, collate=TextCollator(tok, task="causal_lm"),
                     progress=False, projection=ProjectionSettings(dim=8, seed=3))
    qgrads = att.gradients([{"prompt": prompt, "response": response}] if "prompt" in (att.store.records() or [{}])[0]
                           else [{"messages": [{"role": "user", "content": prompt},
                                               {"role": "assistant", "content": response}]}])
    scores = datainf.influence(att.store.blocks(), dict(qgrads), "datainf")[:, 0]
    rows = [r for r in answers["projected", "datainf"] if r["kind"] == "helpful"]
    assert [r["train_index"] for r in rows] == torch.argsort(scores)[:3].tolist()
    for r in rows:
        assert r["score"] == pytest.approx(float(scores[r["train_index"]]), rel=1e-9, abs=1e-300)
    direct = {(r["kind"], r["rank"]): (r["train_index"], r["score"]) for r in answers["projected", "ekfac"]}
    fast = {(r["kind"], r["rank"]): (r["train_index"], r["score"]) for r in answers["pre", "ekfac"]}
    assert direct.keys() == fast.keys()
    for key, (index, score) in direct.items():
        assert fast[key][0] == index and fast[key][1] == pytest.approx(score, rel=1e-9)
