"""Every method streams a store twice as large as the memory it may use, and a preconditioned store answers
with the method's own scores.

As in tests/test_out_of_core.py: a child process imports torch and datainf, then caps its address space
(RLIMIT_AS) at that baseline + CAP_MB; the store holds 2 * CAP_MB of float32 gradients, so a method that held
more than a chunk per block plus its own O(d^2) or O(n_query d) state (or the n x n Gram matrix, 30720^2
floats) would fail. A control child shows that reading the whole store under the cap does fail. Memory maps
count towards RLIMIT_AS, so this also checks that reads map one chunk file at a time.

Here the blocks are small (d = 1024) and n = 30,720 > d: the shape of a large store of LoRA blocks, where
exact must take its d x d route and datainf's self-influence its d x d matrix.
"""

from __future__ import annotations

import json
import textwrap
import warnings

import pytest
import torch

import datainf
from capped_child import PRELUDE, run_capped
from datainf.errors import DataInfError
from datainf.estimators import ScoreArguments
from datainf.estimators.kfac import curvature_from_gradients
from datainf.scoring import PRECONDITIONABLE, precondition_store, preconditioned, score_store
from datainf.store import GradientStore
from reference import FLOAT32_TOL, FLOAT64_TOL, assert_close_to
from stores import write_store

CAP_MB = 120
N, CHUNK = 30720, 1024
SHAPES = {"lora_A": (16, 64), "lora_B": (64, 16)}  # 2 blocks of 1,024 values: 30720 * 2048 * 4 B = 252 MB
N_QUERY = 4
LISSA = {"iterations": 2, "scale": 1.0}  # two steps (each two passes); a fixed scale skips the power iteration

CHILD = PRELUDE + textwrap.dedent(
    """
    import time, warnings
    import datainf
    from datainf.estimators import ScoreArguments
    from datainf.scoring import precondition_store, score_store
    from datainf.store import GradientStore

    mode, store_path, query_path, out_path, cap_mb, lissa = sys.argv[1:7]
    queries = torch.load(query_path)
    store = GradientStore.open(store_path)
    base = cap_address_space(cap_mb)
    if mode == "load":  # the control: the store does not fit under the cap
        try:
            whole = {name: store.load(name) for name in store.block_names}
            print(json.dumps({"loaded": True}))
        except (MemoryError, RuntimeError, OSError) as e:  # an allocation or a memory map refused
            print(json.dumps({"loaded": False, "error": type(e).__name__}))
        sys.exit(0)
    results, seconds = {}, {}
    warnings.simplefilter("ignore")
    for method in ("datainf", "exact", "identity", "kfac", "ekfac", "lissa"):
        options = json.loads(lissa) if method == "lissa" else {}
        for kind in ("influence", "self"):
            if kind == "self" and method == "lissa":
                continue  # its recursion per chunk of training rows: n / chunk times the cost, not memory
            t0 = time.perf_counter()
            try:
                r = score_store(store, queries if kind == "influence" else None,
                                ScoreArguments(method=method, options=options))
            except (MemoryError, RuntimeError, OSError) as e:
                print(json.dumps({"failed": f"{method} {kind}: {type(e).__name__}: {e}"}))
                sys.exit(0)
            results[f"{method}/{kind}"] = r.scores
            seconds[f"{method}/{kind}"] = time.perf_counter() - t0
    pre = precondition_store(store, out_path + ".ekfac", ScoreArguments(method="ekfac"))
    results["ekfac/preconditioned"] = score_store(pre, queries, ScoreArguments(method="ekfac")).scores
    torch.save(results, out_path)
    print(json.dumps({"peak_above_baseline_mb": (vm_bytes("VmPeak") - base) / 2**20, "seconds": seconds}))
    """
)


def _run_child(*args: str) -> dict:
    return run_capped(CHILD, *args, timeout=900)


@pytest.fixture(scope="module")
def big_store(tmp_path_factory):
    """A 252 MB float32 store of n = 30,720 examples, the same gradients in memory, and 4 queries."""
    folder = tmp_path_factory.mktemp("streaming")
    g = torch.Generator().manual_seed(0)
    grads = {name: torch.empty(N, *shape) for name, shape in SHAPES.items()}
    basis = {name: torch.randn(32, *shape, generator=g) for name, shape in SHAPES.items()}  # a decaying spectrum
    spectrum = torch.logspace(0, -2, 32)
    with GradientStore.create(folder / "store", blocks=SHAPES, n_examples=N, fingerprints={"model": "synthetic"},
                              chunk_size=CHUNK) as store:
        for c in range(store.num_chunks):
            rows = store.chunk_rows(c)
            chunk = {}
            for name, shape in SHAPES.items():
                coef = torch.randn(len(rows), 32, generator=g) * spectrum
                chunk[name] = 0.01 * (torch.einsum("nk,k...->n...", coef, basis[name])
                                      + 0.05 * torch.randn(len(rows), *shape, generator=g))
                grads[name][rows.start : rows.stop] = chunk[name]
            store.write_chunk(c, chunk)
        store.finalize()
    queries = {name: grads[name][:N_QUERY].clone() + 0.001 * torch.randn(N_QUERY, *s, generator=g)
               for name, s in SHAPES.items()}
    torch.save(queries, folder / "queries.pt")
    size = sum(p.stat().st_size for p in (folder / "store").rglob("*.npy"))
    assert size >= 2 * CAP_MB * 2**20
    return folder, grads, queries


def test_the_cap_is_smaller_than_the_store(big_store):
    folder, _, _ = big_store
    result = _run_child("load", str(folder / "store"), str(folder / "queries.pt"), "-", str(CAP_MB), "{}")
    assert result == {"loaded": False, "error": result.get("error")}


def test_every_method_streams_under_the_cap(big_store):
    """Influence (4 queries) and self-influence of every method, and an EK-FAC preconditioned store, under
    the cap; each equals the same method on the gradients in memory (float32 both: FLOAT32_TOL)."""
    folder, grads, queries = big_store
    out = folder / "scores.pt"
    info = _run_child("all", str(folder / "store"), str(folder / "queries.pt"), str(out), str(CAP_MB),
                      json.dumps(LISSA))
    assert "failed" not in info, info
    assert info["peak_above_baseline_mb"] <= CAP_MB
    streamed = torch.load(out)
    curvature = curvature_from_gradients(grads)
    for key, got in streamed.items():
        method, kind = key.split("/")
        extra = {"factors": curvature} if method in ("kfac", "ekfac") else {}
        options = LISSA if method == "lissa" else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = (datainf.self_influence(grads, method, **options, **extra) if kind == "self"
                    else datainf.influence(grads, queries, method, **options, **extra))
        assert_close_to(got, want, tol=FLOAT32_TOL, what=key)


# ------------------------------------------------------------------------------------------------ small stores
def _small_store(path, n=40, shapes=None, dtype="float64", seed=0):
    shapes = shapes or {"w": (6, 10), "b": (6,)}
    g = torch.Generator().manual_seed(seed)
    grads = {k: torch.randn(n, *s, generator=g, dtype=torch.float64) * (0.1 + i) for i, (k, s) in enumerate(shapes.items())}
    return write_store(path, grads, chunk_size=16, dtype=dtype), grads


@pytest.mark.parametrize("method", PRECONDITIONABLE)
@pytest.mark.parametrize("n", [40, 8])  # d = 60 <= n (datainf's d x d route, exact's Cholesky) and n < d (Gram)
def test_a_preconditioned_store_gives_the_methods_scores(tmp_path, method, n):
    store, grads = _small_store(tmp_path / "s", n=n)
    queries = {k: torch.randn(3, *v.shape[1:], dtype=torch.float64) for k, v in grads.items()}
    args = ScoreArguments(method=method)
    direct = score_store(store, queries, args)
    pre = precondition_store(store, tmp_path / "pre", args)
    info = preconditioned(pre)
    assert info["method"] == method and set(info["damping"]) == {"w", "b"}
    assert pre.fingerprints == store.fingerprints and pre.records() == store.records()
    fast = score_store(pre, queries, args)
    assert_close_to(fast.scores, direct.scores, tol=FLOAT64_TOL, what=f"{method} preconditioned")
    assert fast.damping == pytest.approx(direct.damping)
    mean = score_store(pre, queries, args.replace(mean_query=True)).scores
    assert_close_to(mean, score_store(store, queries, args.replace(mean_query=True)).scores, tol=FLOAT64_TOL)


def test_a_preconditioned_store_refuses_what_it_cannot_answer(tmp_path):
    store, grads = _small_store(tmp_path / "s")
    queries = {k: torch.randn(2, *v.shape[1:], dtype=torch.float64) for k, v in grads.items()}
    pre = precondition_store(store, tmp_path / "pre", ScoreArguments(method="exact"))
    for args, message in ((ScoreArguments(method="datainf"), "preconditioned for 'exact'"),
                          (ScoreArguments(method="exact", normalize=True), "normalized"),
                          (ScoreArguments(method="exact", damping=123.0), "damping")):
        with pytest.raises(DataInfError, match=message):
            score_store(pre, queries, args)
    with pytest.raises(DataInfError, match="self-influence needs the original"):
        score_store(pre, None, ScoreArguments(method="exact"))
    with pytest.raises(DataInfError, match="preconditioned training gradients, not query"):
        score_store(store, pre, ScoreArguments(method="exact"))
    with pytest.raises(DataInfError, match="cannot be precomputed"):
        precondition_store(store, tmp_path / "lissa", ScoreArguments(method="lissa"))
    with pytest.raises(DataInfError, match="not empty"):
        precondition_store(store, tmp_path / "pre", ScoreArguments(method="exact"))
    with pytest.raises(DataInfError, match="already preconditioned"):
        precondition_store(pre, tmp_path / "again", ScoreArguments(method="exact"))


def test_preconditioning_onto_a_disk_without_room_is_refused_before_anything_is_staged(tmp_path, monkeypatch):
    """Staged rows plus the new store: twice n x (60 + 6 entries x 8 bytes + 2 squared norms x 8 bytes)."""
    import shutil

    import datainf.store.gradient_store as gradient_store

    store, _ = _small_store(tmp_path / "s", n=40)
    need = 2 * 40 * ((60 + 6) * 8 + 2 * 8)
    real = shutil.disk_usage
    monkeypatch.setattr(gradient_store.shutil, "disk_usage", lambda p: real(p)._replace(free=need - 1))
    with pytest.raises(DataInfError, match=f"need {gradient_store._size(need)}, and the disk has"):
        precondition_store(store, tmp_path / "pre", ScoreArguments(method="identity"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # nothing staged, no store
    monkeypatch.setattr(gradient_store.shutil, "disk_usage", lambda p: real(p)._replace(free=need))
    assert precondition_store(store, tmp_path / "pre", ScoreArguments(method="identity")).complete


def test_float16_preconditioned_store_stays_in_range(tmp_path):
    """lambda P g is stored (eigenvalues of lambda P in (0, 1]), so even a float16 store of gradients whose
    P g would overflow float16 is written, and scores within float16 rounding of float64."""
    store, grads = _small_store(tmp_path / "s", n=64, dtype="float16")
    queries = {k: torch.randn(2, *v.shape[1:], dtype=torch.float64) for k, v in grads.items()}
    pre = precondition_store(store, tmp_path / "pre", ScoreArguments(method="ekfac"))
    assert pre.storage_dtype == "float16"
    assert_close_to(score_store(pre, queries, ScoreArguments(method="ekfac")).scores,
                    score_store(store, queries, ScoreArguments(method="ekfac")).scores, tol=5e-3, what="float16")


def test_cli_store_precondition_and_info(tmp_path, capsys):
    from datainf.cli import main

    store, grads = _small_store(tmp_path / "s")
    for argv in (["store", "precondition", "--method", "ekfac", str(tmp_path / "s"), str(tmp_path / "pre")],
                 ["store", "info", str(tmp_path / "pre")]):
        with pytest.raises(SystemExit) as e:
            main(["--quiet", *argv])
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "preconditioned by ekfac" in out and "preconditioned for ekfac from" in out and "projection: none" in out


def test_exact_takes_the_d_by_d_route_for_many_examples_and_refuses_a_huge_matrix(monkeypatch):
    from datainf.estimators import BlockRows
    from datainf.estimators import exact as exact_module

    many = BlockRows("w", torch.randn(300, 20), torch.float32, torch.device("cpu"), 64)
    assert not exact_module.Exact(many, 0.1, torch.ones(300)).gram_route  # n > d: d x d, never n x n
    few = BlockRows("w", torch.randn(10, 20), torch.float32, torch.device("cpu"), 64)
    assert exact_module.Exact(few, 0.1, torch.ones(10)).gram_route
    monkeypatch.setattr(exact_module, "MAX_MATRIX_BYTES", 20 * 20 * 4 - 1)
    with pytest.raises(DataInfError, match=r"d x d matrix \(20 x 20\).*--project K"):
        exact_module.Exact(many, 0.1, torch.ones(300))


def test_exact_on_its_d_by_d_route_is_scored_in_the_one_pass_and_equals_a_dense_solve(monkeypatch):
    """With n > d exact's scores are -G (V H^{-1})^T: the scoring path preconditions the queries and takes the
    product in its one sweep (stream_dots) instead of block by block; the scores equal a float64 dense solve
    of (G^T G / n + lambda I) per block. With n < d (the Gram route) the block is scored on its own."""
    from datainf.estimators import blocks as blocks_module
    from datainf.estimators import exact as exact_module
    from datainf.estimators import score

    gen = torch.Generator().manual_seed(3)
    grads = {"a": torch.randn(50, 6, generator=gen, dtype=torch.float64),
             "b": torch.randn(50, 3, 4, generator=gen, dtype=torch.float64)}
    queries = {k: torch.randn(3, *v.shape[1:], generator=gen, dtype=torch.float64) for k, v in grads.items()}
    swept, own = [], []
    real_stream = blocks_module.stream_dots
    monkeypatch.setattr("datainf.estimators.stream_dots",
                        lambda parts: swept.extend(b.name for b, _ in parts) or real_stream(parts))
    real_scores = exact_module.Exact.scores
    monkeypatch.setattr(exact_module.Exact, "scores", lambda self, V: own.append(self.block.name) or real_scores(self, V))
    lam = 0.05
    got = score(grads, queries, ScoreArguments(method="exact", damping=lam)).scores
    assert sorted(swept) == ["a", "b"] and own == []
    expected = torch.zeros(50, 3, dtype=torch.float64)
    for name, g in grads.items():
        G, V = g.reshape(50, -1), queries[name].reshape(3, -1)
        H = G.T @ G / 50 + lam * torch.eye(G.shape[1], dtype=torch.float64)
        expected -= G @ torch.linalg.solve(H, V.T)
    assert_close_to(got, expected, FLOAT64_TOL)
    few = {k: v[:4] for k, v in grads.items()}  # n = 4 < d: the Gram route, scored block by block
    swept.clear()
    score(few, queries, ScoreArguments(method="exact", damping=lam))
    assert sorted(own) == ["a", "b"] and swept == []


def test_curvature_fit_is_timed_broken_down_and_cached(tmp_path):
    store, grads = _small_store(tmp_path / "s", n=40)
    queries = {k: torch.randn(2, *v.shape[1:], dtype=torch.float64) for k, v in grads.items()}
    first = score_store(store, queries, ScoreArguments(method="ekfac"))
    fit = first.diagnostics["curvature_fit"]
    assert not fit["cached"] and set(fit["breakdown"]) == {"basis_pass_s", "eigh_s", "correct_pass_s"}
    assert first.curvature_seconds >= sum(fit["breakdown"].values()) * 0.99
    assert first.seconds >= first.curvature_seconds
    again = score_store(store, queries, ScoreArguments(method="ekfac")).diagnostics["curvature_fit"]
    assert again["cached"] and again["breakdown"] == fit["breakdown"] and again["fit_seconds"] == fit["fit_seconds"]


@pytest.mark.parametrize("method", ["datainf", "exact", "identity", "lissa", "ekfac"])
def test_rows_read_from_a_store_come_in_small_buffers_and_score_the_same(tmp_path, monkeypatch, method):
    """Rows materialized from a store are read in chunks of at most ROW_BUFFER_BYTES (a fresh 38 MB buffer per
    chunk cost a page fault per 4 kB); capped to 3 rows here, every method's scores and self-influence equal
    the same method on the gradients held in memory (whose chunks are views and keep chunk_size)."""
    import datainf.estimators.blocks as blocks_module
    from datainf.store.blocks import StoredBlock

    store, grads = _small_store(tmp_path / "s", n=40)
    monkeypatch.setattr(blocks_module, "ROW_BUFFER_BYTES", 3 * 60 * 8)  # 3 rows of the 60-wide float64 block
    sizes = []
    real = StoredBlock.__getitem__

    def spy(self, rows):
        out = real(self, rows)
        sizes.append((self.name, out.shape[0]))
        return out

    real_into = StoredBlock.read_into

    def spy_into(self, rows, out, **kw):  # the one-query pass reads into one reused buffer (per thread)
        view = real_into(self, rows, out, **kw)
        sizes.append((self.name, view.shape[0]))
        return view

    monkeypatch.setattr(StoredBlock, "__getitem__", spy)
    monkeypatch.setattr(StoredBlock, "read_into", spy_into)
    queries = {k: torch.randn(3, *v.shape[1:], dtype=torch.float64) for k, v in grads.items()}
    options = {"iterations": 50} if method == "lissa" else {}
    args = ScoreArguments(method=method, chunk_size=16, options=options)
    got, got_self = score_store(store, queries, args).scores, score_store(store, None, args).scores
    assert sizes and max(s for name, s in sizes if name == "w") == 3
    assert max(s for name, s in sizes if name == "b") == 16  # 6 wide: 16 rows fit the cap
    flat = {k: v.reshape(v.shape[0], -1) for k, v in grads.items()}
    if method == "ekfac":  # fitted on the in-memory gradients (views: never capped)
        options = {"factors": curvature_from_gradients(flat, shapes=store.block_shapes)}
    want = datainf.influence(flat, {k: v.reshape(3, -1) for k, v in queries.items()}, method, **options)
    assert_close_to(got, want, tol=FLOAT64_TOL, what=method)
    assert_close_to(got_self, datainf.self_influence(flat, method, **options), tol=FLOAT64_TOL, what=f"{method}, self")
