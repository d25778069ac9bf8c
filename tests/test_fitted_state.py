"""The per-method fit hook (issue 30) and DataInf / exact in one pass (issue 32).

A method that fits a query-independent state once (``Estimator.fit``) gets it cached inside the training
store (checksummed, fingerprinted by the store and the settings the state depends on, moved aside and
refitted when its bytes change, checked by ``datainf store verify``). Checked here with a toy method added
in one class (a diagonal preconditioner fitted from the store) and with DataInf's and exact's d x d states,
each against a dense float64 computation written in the test, and against the path without a state.

Bounds: float64 stores are compared at ``FLOAT64_TOL`` (rounding only). DataInf on a float32 store is
compared with the dense float64 reference at ``FLOAT32_TOL`` (1e-3 of the largest score: see
tests/reference.py; each score here accumulates under 500 float32 products), and with today's float32 path
(no state) at 1e-4 of the largest score: both round the same sums in float32, in another order, so they
differ by at most a few units of 6e-8 per accumulated term (under 500 terms: < 3e-5), while a wrong
damping, a dropped 1/n or a transposed matrix moves the scores by far more than 1e-2.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import datainf  # noqa: E402
from cli_helpers import hashes, refused  # noqa: E402
from cli_helpers import run_cli as run  # noqa: E402
from datainf.estimators import Estimator, FittedState, ScoreArguments, register, unregister  # noqa: E402
from datainf.scoring import score_store  # noqa: E402
from datainf.store import GradientStore  # noqa: E402
from datainf.store.blocks import StoredBlock  # noqa: E402
from reference import FLOAT32_TOL, assert_close_to  # noqa: E402

SHAPES = {"w": (6, 10), "b": (6,)}
N = 64  # > d of every block, so that exact takes its d x d route
TOY = "toy-diagonal"
TOY_FILE = "fitted-toy-diagonal.safetensors"
VS_TODAY_TOL = 1e-4


def make_store(path: Path, *, dtype: str = "float64", seed: int = 0, model: str = "m"
               ) -> tuple[GradientStore, dict[str, torch.Tensor]]:
    """A finished store of seeded random gradients (float64 values stored as ``dtype``), chunks of 8 rows."""
    g = torch.Generator().manual_seed(seed)
    grads = {k: torch.randn(N, *s, generator=g, dtype=torch.float64) * (0.1 + i) for i, (k, s) in enumerate(SHAPES.items())}
    with GradientStore.create(path, blocks=SHAPES, n_examples=N, fingerprints={"model": model, "task": "t"},
                              chunk_size=8, dtype=dtype, meta={"task": "classification"}) as store:
        for c in range(store.num_chunks):
            rows = store.chunk_rows(c)
            store.write_chunk(c, {k: v[rows.start : rows.stop] for k, v in grads.items()})
        store.write_records([{"text": f"example {i}", "label": i % 2} for i in range(N)])
        store.finalize()
    if dtype != "float64":  # the values the store holds, as the reference must see them
        grads = {k: v.to(getattr(torch, dtype)).double() for k, v in grads.items()}
    return GradientStore.open(path), grads


def queries_for(seed: int = 1, m: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(m, *s, generator=g, dtype=torch.float64) for k, s in SHAPES.items()}


def flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).double()


def paper_lambda(G: torch.Tensor) -> float:
    return 0.1 * float((G * G).sum(1).mean()) / G.shape[1]


# --------------------------------------------------------------------------------------------------
# a toy method with a fitted state, in one class
# --------------------------------------------------------------------------------------------------

FITS: list[str] = []


@pytest.fixture
def toy():
    """A diagonal preconditioner fitted once from the store (diag = mean of g^2 per entry), registered for
    the test and unregistered after it."""

    @register
    class ToyDiagonal(Estimator):
        name = TOY
        summary = "diagonal of the block Fisher, fitted once from the store"
        scale_power = 0
        state_file = TOY_FILE

        @classmethod
        def fit(cls, train, arguments):
            FITS.append(cls.name)
            tensors = {}
            for name, g in train:
                total = torch.zeros(g.shape[1], dtype=torch.float64)
                for s in range(0, g.shape[0], 16):
                    rows = g[s : s + 16].double()
                    total += (rows * rows).sum(0)
                tensors[f"{name}::diag"] = total / g.shape[0]
            return FittedState(tensors, {"what": "mean of g^2 per entry"})

        def setup(self):
            self.diag = self.shared.tensors[f"{self.block.name}::diag"].to(self.block.dtype)

        def precondition(self, V):
            return V / (self.diag + self.damping)

    FITS.clear()
    yield ToyDiagonal
    unregister(TOY)


def dense_toy(grads: dict[str, torch.Tensor], queries: dict[str, torch.Tensor]) -> torch.Tensor:
    """-sum_l V_l diag(mean g^2 + lambda_l)^{-1} G_l^T, in float64."""
    total = 0
    for name in grads:
        G, V = flat(grads[name]), flat(queries[name])
        total = total - G @ (V / ((G * G).mean(0) + paper_lambda(G))).T
    return total


def test_a_toy_fitted_state_is_fitted_once_cached_and_scores_exactly(toy, tmp_path):
    store, grads = make_store(tmp_path / "s")
    queries = queries_for()
    want = dense_toy(grads, queries)
    first = score_store(store, queries, ScoreArguments(method=TOY))
    assert FITS == [TOY] and (tmp_path / "s" / TOY_FILE).is_file()
    assert not first.diagnostics["curvature_fit"]["cached"]
    assert_close_to(first.scores, want, what="toy method, state fitted now")
    again = score_store(GradientStore.open(tmp_path / "s"), queries, ScoreArguments(method=TOY))
    assert FITS == [TOY], "the second call refitted instead of reading the cache"
    assert again.diagnostics["curvature_fit"]["cached"]
    assert_close_to(again.scores, want, what="toy method, cached state")


def test_a_tampered_toy_cache_is_reported_by_verify_and_refitted_by_scoring(toy, tmp_path, capsys):
    store, grads = make_store(tmp_path / "s")
    queries = queries_for()
    score_store(store, queries, ScoreArguments(method=TOY))
    cache = tmp_path / "s" / TOY_FILE
    code, out, err = run(["store", "verify", str(tmp_path / "s")], capsys)
    assert code == 0 and TOY_FILE in out, (out, err)
    data = bytearray(cache.read_bytes())
    data[-3] ^= 0x10  # one bit of the last tensor's bytes
    cache.write_bytes(bytes(data))
    before = hashes(tmp_path / "s")
    refused(["store", "verify", str(tmp_path / "s")], capsys, TOY_FILE, "checksum", f"--method {TOY}")
    assert hashes(tmp_path / "s") == before
    again = score_store(GradientStore.open(tmp_path / "s"), queries, ScoreArguments(method=TOY))
    assert FITS == [TOY, TOY] and not again.diagnostics["curvature_fit"]["cached"]
    assert_close_to(again.scores, dense_toy(grads, queries), what="toy method after tampering")
    aside = list((tmp_path / "s").glob(f".{TOY_FILE}.corrupt-*"))  # moved aside, never deleted
    assert len(aside) == 1 and hashlib.sha256(aside[0].read_bytes()).hexdigest() == before[str(cache)]
    code, _, err = run(["store", "verify", str(tmp_path / "s")], capsys)
    assert code == 0, err


def test_a_cache_made_for_other_gradients_is_refitted_not_used(toy, tmp_path):
    make_store(tmp_path / "a", seed=0)
    store_b, grads_b = make_store(tmp_path / "b", seed=5, model="m2")
    queries = queries_for()
    score_store(GradientStore.open(tmp_path / "a"), queries, ScoreArguments(method=TOY))
    shutil.copy(tmp_path / "a" / TOY_FILE, tmp_path / "b" / TOY_FILE)  # a cache of another store's gradients
    got = score_store(store_b, queries, ScoreArguments(method=TOY))
    assert FITS == [TOY, TOY] and not got.diagnostics["curvature_fit"]["cached"]
    assert_close_to(got.scores, dense_toy(grads_b, queries), what="toy method on store b")


# --------------------------------------------------------------------------------------------------
# DataInf and exact: their d x d states
# --------------------------------------------------------------------------------------------------


def dense_datainf(grads, queries, damping=None):
    """DataInf in float64 from its formula: R_l = (I - (1/n) sum_i g_i g_i^T / (lambda + |g_i|^2)) / lambda,
    scores = -sum_l G_l R_l V_l^T; self-influence -g_k^T R_l g_k."""
    scores, selfs = 0, 0
    for name in grads:
        G, V = flat(grads[name]), flat(queries[name])
        n, d = G.shape
        lam = paper_lambda(G) if damping is None else damping
        w = 1.0 / (lam + (G * G).sum(1))
        R = (torch.eye(d, dtype=torch.float64) - (G.T * w) @ G / n) / lam
        scores = scores - G @ R @ V.T
        selfs = selfs - ((G @ R) * G).sum(1)
    return scores, selfs


def dense_exact(grads, queries):
    scores = 0
    for name in grads:
        G, V = flat(grads[name]), flat(queries[name])
        n, d = G.shape
        H = G.T @ G / n + paper_lambda(G) * torch.eye(d, dtype=torch.float64)
        scores = scores - G @ torch.linalg.solve(H, V.T)
    return scores


@pytest.fixture
def rows_read(monkeypatch):
    """Count the training rows read from stores (every StoredBlock read)."""
    count = [0]
    original, original_into = StoredBlock.__getitem__, StoredBlock.read_into

    def counting(self, rows):  # index reads; slices (and single rows) are counted by read_into
        out = original(self, rows)
        if not isinstance(rows, (slice, int)):
            count[0] += out.shape[0]
        return out

    def counting_into(self, rows, out, **kw):  # every slice read, the pass's buffer reads included
        view = original_into(self, rows, out, **kw)
        count[0] += view.shape[0]
        return view

    monkeypatch.setattr(StoredBlock, "__getitem__", counting)
    monkeypatch.setattr(StoredBlock, "read_into", counting_into)
    return count


def test_datainf_with_its_cached_matrix_equals_dense_float64_and_todays_path_in_one_pass(tmp_path, rows_read):
    store, grads = make_store(tmp_path / "s", dtype="float32")
    queries = queries_for()
    want, want_self = dense_datainf(grads, queries)
    arguments = ScoreArguments(method="datainf")
    first = score_store(store, queries, arguments)
    assert (tmp_path / "s" / "fitted-datainf.safetensors").is_file()
    today = datainf.influence(store.blocks(), {k: v.float() for k, v in queries.items()})  # no state: two passes
    rows_read[0] = 0
    cached = score_store(GradientStore.open(tmp_path / "s"), queries, arguments)
    assert cached.diagnostics["curvature_fit"]["cached"]
    assert rows_read[0] == N * len(SHAPES), "a query with the cached matrix should read every row once"
    for got, what in ((first.scores, "fitted now"), (cached.scores, "cached")):
        assert got.dtype == torch.float32
        assert_close_to(got, want, FLOAT32_TOL, what=f"datainf {what} vs dense float64")
        assert_close_to(got, today, VS_TODAY_TOL, what=f"datainf {what} vs the path without a state")
    selfs = score_store(GradientStore.open(tmp_path / "s"), None, arguments).scores
    assert_close_to(selfs, want_self, FLOAT32_TOL, what="datainf self-influence through the cached matrix")
    normalized = score_store(GradientStore.open(tmp_path / "s"), queries, arguments.replace(normalize=True)).scores
    Rq = 0
    for name in grads:  # the queries' quadratic form under the training blocks' R
        G, V = flat(grads[name]), flat(queries[name])
        lam, n, d = paper_lambda(G), G.shape[0], G.shape[1]
        w = 1.0 / (lam + (G * G).sum(1))
        R = (torch.eye(d, dtype=torch.float64) - (G.T * w) @ G / n) / lam
        Rq = Rq + ((V @ R) * V).sum(1)
    want_norm = want / torch.sqrt(want_self.abs()[:, None] * Rq.abs()[None, :])
    assert_close_to(normalized, want_norm, FLOAT32_TOL, what="normalized datainf through the cached matrix")


def test_datainf_refits_for_another_damping_and_never_uses_a_matrix_of_another(tmp_path):
    store, grads = make_store(tmp_path / "s")
    queries = queries_for()
    score_store(store, queries, ScoreArguments(method="datainf"))
    got = score_store(GradientStore.open(tmp_path / "s"), queries, ScoreArguments(method="datainf", damping=0.05))
    assert not got.diagnostics["curvature_fit"]["cached"]
    assert_close_to(got.scores, dense_datainf(grads, queries, damping=0.05)[0], what="datainf, damping 0.05")
    again = score_store(GradientStore.open(tmp_path / "s"), queries, ScoreArguments(method="datainf", damping=0.05))
    assert again.diagnostics["curvature_fit"]["cached"]
    assert_close_to(again.scores, got.scores, what="datainf, damping 0.05, cached")


def test_exact_with_its_cached_fisher_equals_dense_float64(tmp_path, rows_read):
    store, grads = make_store(tmp_path / "s")
    queries = queries_for()
    want = dense_exact(grads, queries)
    first = score_store(store, queries, ScoreArguments(method="exact"))
    assert (tmp_path / "s" / "fitted-exact.safetensors").is_file()
    rows_read[0] = 0
    cached = score_store(GradientStore.open(tmp_path / "s"), queries, ScoreArguments(method="exact"))
    assert cached.diagnostics["curvature_fit"]["cached"]
    assert rows_read[0] == N * len(SHAPES), "a query with the cached Fisher should read every row once"
    assert_close_to(first.scores, want, what="exact, fitted now")
    assert_close_to(cached.scores, want, what="exact, cached")


def test_verify_checks_every_cache_and_names_the_bad_one(tmp_path, capsys):
    store, _ = make_store(tmp_path / "s")
    queries = queries_for()
    for method in ("datainf", "exact", "ekfac"):
        score_store(store, queries, ScoreArguments(method=method))
    code, out, err = run(["store", "verify", str(tmp_path / "s")], capsys)
    assert code == 0, err
    for name in ("fitted-datainf.safetensors", "fitted-exact.safetensors", "kfac.safetensors"):
        assert name in out, out
    cache = tmp_path / "s" / "fitted-exact.safetensors"
    cache.write_bytes(cache.read_bytes()[:-1] + bytes([cache.read_bytes()[-1] ^ 1]))
    before = hashes(tmp_path / "s")
    line = refused(["store", "verify", str(tmp_path / "s")], capsys, "fitted-exact.safetensors", "checksum",
                   "--method exact")
    assert "fitted-datainf" not in line and "kfac.safetensors" not in line
    assert hashes(tmp_path / "s") == before
