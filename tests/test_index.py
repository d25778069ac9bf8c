"""The top-k index (datainf.index, `datainf index build` / `search`): its lists against the exhaustive scores
(score_store, and a dense float64 computation by hand), the IVF index's recall, and its refusals."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import refused
from cli_helpers import run_cli as run
from datainf.estimators import ScoreArguments
from datainf.ranking import top_examples
from datainf.scoring import precondition_store, score_store
from datainf.store import GradientStore

faiss = pytest.importorskip("faiss")

from datainf.index import (  # noqa: E402
    build_index,
    build_store_index,
    exhaustive_top,
    load_index,
    recall_at_k,
    save_index,
    search,
)

SHAPES = {"lora_A": (2, 6), "lora_B": (6, 2)}
FPS = {"model": "m" * 16, "adapter": "a" * 16, "task": "t" * 16, "dataset": "d" * 16}


def grads(n: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(n, *s, generator=gen, dtype=torch.float64) for k, s in SHAPES.items()}


def write_store(path: Path, g: dict[str, torch.Tensor], chunk_size: int = 16) -> GradientStore:
    n = next(iter(g.values())).shape[0]
    with GradientStore.create(path, blocks=SHAPES, n_examples=n, fingerprints=FPS, chunk_size=chunk_size,
                              dtype="float32") as store:
        for c in store.missing_chunks():
            rows = store.chunk_rows(c)
            store.write_chunk(c, {k: v[rows.start : rows.stop].float() for k, v in g.items()})
        store.finalize()
    return GradientStore.open(path)


def stored(g: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The values a float32 store holds, as float64 rows (n, d)."""
    return {k: v.float().double().reshape(v.shape[0], -1) for k, v in g.items()}


def hand_top(scores: torch.Tensor, k: int) -> dict[str, list[list[int]]]:
    """Top-k per query and sign from float64 scores (n, m), by numpy's argsort (independent of the library)."""
    s = scores.numpy()
    out: dict[str, list[list[int]]] = {"helpful": [], "harmful": []}
    for j in range(s.shape[1]):
        for kind, signed in (("helpful", -s[:, j]), ("harmful", s[:, j])):
            order = np.argsort(-signed, kind="stable")[:k]
            out[kind].append([int(i) for i in order if signed[i] > 0])
    return out


def assert_same_top(found, scores: torch.Tensor, k: int) -> None:
    """The index's lists hold the exhaustive top-k indices in order, with scores within float32's bound."""
    want = hand_top(scores, k)
    bound = 1e-5 * float(scores.abs().max())  # float32 inner products of a few dozen numbers
    for kind in ("helpful", "harmful"):
        for j, (got, expected) in enumerate(zip(found[kind], want[kind])):
            assert [i for i, _ in got] == expected, (kind, j)
            for i, s in got:
                assert abs(s - float(scores[i, j])) <= bound, (kind, j, i, s, float(scores[i, j]))


@pytest.fixture
def stores(tmp_path):
    train_g, query_g = grads(80, 0), grads(5, 1)
    return (write_store(tmp_path / "train", train_g), write_store(tmp_path / "queries", query_g), train_g, query_g)


def test_flat_index_equals_the_exhaustive_top_k_for_identity(stores):
    """Flat index of a plain store: the same top-k as -G V^T in float64 by hand and as score_store's."""
    train, queries, train_g, query_g = stores
    G, V = stored(train_g), stored(query_g)
    by_hand = -sum(G[n] @ V[n].T for n in SHAPES)  # (n, m) float64
    top = build_store_index(train)
    found = top.search(queries, 10)
    assert_same_top(found, by_hand, 10)
    exhaustive = score_store(train, queries, ScoreArguments(method="identity")).scores
    assert recall_at_k(found, exhaustive_top(exhaustive, 10)) == 1.0
    # normalized: cosine similarity of the concatenated gradients
    norm_g = torch.sqrt(sum((G[n] ** 2).sum(1) for n in SHAPES))
    norm_v = torch.sqrt(sum((V[n] ** 2).sum(1) for n in SHAPES))
    assert_same_top(build_store_index(train, normalize=True).search(queries, 10),
                    by_hand / norm_g[:, None] / norm_v[None, :], 10)


def test_flat_index_equals_the_exhaustive_top_k_for_datainf(stores, tmp_path):
    """Flat index of a store preconditioned for DataInf: the same top-k as the dense float64 DataInf scores
    -v^T [(1/n) sum_i (g_i g_i^T + lambda I)^{-1}] g_k, summed over blocks (lambda: the damping recorded), and
    as score_store's on the plain store."""
    train, queries, train_g, query_g = stores
    pre = precondition_store(train, tmp_path / "pre", ScoreArguments(method="datainf"), dtype="float32")
    damping = pre.manifest["meta"]["preconditioned"]["damping"]
    G, V = stored(train_g), stored(query_g)
    by_hand = torch.zeros(80, 5, dtype=torch.float64)
    for n in SHAPES:
        d = G[n].shape[1]
        eye = torch.eye(d, dtype=torch.float64)
        P = sum(torch.linalg.inv(torch.outer(g, g) + damping[n] * eye) for g in G[n]) / G[n].shape[0]
        by_hand -= G[n] @ P @ V[n].T
    top = build_store_index(pre)
    assert top.settings.method == "datainf"
    assert_same_top(top.search(queries, 10), by_hand, 10)
    exhaustive = score_store(train, queries, ScoreArguments(method="datainf")).scores
    assert recall_at_k(top.search(queries, 10), exhaustive_top(exhaustive, 10)) == 1.0


def test_ivf_recall_on_a_clustered_store():
    """An IVF index (20 lists, 4 probed) of 2,000 rows in 20 clusters: recall@10 >= 0.9 against the exact
    top-10 of float64 inner products, for queries near the cluster centres (both signs)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 32)) * 3 / np.sqrt(32)  # norm about 3
    x = (centres[rng.integers(0, 20, 2000)] + 0.3 * rng.normal(size=(2000, 32))).astype(np.float32)
    q = (centres[:8] + 0.3 * rng.normal(size=(8, 32))).astype(np.float32)
    index = build_index(x, "ivf", nlist=20)
    found = search(index, q, 10, nprobe=4)
    exact = hand_top(torch.from_numpy(x.astype(np.float64) @ q.astype(np.float64).T), 10)
    recall = recall_at_k(found, exact)
    assert recall >= 0.9, recall
    # one list only: fewer rows, lower recall, never above the exact index's
    assert recall_at_k(search(index, q, 10, nprobe=1), exact) <= recall
    assert recall_at_k(search(build_index(x, "flat"), q, 10), exact) == 1.0


def sha(*folders: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for f in folders for p in sorted(Path(f).rglob("*"))
            if p.is_file()}


def test_cli_build_check_and_search_give_the_rows_of_top(stores, tmp_path, capsys):
    """`index build --check` prints recall 1 for a flat index; `index search` writes the rows `top` would
    write from the exhaustive scores (same queries, kinds, ranks and indices; scores within float32)."""
    train, queries, _, _ = stores
    code, out, err = run(["index", "build", str(tmp_path / "train"), "--out", str(tmp_path / "ix"),
                          "--check", str(tmp_path / "queries"), "--k", "7"], capsys)
    assert code == 0, err
    assert "recall@7 against the exhaustive identity scores: 1.0000" in out
    manifest = json.loads((tmp_path / "ix/index.json").read_text())
    assert manifest["check"]["recall"] == 1.0
    assert manifest["index_sha256"] == hashlib.sha256((tmp_path / "ix/index.faiss").read_bytes()).hexdigest()
    code, out, err = run(["index", "search", str(tmp_path / "ix"), "--queries", str(tmp_path / "queries"),
                          "--k", "7"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    scores = score_store(train, queries, ScoreArguments(method="identity")).scores
    want = top_examples(scores, 7, method="identity")
    key = ("method", "query", "kind", "rank", "train_index")
    assert [tuple(r[c] for c in key) for r in rows] == [tuple(r[c] for c in key) for r in want]
    bound = 1e-5 * float(scores.abs().max())
    assert all(abs(a["score"] - b["score"]) <= bound for a, b in zip(rows, want))
    # rebuilding over our own index replaces it
    code, _, err = run(["index", "build", str(tmp_path / "train"), "--out", str(tmp_path / "ix"), "--kind", "ivf",
                        "--nlist", "2"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "ix/index.json").read_text())["kind"] == "ivf"
    # read back from disk with every list probed, the IVF index lists what the flat one did
    code, out, err = run(["index", "search", str(tmp_path / "ix"), "--queries", str(tmp_path / "queries"),
                          "--k", "7", "--nprobe", "2"], capsys)
    assert code == 0, err
    assert [tuple(json.loads(line)[c] for c in key) for line in out.splitlines()] == \
        [tuple(r[c] for c in key) for r in want]


def test_a_stale_index_is_refused(stores, tmp_path, capsys):
    """The store rewritten after the index was built (same fingerprints, other gradients): search refuses with
    the command that rebuilds the index, and changes nothing."""
    train, _, _, _ = stores
    save_index(build_store_index(train), tmp_path / "ix")
    load_index(tmp_path / "ix", train)  # fresh: accepted
    import shutil

    shutil.rmtree(tmp_path / "train")
    write_store(tmp_path / "train", grads(80, 9))
    before = sha(tmp_path / "train", tmp_path / "queries", tmp_path / "ix")
    line = refused(["index", "search", str(tmp_path / "ix"), "--queries", str(tmp_path / "queries")], capsys,
                   "is stale")
    assert f"datainf index build {tmp_path / 'train'} --method identity --kind flat --out {tmp_path / 'ix'}" in line
    assert sha(tmp_path / "train", tmp_path / "queries", tmp_path / "ix") == before
    # a damaged index file is refused too
    save_index(build_store_index(GradientStore.open(tmp_path / "train")), tmp_path / "ix2")
    (tmp_path / "ix2/index.faiss").write_bytes((tmp_path / "ix2/index.faiss").read_bytes()[:-4] + b"\x00\x01\x02\x03")
    refused(["index", "search", str(tmp_path / "ix2"), "--queries", str(tmp_path / "queries")], capsys,
            "does not match the sha256")


def test_missing_faiss_is_one_error_line(stores, tmp_path, capsys, monkeypatch):
    """Without faiss: one `error:` line saying how to install the extra, and no index folder."""
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
    refused(["index", "build", str(tmp_path / "train"), "--out", str(tmp_path / "ix")], capsys,
            "pip install 'datainf[index]'")
    assert not (tmp_path / "ix").exists()


def test_build_refusals(stores, tmp_path, capsys):
    """A method the plain store cannot give (with the precondition command), an output inside the store, and a
    folder holding another file (even with --overwrite) are refused, the inputs unchanged."""
    before = sha(tmp_path / "train")
    refused(["index", "build", str(tmp_path / "train"), "--method", "ekfac"], capsys,
            f"datainf store precondition --method ekfac {tmp_path / 'train'} PRE")
    refused(["index", "build", str(tmp_path / "train"), "--out", str(tmp_path / "train/ix")], capsys,
            "lies inside the training store")
    (tmp_path / "other").mkdir()
    (tmp_path / "other/notes.txt").write_text("mine")
    refused(["index", "build", str(tmp_path / "train"), "--out", str(tmp_path / "other"), "--overwrite"], capsys,
            "holds notes.txt")
    assert (tmp_path / "other/notes.txt").read_text() == "mine"
    assert sha(tmp_path / "train") == before
    assert not (tmp_path / "train.index").exists()


def test_ivf_built_from_a_sample_of_the_store_lists_what_flat_does_with_every_list_probed(stores, monkeypatch):
    """An IVF index whose quantizer is trained on a sample of the rows (fewer rows a list than the store has)
    still holds every row: probed whole, its lists are the exhaustive ones."""
    import datainf.index as index_module

    train, queries, train_g, query_g = stores
    monkeypatch.setattr(index_module, "TRAIN_ROWS_PER_LIST", 10)  # 3 lists: 30 of the 80 rows train it
    top = build_store_index(train, kind="ivf", nlist=3)
    assert top.index.ntotal == 80 and top.manifest["nlist"] == 3
    G, V = stored(train_g), stored(query_g)
    assert_same_top(top.search(queries, 10, nprobe=3), -sum(G[n] @ V[n].T for n in SHAPES), 10)


# --------------------------------------------------------------------------------------------------
# the compact index (learned basis, float16 codes, exact re-ranking), and score / explain --index
# --------------------------------------------------------------------------------------------------

LOW_RANK = {"a": (4, 16), "b": (16, 4), "c": (8, 8)}


def low_rank_grads(n: int, seed: int, rank: int = 3, noise: float = 1e-3) -> dict[str, torch.Tensor]:
    """Rows of rank ``rank`` per block (a fixed random basis per block, decaying coefficients) plus small
    noise: the kind of store a compact index is made for. Queries of another seed share the bases."""
    basis_gen = torch.Generator().manual_seed(123)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for j, (name, shape) in enumerate(LOW_RANK.items()):
        d = shape[0] * shape[1]
        basis = torch.randn(rank, d, generator=basis_gen, dtype=torch.float64)
        coef = torch.randn(n, rank, generator=gen, dtype=torch.float64) * torch.logspace(0, -1, rank, dtype=torch.float64)
        rows = coef @ basis * (j + 1) + noise * torch.randn(n, d, generator=gen, dtype=torch.float64)
        out[name] = rows.reshape(n, *shape)
    return out


def write_low_rank(path: Path, g: dict[str, torch.Tensor], dtype: str) -> GradientStore:
    n = next(iter(g.values())).shape[0]
    with GradientStore.create(path, blocks=LOW_RANK, n_examples=n, fingerprints=FPS, chunk_size=64,
                              dtype=dtype) as store:
        for c in store.missing_chunks():
            rows = store.chunk_rows(c)
            store.write_chunk(c, {k: v[rows.start : rows.stop].float() for k, v in g.items()})
        store.finalize()
    return GradientStore.open(path)


def held(g: dict[str, torch.Tensor], dtype: str) -> torch.Tensor:
    """The concatenated rows (n, d) a store of ``dtype`` holds, float64."""
    cast = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    return torch.cat([v.float().to(cast).double().reshape(v.shape[0], -1) for v in g.values()], dim=1)


@pytest.fixture
def low_rank(tmp_path):
    train_g, query_g = low_rank_grads(300, 0), low_rank_grads(12, 1)
    return {"train": write_low_rank(tmp_path / "train", train_g, "float16"),
            "queries": write_low_rank(tmp_path / "queries", query_g, "float32"),
            "train_g": train_g, "query_g": query_g}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("normalize", [False, True])
def test_compact_index_returns_exact_scores_and_finds_the_top_k_of_a_low_rank_store(dtype, normalize, tmp_path):
    """A compact index (9 numbers per example for 192, 3 directions a block) of a rank-3-per-block store:
    every score it returns is the row's exact score (-g . v, cosine with --normalize, float64 by hand from
    the stored values) within float32's bound, each list is ordered, and recall@10 against the exhaustive
    float64 top-10 is >= 0.95; score_store's scores of the same rows agree."""
    train_g, query_g = low_rank_grads(300, 0), low_rank_grads(12, 1)
    train = write_low_rank(tmp_path / "train", train_g, dtype)
    queries = write_low_rank(tmp_path / "queries", query_g, "float32")
    G, V = held(train_g, dtype), held(query_g, "float32")
    by_hand = -G @ V.T
    if normalize:  # cosine by the norms a store records: of the float32 gradients, before storing as float16
        by_hand = by_hand / held(train_g, "float32").norm(dim=1)[:, None] / V.norm(dim=1)[None, :]
    top = build_store_index(train, kind="compact", dim=9, candidates=2, normalize=normalize)
    assert top.manifest["dim"] == 9 and sorted(top.manifest["ranks"].values()) == [3, 3, 3]
    assert top.manifest["energy_kept"] > 0.99
    found = top.search(queries, 10)
    bound = 1e-5 * float(by_hand.abs().max())
    exhaustive = score_store(train, queries, ScoreArguments(method="identity", normalize=normalize)).scores.double()
    for kind in ("helpful", "harmful"):
        for j, hits in enumerate(found[kind]):
            assert len(hits) == 10
            values = [s for _, s in hits]
            assert values == sorted(values, reverse=(kind == "harmful"))
            for i, s in hits:
                assert abs(s - float(by_hand[i, j])) <= bound, (kind, j, i, s, float(by_hand[i, j]))
                assert abs(s - float(exhaustive[i, j])) <= bound
    recall = recall_at_k(found, hand_top(by_hand, 10))
    assert recall >= 0.95, recall
    # one direction a block keeps too little of these rows: the same candidates find fewer of the top-10
    assert recall_at_k(build_store_index(train, kind="compact", dim=3, candidates=1,
                                         normalize=normalize).search(queries, 10), hand_top(by_hand, 10)) < recall


def test_compact_index_saved_searched_from_disk_and_checked(low_rank, tmp_path, capsys):
    """`index build --kind compact --check` writes the basis beside the index and prints its recall; `index
    search` reads it back and writes the exhaustive top rows (exact scores); a changed basis file is refused
    with the rebuild command."""
    code, out, err = run(["index", "build", str(tmp_path / "train"), "--kind", "compact", "--dim", "9",
                          "--out", str(tmp_path / "ix"), "--check", str(tmp_path / "queries"), "--k", "5"], capsys)
    assert code == 0, err
    assert "x 9 numbers (of 192:" in out and "recall@5 against the exhaustive identity scores: 1.0000" in out
    manifest = json.loads((tmp_path / "ix/index.json").read_text())
    assert manifest["basis_sha256"] == hashlib.sha256((tmp_path / "ix/basis.safetensors").read_bytes()).hexdigest()
    code, out, err = run(["index", "search", str(tmp_path / "ix"), "--queries", str(tmp_path / "queries"),
                          "--k", "5"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    G, V = held(low_rank["train_g"], "float16"), held(low_rank["query_g"], "float32")
    want = top_examples(-G @ V.T, 5, method="identity")
    key = ("query", "kind", "rank", "train_index")
    assert [tuple(r[c] for c in key) for r in rows] == [tuple(r[c] for c in key) for r in want]
    bound = 1e-5 * float((G @ V.T).abs().max())
    assert all(abs(a["score"] - b["score"]) <= bound for a, b in zip(rows, want))
    basis = tmp_path / "ix/basis.safetensors"
    basis.write_bytes(basis.read_bytes()[:-4] + b"\x00\x00\x80\x3f")
    before = sha(tmp_path / "ix", tmp_path / "train")
    line = refused(["index", "search", str(tmp_path / "ix"), "--queries", str(tmp_path / "queries")], capsys,
                   "basis.safetensors", "does not match the sha256")
    assert "--kind compact --dim 9 --candidates 2" in line
    assert sha(tmp_path / "ix", tmp_path / "train") == before


def test_score_with_an_index_writes_the_top_rows_of_the_full_pass(low_rank, tmp_path, capsys):
    """`score --index INDEX --top K` writes the rows `top` writes from the exhaustive scores (flat: exact
    lists; compact: the same lists on this low-rank store), as JSON lines or CSV."""
    train, queries = low_rank["train"], low_rank["queries"]
    exhaustive = score_store(train, queries, ScoreArguments(method="identity")).scores
    want = top_examples(exhaustive, 6, method="identity")
    key = ("method", "query", "kind", "rank", "train_index")
    bound = 1e-5 * float(exhaustive.abs().max())
    for kind in ("flat", "compact"):
        save_index(build_store_index(train, kind=kind, dim=9), tmp_path / f"ix-{kind}")
        code, out, err = run(["score", "--store", str(tmp_path / "train"), "--queries", str(tmp_path / "queries"),
                              "--method", "identity", "--index", str(tmp_path / f"ix-{kind}"), "--top", "6",
                              "--out", str(tmp_path / f"top-{kind}.jsonl")], capsys)
        assert code == 0, err
        rows = [json.loads(line) for line in (tmp_path / f"top-{kind}.jsonl").read_text().splitlines()]
        assert [tuple(r[c] for c in key) for r in rows] == [tuple(r[c] for c in key) for r in want], kind
        assert all(abs(a["score"] - b["score"]) <= bound for a, b in zip(rows, want))
    code, _, err = run(["score", "--store", str(tmp_path / "train"), "--queries", str(tmp_path / "queries"),
                        "--method", "identity", "--index", str(tmp_path / "ix-compact"), "--top", "6",
                        "--out", str(tmp_path / "top.csv")], capsys)
    assert code == 0, err
    assert (tmp_path / "top.csv").read_text().splitlines()[0].startswith("method,query,kind,rank,train_index,score")


def test_score_with_a_stale_or_mismatched_index_is_refused(low_rank, tmp_path, capsys):
    """A stale index (store rewritten), an index of another method (plain store asked for DataInf: how to
    precondition; an identity index asked for normalized scores: the rebuild command), and --top without
    --index: exit 2, one error line, no output written, inputs unchanged."""
    train = low_rank["train"]
    save_index(build_store_index(train, kind="compact", dim=9), tmp_path / "ix")
    out = tmp_path / "top.jsonl"
    base = ["score", "--store", str(tmp_path / "train"), "--queries", str(tmp_path / "queries"), "--top", "5",
            "--out", str(out)]
    before = sha(tmp_path / "train", tmp_path / "queries", tmp_path / "ix")
    refused([*base, "--index", str(tmp_path / "ix"), "--method", "datainf"], capsys,
            f"datainf store precondition --method datainf {tmp_path / 'train'} PRE")
    line = refused([*base, "--index", str(tmp_path / "ix"), "--method", "identity", "--normalize"], capsys,
                   "gives identity scores, not identity normalized")
    assert f"datainf index build {tmp_path / 'train'} --method identity --kind compact --normalize --dim 9" in line
    refused([*base, "--method", "identity"], capsys, "--index INDEX and --top K go together")
    refused([*base, "--index", str(tmp_path / "ix"), "--method", "identity", "--mean-query"], capsys,
            "need the full pass")
    assert sha(tmp_path / "train", tmp_path / "queries", tmp_path / "ix") == before
    import shutil

    shutil.rmtree(tmp_path / "train")
    write_low_rank(tmp_path / "train", low_rank_grads(300, 7), "float16")
    before = sha(tmp_path / "train", tmp_path / "queries", tmp_path / "ix")
    line = refused([*base, "--index", str(tmp_path / "ix"), "--method", "identity"], capsys, "is stale")
    assert f"datainf index build {tmp_path / 'train'} --method identity --kind compact --dim 9" in line
    assert sha(tmp_path / "train", tmp_path / "queries", tmp_path / "ix") == before
    assert not out.exists()


def test_score_with_an_index_of_a_preconditioned_store(stores, tmp_path, capsys):
    """An index of a store preconditioned for DataInf answers `score --method datainf --index` with the
    exhaustive DataInf lists of the plain store, and refuses `--method identity` (how to score it instead)."""
    train, queries, _, _ = stores
    pre = precondition_store(train, tmp_path / "pre", ScoreArguments(method="datainf"), dtype="float32")
    save_index(build_store_index(pre), tmp_path / "ix")
    code, _, err = run(["score", "--store", str(tmp_path / "pre"), "--queries", str(tmp_path / "queries"),
                        "--method", "datainf", "--index", str(tmp_path / "ix"), "--top", "4",
                        "--out", str(tmp_path / "top.jsonl")], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "top.jsonl").read_text().splitlines()]
    want = top_examples(score_store(train, queries, ScoreArguments(method="datainf")).scores, 4, method="datainf")
    key = ("query", "kind", "rank", "train_index")
    assert [tuple(r[c] for c in key) for r in rows] == [tuple(r[c] for c in key) for r in want]
    refused(["score", "--store", str(tmp_path / "pre"), "--queries", str(tmp_path / "queries"), "--method",
             "identity", "--index", str(tmp_path / "ix"), "--top", "4", "--out", str(tmp_path / "other.jsonl")],
            capsys, "preconditioned for 'datainf', not 'identity'")
    assert not (tmp_path / "other.jsonl").exists()



@pytest.fixture(scope="module")
def llm(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama of conftest fine-tuned for one epoch on 6 prompt/response examples (a LoRA adapter), and
    the float64 store of their gradients."""
    from cli_helpers import write_jsonl
    from datainf.cli import main
    from datainf.data.generation import make_task

    root = tmp_path_factory.mktemp("index-explain")
    data = write_jsonl(root / "train.jsonl", make_task("sentences", classes=2, per_class=3, seed=0))
    for argv in (["finetune", "--task", "causal_lm", "--model", str(tiny_llama_dir), "--train", str(data), "--out",
                  str(root / "adapter"), "--epochs", "1", "--rank", "2", "--lr", "1e-2", "--device", "cpu"],
                 ["grads", "--task", "causal_lm", "--model", str(tiny_llama_dir), "--adapter", str(root / "adapter"),
                  "--data", str(data), "--store", str(root / "store"), "--dtype", "float64", "--model-dtype",
                  "float64", "--chunk-size", "4", "--device", "cpu"]):
        with pytest.raises(SystemExit) as e:
            main(["--quiet", *argv])
        assert e.value.code == 0, argv
    return {"model": tiny_llama_dir, "adapter": root / "adapter", "store": root / "store"}


def test_explain_with_an_index_lists_what_the_full_pass_does(llm, tmp_path, capsys):
    """`explain --index` (a flat identity index of the store) writes the rows the full pass writes (same
    examples and ranks, scores to float32); an index asked for another method is refused before the model
    loads, nothing written."""
    save_index(build_store_index(GradientStore.open(llm["store"])), tmp_path / "ix")
    base = ["explain", "--model", str(llm["model"]), "--adapter", str(llm["adapter"]), "--store", str(llm["store"]),
            "--prompt", "the old fox finds the", "--response", "book", "--k", "2", "--model-dtype", "float64",
            "--device", "cpu"]
    got = {}
    for name, extra in (("full", []), ("index", ["--index", str(tmp_path / "ix")])):
        code, _, err = run([*base, "--method", "identity", *extra, "--json", str(tmp_path / f"{name}.json")], capsys)
        assert code == 0, err
        got[name] = json.loads((tmp_path / f"{name}.json").read_text())["answers"][0]["rows"]
    key = ("method", "kind", "rank", "train_index")
    assert [tuple(r[c] for c in key) for r in got["index"]] == [tuple(r[c] for c in key) for r in got["full"]]
    assert len(got["full"]) >= 2
    bound = 1e-5 * max(abs(r["score"]) for r in got["full"])
    assert all(abs(a["score"] - b["score"]) <= bound for a, b in zip(got["index"], got["full"]))
    before = sha(llm["store"], tmp_path / "ix")
    refused([*base, "--method", "datainf", "--index", str(tmp_path / "ix"), "--json", str(tmp_path / "no.json")],
            capsys, "datainf store precondition --method datainf")
    assert not (tmp_path / "no.json").exists() and sha(llm["store"], tmp_path / "ix") == before


def test_compact_reranking_with_few_memory_maps_kept_scores_the_same(low_rank, monkeypatch):
    """With at most 2 chunk files kept mapped (of 15), the re-ranking reads the same rows: the same lists and
    scores as with every file kept."""
    import datainf.index as index_module

    train, queries = low_rank["train"], low_rank["queries"]
    want = build_store_index(train, kind="compact", dim=9).search(queries, 8)
    monkeypatch.setattr(index_module.StoreRows, "MAX_MAPS", 2)
    top = build_store_index(train, kind="compact", dim=9)
    assert top.search(queries, 8) == want
    assert len(top._rows.maps) <= 2
