"""Tests of datainf.estimators against independent dense float64 computations and a retrained ridge model.

Every reference here is written from the formulas in docs/math.md, not from the library's code:
exact = an explicit solve of the d x d damped Fisher, datainf = the explicit average of the per-example
inverses, identity = the plain dot product, and the ridge test retrains a weighted least-squares model.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import datainf
from datainf import DataInfError, default_damping, influence, self_influence
from reference import FLOAT32_TOL

F64 = torch.float64
METHODS_DENSE = ("exact", "datainf", "identity")


# --------------------------------------------------------------------------------------------------
# independent references
# --------------------------------------------------------------------------------------------------


def make_blocks(n: int, dims: list[int], scales: list[float], seed: int, dtype=F64) -> list[torch.Tensor]:
    """Random (n, d_l) gradient blocks whose magnitudes differ by `scales`."""
    gen = torch.Generator().manual_seed(seed)
    return [s * torch.randn(n, d, generator=gen, dtype=dtype) for d, s in zip(dims, scales)]


def ref_damping(G: torch.Tensor) -> float:
    """The paper's rule: 0.1 * sum_i ||g_i||^2 / (n d), written as a plain double loop."""
    G = G.double()
    n, d = G.shape
    total = sum(float(G[i] @ G[i]) for i in range(n))
    return 0.1 * total / (n * d)


def ref_block(method: str, G: torch.Tensor, V: torch.Tensor, lam: float) -> torch.Tensor:
    """(n, m) scores of one block: score[k, j] = -g_k^T M v_j with M the method's inverse curvature."""
    n, d = G.shape
    eye = torch.eye(d, dtype=F64)
    if method == "identity":
        return -G @ V.T
    if method == "exact":
        A = G.T @ G / n + lam * eye
        return -G @ torch.linalg.solve(A, V.T)
    if method == "datainf":
        M = sum(torch.linalg.inv(torch.outer(G[i], G[i]) + lam * eye) for i in range(n)) / n
        return -G @ M @ V.T
    raise AssertionError(method)


def ref_scores(method: str, Gs: list[torch.Tensor], Vs: list[torch.Tensor], lams=None) -> torch.Tensor:
    lams = lams if lams is not None else [ref_damping(G) for G in Gs]
    return sum(ref_block(method, G.double(), V.double(), lam) for G, V, lam in zip(Gs, Vs, lams))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# --------------------------------------------------------------------------------------------------
# each method against its dense reference
# --------------------------------------------------------------------------------------------------

# (n, dims): d <= n for every block (exact's d x d route), and n < d (exact's Gram / Woodbury route)
SHAPES = {"d<=n": (40, [6, 15, 3]), "n<d": (12, [30, 50, 17])}
SCALES = [1e-3, 1.0, 1e3]


@pytest.mark.parametrize("method", METHODS_DENSE)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_matches_dense_reference_default_damping(method: str, shape: str) -> None:
    n, dims = SHAPES[shape]
    Gs = make_blocks(n, dims, SCALES, seed=1)
    Vs = make_blocks(5, dims, SCALES, seed=2)
    got = influence(Gs, Vs, method=method)
    assert got.shape == (n, 5) and got.dtype == F64
    assert rel_err(got, ref_scores(method, Gs, Vs)) < 1e-10


@pytest.mark.parametrize("method", METHODS_DENSE)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_matches_dense_reference_given_damping(method: str, shape: str) -> None:
    n, dims = SHAPES[shape]
    Gs = make_blocks(n, dims, [1.0, 0.5, 2.0], seed=3)
    Vs = make_blocks(4, dims, [1.0, 0.5, 2.0], seed=4)
    ref = ref_scores(method, Gs, Vs, [0.3] * 3)
    assert rel_err(influence(Gs, Vs, method, 0.3), ref) < 1e-10
    lams = [0.05, 1.0, 7.0]
    ref = ref_scores(method, Gs, Vs, lams)
    assert rel_err(influence(Gs, Vs, method, lams), ref) < 1e-10
    named_g = {"q": Gs[0], "k": Gs[1], "v": Gs[2]}
    named_v = {"v": Vs[2], "q": Vs[0], "k": Vs[1]}  # other key order: matched by name
    got = influence(named_g, named_v, method, {"k": lams[1], "v": lams[2], "q": lams[0]})
    assert rel_err(got, ref) < 1e-10


@pytest.mark.parametrize("method", METHODS_DENSE)
def test_single_tensor_and_multidim_blocks(method: str) -> None:
    gen = torch.Generator().manual_seed(5)
    G = torch.randn(20, 3, 4, generator=gen, dtype=F64)  # e.g. a LoRA A matrix of shape (3, 4)
    V = torch.randn(2, 3, 4, generator=gen, dtype=F64)
    ref = ref_scores(method, [G.reshape(20, 12)], [V.reshape(2, 12)])
    assert rel_err(influence(G, V, method), ref) < 1e-10
    assert rel_err(influence([G], [V], method), ref) < 1e-10


def test_default_damping_is_the_papers_rule() -> None:
    Gs = make_blocks(25, [7, 40], [1e-2, 30.0], seed=6)
    got = default_damping({"a": Gs[0], "b": Gs[1]})
    assert set(got) == {"a", "b"}
    assert got["a"] == pytest.approx(ref_damping(Gs[0]), rel=1e-12)
    assert got["b"] == pytest.approx(ref_damping(Gs[1]), rel=1e-12)
    assert list(default_damping(Gs)) == ["0", "1"]
    diag: dict = {}
    influence({"a": Gs[0], "b": Gs[1]}, {"a": Gs[0][:2], "b": Gs[1][:2]}, diagnostics=diag)
    assert diag["method"] == "datainf"
    assert diag["damping"]["b"] == pytest.approx(ref_damping(Gs[1]), rel=1e-12)


@pytest.mark.parametrize("method", METHODS_DENSE)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_self_influence_is_the_diagonal(method: str, shape: str) -> None:
    n, dims = SHAPES[shape]
    Gs = make_blocks(n, dims, SCALES, seed=7)
    ref = torch.diagonal(ref_scores(method, Gs, Gs))
    got = self_influence(Gs, method, chunk_size=7)
    assert got.shape == (n,)
    assert rel_err(got, ref) < 1e-10
    if method != "identity":
        assert bool((got < 0).all())


def test_self_influence_lissa_is_the_diagonal() -> None:
    Gs = make_blocks(30, [5, 8], [1.0, 3.0], seed=8)
    ref = torch.diagonal(ref_scores("exact", Gs, Gs))
    got = self_influence(Gs, "lissa", iterations=2000, chunk_size=11)
    assert rel_err(got, ref) < 1e-8
    # with few iterations it is not exact, but still the diagonal of lissa's own score matrix
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        few = self_influence(Gs, "lissa", iterations=5)
        full = influence(Gs, Gs, "lissa", iterations=5)
    assert rel_err(few, torch.diagonal(full)) < 1e-10
    assert rel_err(few, ref) > 1e-3


# --------------------------------------------------------------------------------------------------
# LiSSA
# --------------------------------------------------------------------------------------------------


def test_lissa_converges_to_exact() -> None:
    Gs = make_blocks(60, [20, 8], [1.0, 10.0], seed=9)
    Vs = make_blocks(3, [20, 8], [1.0, 10.0], seed=10)
    ref = ref_scores("exact", Gs, Vs)
    errors = []
    for it in (10, 100, 1000):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            errors.append(rel_err(influence(Gs, Vs, "lissa", iterations=it), ref))
    assert errors[0] > errors[1] > errors[2]
    assert errors[0] > 1e-2
    assert errors[2] < 1e-8


def test_lissa_unconverged_warns() -> None:
    Gs = make_blocks(60, [20], [1.0], seed=9)
    with pytest.warns(UserWarning, match="lissa has not converged"):
        influence(Gs, [g[:2] for g in Gs], "lissa", iterations=3)


def test_lissa_diagnostics_and_scale() -> None:
    Gs = make_blocks(50, [12, 6], [1.0, 5.0], seed=11)
    Vs = make_blocks(2, [12, 6], [1.0, 5.0], seed=12)
    diag: dict = {}
    influence({"a": Gs[0], "b": Gs[1]}, {"a": Vs[0], "b": Vs[1]}, "lissa", diagnostics=diag, iterations=500)
    assert diag["method"] == "lissa"
    assert set(diag["lissa"]) == {"a", "b"}
    for name, G in zip("ab", Gs):
        info = diag["lissa"][name]
        assert set(info) >= {"scale", "last_relative_change", "relative_residual"}
        lam = ref_damping(G)
        top = float(torch.linalg.eigvalsh(G.T @ G / G.shape[0]).max())
        # convergence needs s > (lambda_max + lambda) / 2; the default is 1.1 * (estimated lambda_max + lambda)
        assert (top + lam) / 2 < info["scale"] <= 1.1 * (top + lam) * (1 + 1e-9)
        assert info["relative_residual"] < 1e-8
        assert info["last_relative_change"] < 1e-8
    # an explicit scale is used as given
    diag = {}
    with pytest.warns(UserWarning, match="lissa has not converged"):
        influence(Gs, Vs, "lissa", diagnostics=diag, iterations=5, scale=1e4)
    assert diag["lissa"]["0"]["scale"] == 1e4


def test_lissa_stochastic_batches_approach_exact() -> None:
    Gs = make_blocks(400, [10], [1.0], seed=13)
    Vs = make_blocks(3, [10], [1.0], seed=14)
    ref = ref_scores("exact", Gs, Vs, [1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        big = influence(Gs, Vs, "lissa", 1.0, iterations=300, batch_size=200, seed=3)
        again = influence(Gs, Vs, "lissa", 1.0, iterations=300, batch_size=200, seed=3)
        other = influence(Gs, Vs, "lissa", 1.0, iterations=300, batch_size=200, seed=4)
        small = influence(Gs, Vs, "lissa", 1.0, iterations=300, batch_size=10, seed=3)
    assert torch.equal(big, again)  # seeded
    assert not torch.equal(big, other)  # really stochastic
    # constant-step stochastic LiSSA has a noise floor that shrinks with the batch size
    assert rel_err(big, ref) < 0.25
    assert rel_err(small, ref) > rel_err(big, ref)
    corr = np.corrcoef(big.flatten().numpy(), ref.flatten().numpy())[0, 1]
    assert corr > 0.97


# --------------------------------------------------------------------------------------------------
# a real ground truth: retraining a ridge regression with one example up-weighted
# --------------------------------------------------------------------------------------------------


def ridge_problem(n: int, p: int, lam: float, seed: int):
    """Least squares (1/n) sum_i 0.5 (x_i.w - y_i)^2 + 0.5 lam ||w||^2 built so that every residual at the
    optimum is exactly +-1. Then the per-example gradients g_i = r_i x_i satisfy (1/n) sum g_i g_i^T =
    X^T X / n, the exact Hessian of the data term, and the ridge term's Hessian is lam I: the estimator's
    damped Fisher is the true Hessian.

    Returns X (n, p), y (n,), the signs s (n,) = residuals at the optimum, and w* (p,).
    """
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p))
    s = rng.choice([-1.0, 1.0], size=n)
    w_star = -X.T @ s / (n * lam)  # stationarity: (1/n) sum_i s_i x_i + lam w = 0
    y = X @ w_star - s
    return X, y, s, w_star


def retrain(X: np.ndarray, y: np.ndarray, lam: float, k: int, eps: float) -> np.ndarray:
    """argmin_w (1/n) sum_i 0.5 (x_i.w - y_i)^2 + eps * 0.5 (x_k.w - y_k)^2 + 0.5 lam ||w||^2, by a weighted
    least-squares normal-equation solve (scipy-free, independent of the library)."""
    n, p = X.shape
    weights = np.full(n, 1.0 / n)
    weights[k] += eps
    A = (X * weights[:, None]).T @ X + lam * np.eye(p)
    return np.linalg.solve(A, (X * weights[:, None]).T @ y)


@pytest.mark.parametrize("n,p", [(30, 6), (8, 20)])
def test_exact_matches_retraining_ridge(n: int, p: int) -> None:
    lam = 0.7
    X, y, s, w_star = ridge_problem(n, p, lam, seed=15)
    # the construction really is the optimum, found by an independent solve
    np.testing.assert_allclose(retrain(X, y, lam, 0, 0.0), w_star, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(X @ w_star - y, s, rtol=1e-10)

    rng = np.random.default_rng(16)
    Xq = rng.normal(size=(3, p))
    yq = rng.normal(size=3)

    def query_losses(w: np.ndarray) -> np.ndarray:
        return 0.5 * (Xq @ w - yq) ** 2

    train_grads = torch.from_numpy((X @ w_star - y)[:, None] * X)  # d/dw of 0.5 (x_i.w - y_i)^2
    query_grads = torch.from_numpy((Xq @ w_star - yq)[:, None] * Xq)
    scores = influence(train_grads, query_grads, "exact", lam).numpy()

    eps = 1e-5
    fd = np.empty((n, 3))
    for k in range(n):
        up = query_losses(retrain(X, y, lam, k, eps))
        down = query_losses(retrain(X, y, lam, k, -eps))
        fd[k] = (up - down) / (2 * eps)  # d/d eps of each query's loss at eps = 0
    np.testing.assert_allclose(scores, fd, rtol=1e-6, atol=1e-9 * np.abs(fd).max())
    # both signs occur: some examples help a query, some hurt it
    assert (fd > 0).any() and (fd < 0).any()


# --------------------------------------------------------------------------------------------------
# properties
# --------------------------------------------------------------------------------------------------

ALL_METHODS = ("exact", "datainf", "identity", "lissa")
problem = st.tuples(
    st.integers(2, 25),  # n
    st.lists(st.integers(1, 30), min_size=1, max_size=3),  # dims
    st.integers(1, 4),  # m
    st.integers(0, 2**31 - 1),  # seed
)


def random_problem(n: int, dims: list[int], m: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    scales = torch.exp(3 * torch.randn(len(dims), generator=gen, dtype=F64)).tolist()
    Gs = [s * torch.randn(n, d, generator=gen, dtype=F64) for d, s in zip(dims, scales)]
    Vs = [s * torch.randn(m, d, generator=gen, dtype=F64) for d, s in zip(dims, scales)]
    return Gs, Vs


def run(method: str, Gs, Vs, **kw) -> torch.Tensor:
    if method == "lissa":
        kw.setdefault("iterations", 20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return influence(Gs, Vs, method, **kw)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-9) -> bool:
    return float((a - b).abs().max()) <= tol * max(float(b.abs().max()), 1e-300)


@settings(max_examples=15, deadline=None)
@given(problem, st.integers(1, 30), st.sampled_from(ALL_METHODS))
def test_chunk_size_invariance(prob, chunk: int, method: str) -> None:
    Gs, Vs = random_problem(*prob)
    assert close(run(method, Gs, Vs, chunk_size=chunk), run(method, Gs, Vs))
    if method != "lissa":
        one = self_influence(Gs, method, chunk_size=chunk)
        assert close(one, self_influence(Gs, method))


@settings(max_examples=15, deadline=None)
@given(problem, st.sampled_from(ALL_METHODS), st.randoms(use_true_random=False))
def test_block_order_invariance(prob, method: str, rnd) -> None:
    Gs, Vs = random_problem(*prob)
    names = [f"layer{i}" for i in range(len(Gs))]
    shuffled = names[:]
    rnd.shuffle(shuffled)
    train = {k: Gs[names.index(k)] for k in names}
    train_shuffled = {k: Gs[names.index(k)] for k in shuffled}
    query_shuffled = {k: Vs[names.index(k)] for k in reversed(shuffled)}
    assert close(run(method, train_shuffled, query_shuffled), run(method, train, dict(zip(names, Vs))))


@settings(max_examples=15, deadline=None)
@given(problem, st.sampled_from(ALL_METHODS))
def test_training_permutation_equivariance(prob, method: str) -> None:
    Gs, Vs = random_problem(*prob)
    perm = torch.randperm(Gs[0].shape[0], generator=torch.Generator().manual_seed(prob[3]))
    permuted = run(method, [G[perm] for G in Gs], Vs)
    base = run(method, Gs, Vs)
    # lissa's power-iteration start vector is seeded, not data-dependent, so it permutes exactly too
    assert close(permuted, base[perm], tol=1e-8 if method == "lissa" else 1e-9)
    if method != "lissa":
        assert close(self_influence([G[perm] for G in Gs], method), self_influence(Gs, method)[perm])


@settings(max_examples=15, deadline=None)
@given(problem, st.sampled_from(ALL_METHODS))
def test_linear_in_the_queries(prob, method: str) -> None:
    Gs, Vs = random_problem(*prob)
    mean_query = [V.mean(dim=0, keepdim=True) for V in Vs]
    per_query = run(method, Gs, Vs)
    assert close(run(method, Gs, mean_query)[:, 0], per_query.mean(dim=1))


# --------------------------------------------------------------------------------------------------
# precision
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_half_precision_inputs_give_float32(low: torch.dtype, method: str) -> None:
    Gs = [g.to(low) for g in make_blocks(50, [8, 70], [0.5, 2.0], seed=17, dtype=torch.float32)]
    Vs = [v.to(low) for v in make_blocks(3, [8, 70], [0.5, 2.0], seed=18, dtype=torch.float32)]
    got = run(method, Gs, Vs)
    assert got.dtype == torch.float32  # accumulated and returned in float32, never in the half dtype
    # float32 on these values is float64 on them up to float32 rounding (tests/reference.py, FLOAT32_TOL;
    # measured 1e-7 to 2e-6 for the closed forms and 2.3e-4 for LiSSA's 100 iterations); a half-precision
    # result or a dropped block is >= 1e-2 off
    ref = run(method, [g.double() for g in Gs], [v.double() for v in Vs])
    assert rel_err(got, ref) < FLOAT32_TOL
    assert self_influence(Gs, "datainf").dtype == torch.float32


@pytest.mark.parametrize("method", ALL_METHODS)
def test_dtype_float64_option(method: str) -> None:
    Gs = make_blocks(30, [5, 40], [1.0, 1e2], seed=19, dtype=torch.float32)
    Vs = make_blocks(2, [5, 40], [1.0, 1e2], seed=20, dtype=torch.float32)
    got = run(method, Gs, Vs, dtype=torch.float64)
    assert got.dtype == torch.float64
    ref = run(method, [g.double() for g in Gs], [v.double() for v in Vs])
    assert rel_err(got, ref) < 1e-12
    if method != "lissa":
        assert rel_err(ref_scores(method, Gs, Vs), got) < 1e-10


# --------------------------------------------------------------------------------------------------
# row sources (memory-mapped stores)
# --------------------------------------------------------------------------------------------------


class Rows:
    """A minimal row source: serves rows of a matrix it hides, and counts reads."""

    def __init__(self, data: torch.Tensor):
        self._data = data
        self.reads = 0

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._data.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self._data.dtype

    def __getitem__(self, rows) -> torch.Tensor:
        self.reads += 1
        return self._data[rows].clone()


@pytest.mark.parametrize("method", ALL_METHODS)
def test_row_source_gives_the_same_scores(method: str) -> None:
    Gs = make_blocks(33, [6, 45], [1.0, 3.0], seed=21)
    Vs = make_blocks(4, [6, 45], [1.0, 3.0], seed=22)
    sources = [Rows(G) for G in Gs]
    kw = {"batch_size": 9} if method == "lissa" else {}
    got = run(method, sources, Vs, chunk_size=10, **kw)
    assert all(s.reads > 0 for s in sources)
    assert close(got, run(method, Gs, Vs, chunk_size=10, **kw), tol=1e-12)
    assert close(run(method, Rows(Gs[0]), Vs[0]), run(method, Gs[0], Vs[0]), tol=1e-12)
    if method != "lissa":
        assert close(self_influence(sources, method, chunk_size=10), self_influence(Gs, method), tol=1e-10)


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------


def test_errors_are_value_errors() -> None:
    assert issubclass(DataInfError, ValueError)
    assert datainf.METHODS == ("datainf", "exact", "lissa", "identity")


G2 = make_blocks(6, [3, 4], [1.0, 1.0], seed=23)
V2 = make_blocks(2, [3, 4], [1.0, 1.0], seed=24)


def with_bad(t: torch.Tensor, row: int, value: float) -> torch.Tensor:
    t = t.clone()
    t[row, 1] = value
    return t


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: influence(G2, V2[:1]), r"query_grads has 1 blocks but train_grads has 2"),
        (lambda: influence({"a": G2[0], "b": G2[1]}, {"a": V2[0], "c": V2[1]}), r"missing from query_grads \['b'\]"),
        (lambda: influence(G2, [V2[0], V2[0]]), r"block '1': query gradients have 3 entries .* training gradients have 4"),
        (lambda: influence([G2[0], G2[1][:5]], V2), r"block '1' has 5 examples but block '0' has 6"),
        (lambda: influence(G2, [V2[0], V2[1][:1]]), r"query_grads: block '1' has 1 examples but block '0' has 2"),
        (lambda: influence([g[:0] for g in G2], V2), r"training set is empty"),
        (lambda: self_influence(torch.zeros(0, 3)), r"training set is empty"),
        (lambda: influence(G2, [v[:0] for v in V2]), r"query set is empty"),
        (lambda: influence([G2[0], with_bad(G2[1], 4, math.nan)], V2), r"block '1', example 4 has a NaN or infinite"),
        (lambda: influence({"x": with_bad(G2[0], 2, math.inf), "y": G2[1]}, {"x": V2[0], "y": V2[1]}),
         r"train_grads: block 'x', example 2 has a NaN or infinite"),
        (lambda: self_influence([G2[0], with_bad(G2[1], 3, -math.inf)]), r"block '1', example 3"),
        (lambda: influence(G2, [V2[0], with_bad(V2[1], 1, math.nan)]), r"query_grads: block '1', example 1 has a NaN"),
        (lambda: influence(G2, V2, damping=0.0), r"damping is 0.0; it must be a finite number > 0"),
        (lambda: influence(G2, V2, damping=-1.0), r"damping is -1.0"),
        (lambda: influence(G2, V2, damping=[1.0, math.nan]), r"damping for block '1' is nan"),
        (lambda: influence(G2, V2, damping=math.inf), r"damping is inf"),
        (lambda: influence(G2, V2, damping=[1.0]), r"damping has 1 values but there are 2 blocks"),
        (lambda: influence(G2, V2, "newton"), r"unknown method 'newton'; choose one of datainf, exact"),
        (lambda: influence(G2, V2, "datainf", iterations=5), r"method 'datainf' takes no option\(s\) \['iterations'\]"),
        (lambda: influence(G2, V2, "lissa", depth=5), r"method 'lissa' takes no option\(s\) \['depth'\]"),
        (lambda: influence(G2, V2, "lissa", iterations=0), r"iterations must be >= 1"),
        (lambda: influence(G2, V2, "lissa", scale=-2.0), r"scale must be a finite number > 0"),
        (lambda: influence(G2, V2, chunk_size=0), r"chunk_size must be >= 1"),
        (lambda: influence([], []), r"no blocks given"),
        (lambda: influence("grads", V2), r"expected a tensor, a sequence of tensors or a mapping"),
        (lambda: influence(torch.ones(4, 3, dtype=torch.int64), torch.ones(1, 3)), r"expected a floating-point"),
    ],
)
def test_bad_input(call, match: str) -> None:
    with pytest.raises(DataInfError, match=match):
        call()


def test_all_zero_block_is_skipped_with_a_warning() -> None:
    Gs = [G2[0], torch.zeros(6, 4, dtype=F64)]
    with pytest.warns(UserWarning, match="block '1': every training gradient is zero"):
        got = influence(Gs, V2, "exact")
    assert rel_err(got, ref_block("exact", G2[0], V2[0], ref_damping(G2[0]))) < 1e-10
    with pytest.raises(DataInfError, match="all-zero training gradients"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        influence(torch.zeros(6, 4), torch.ones(1, 4))
