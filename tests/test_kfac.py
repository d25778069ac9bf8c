"""K-FAC / EK-FAC: exactness where it must be exact, dense cross-checks, factors from the gradient hooks."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import datainf  # noqa: E402
from datainf.errors import DataInfError  # noqa: E402
from datainf.estimators.kfac import KFACFactors, curvature_from_gradients, fit_curvature  # noqa: E402
from datainf.gradients import per_example_gradients  # noqa: E402
from datainf.scoring import load_curvature, load_factor_sums, save_curvature, save_factor_sums  # noqa: E402
from datainf.tasks import per_example_loss  # noqa: E402
from reference import assert_close_to  # noqa: E402
from tiny_models import random_classification_batch, tiny_bert_classifier, unpad  # noqa: E402


def kfac_influence(train, query, factors=None, method="ekfac", damping=None):
    return datainf.influence(train, query, method, damping, factors=factors)


def kfac_self_influence(train, factors=None, method="ekfac", damping=None):
    return datainf.self_influence(train, method, damping, factors=factors)


def factorial_block(n_in: int = 4, n_out: int = 3, p: int = 5, q: int = 6, seed: int = 0):
    """Gradients g = s_j a_i^T over the full factorial design {a_i} x {s_j}: one token per example, and the
    second moment of vec(g) is exactly (mean s s^T) kron (mean a a^T). Returns (factors, G (n, out, in))."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(p, n_in, generator=gen, dtype=torch.float64) + 0.5
    s = torch.randn(q, n_out, generator=gen, dtype=torch.float64)
    inputs = a.repeat_interleave(q, dim=0)  # (p q, in)
    grads = s.repeat(p, 1)  # (p q, out)
    factors = KFACFactors()
    factors.update("w", None, inputs, grads)
    factors.add_examples(p * q)
    return factors, torch.einsum("bo,bi->boi", grads, inputs)


def dense_scores(G: torch.Tensor, V: torch.Tensor, H: torch.Tensor, lam: float) -> torch.Tensor:
    X = torch.linalg.solve(H + lam * torch.eye(H.shape[0], dtype=H.dtype), V.T)
    return -(G @ X)


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_kronecker_structured_block_equals_exact(method):
    factors, G = factorial_block()
    n = G.shape[0]
    flat = G.reshape(n, -1)
    V = torch.randn(3, flat.shape[1], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    H = flat.T @ flat / n
    lam = 0.05
    expected = dense_scores(flat, V, H, lam)
    got = kfac_influence({"w": G}, {"w": V}, factors, method=method, damping=lam)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)
    # and the library's own exact method agrees (a second, independent route)
    exact = datainf.influence({"w": flat}, {"w": V}, method="exact", damping=lam, dtype=torch.float64)
    torch.testing.assert_close(got, exact, rtol=1e-7, atol=1e-9)
    # with the gradient-based Kronecker basis (the ekfac default) the factorial case is exact as well
    gradient_basis = fit_curvature(factors, {"w": G}, basis="gradients")
    torch.testing.assert_close(kfac_influence({"w": G}, {"w": V}, gradient_basis, method=method, damping=lam),
                               expected, rtol=1e-8, atol=1e-10)
    self_scores = kfac_self_influence({"w": G}, factors, method=method, damping=lam)
    torch.testing.assert_close(self_scores, dense_scores(flat, flat, H, lam).diagonal(), rtol=1e-8, atol=1e-10)


def test_non_kronecker_block_matches_dense_formulas():
    """On arbitrary gradients: kfac = dense (S kron A + lambda I)^{-1}; ekfac = dense Q diag(E + lambda)^{-1} Q^T
    with E computed entry by entry as mean_k (u_i^T G_k w_j)^2."""
    gen = torch.Generator().manual_seed(3)
    n, out, inn, tokens = 40, 3, 5, 4
    x = torch.randn(n, tokens, inn, generator=gen, dtype=torch.float64)
    s = torch.randn(n, tokens, out, generator=gen, dtype=torch.float64)
    factors = KFACFactors()
    factors.update("w", None, x, s)
    factors.add_examples(n)
    G = torch.einsum("bto,bti->boi", s, x)
    flat = G.reshape(n, -1)
    V = torch.randn(2, out * inn, generator=gen, dtype=torch.float64)
    A = torch.einsum("bti,btj->ij", x, x) / (n * tokens)
    S = torch.einsum("bto,btp->op", s, s) / n
    lam = 0.3
    torch.testing.assert_close(
        kfac_influence({"w": flat}, {"w": V}, factors, "kfac", lam), dense_scores(flat, V, torch.kron(S, A), lam)
    )
    curvature = fit_curvature(factors, {"w": flat}, basis="activations")
    b = curvature.blocks["w"]
    E = torch.empty(out, inn, dtype=torch.float64)
    for i in range(out):
        for j in range(inn):
            E[i, j] = sum(float(b.q_s[:, i] @ G[k] @ b.q_a[:, j]) ** 2 for k in range(n)) / n
    torch.testing.assert_close(b.corrected, E)
    Q = torch.kron(b.q_s, b.q_a)
    H_ekfac = Q @ torch.diag(E.reshape(-1)) @ Q.T
    torch.testing.assert_close(kfac_influence({"w": flat}, {"w": V}, curvature, "ekfac", lam),
                               dense_scores(flat, V, H_ekfac, lam))
    # default basis: eigenvectors of mean G^T G and mean G G^T; eigenvalues diag(Q^T H Q) in that basis
    A_G = sum(G[k].T @ G[k] for k in range(n)) / n
    S_G = sum(G[k] @ G[k].T for k in range(n)) / n
    Q = torch.kron(torch.linalg.eigh(S_G).eigenvectors, torch.linalg.eigh(A_G).eigenvectors)
    H = flat.T @ flat / n
    H_grad_basis = Q @ torch.diag((Q.T @ H @ Q).diagonal()) @ Q.T
    torch.testing.assert_close(kfac_influence({"w": flat}, {"w": V}, factors, "ekfac", lam),
                               dense_scores(flat, V, H_grad_basis, lam))
    # the same from the gradients alone (no hooks)
    torch.testing.assert_close(kfac_influence({"w": G}, {"w": V}, curvature_from_gradients({"w": G}), "ekfac", lam),
                               dense_scores(flat, V, H_grad_basis, lam))
    # default damping: for ekfac it is the paper's rule 0.1 * mean ||g||^2 / d
    assert curvature.default_damping("ekfac")["w"] == pytest.approx(datainf.default_damping({"w": flat})["w"])


def test_influence_dispatches_kfac_methods():
    factors, G = factorial_block()
    flat = G.reshape(G.shape[0], -1)
    got = datainf.influence({"w": flat}, {"w": flat[:2]}, method="ekfac", damping=0.1, factors=factors)
    torch.testing.assert_close(got, kfac_influence({"w": flat}, {"w": flat[:2]}, factors, "ekfac", 0.1))
    with pytest.raises(DataInfError, match="factors"):
        datainf.influence({"w": flat}, {"w": flat[:2]}, method="kfac")


# ------------------------------------------------------------------ factors from the gradient hooks


@pytest.fixture(scope="module")
def bert():
    """float64, so hooked factors and the loop's agree to rounding (tests/reference.py); counting a padded
    position or missing a module call changes a factor by O(1/tokens), over 1e-2."""
    return tiny_bert_classifier(lora_targets=("value",)).double()


def hooked_factors(model, batches) -> KFACFactors:
    acc = KFACFactors()
    for batch in batches:
        per_example_gradients(model, batch, "classification", factors=acc)
    return acc


def loop_factors(model, batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A and S by a plain loop: each example alone (padding removed), its own module hooks, its own backward."""
    tracked = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and id(m.weight) in tracked]
    a_sum, s_sum, tokens = {}, {}, {}
    n = batch["labels"].shape[0]
    for k in range(n):
        example = unpad(batch, k)
        seen = []

        def hook(module, args, out, seen=seen):
            out.retain_grad()
            seen.append((module, args[0], out))

        handles = [m.register_forward_hook(hook) for m in linears]
        try:
            per_example_loss("classification", model, example).sum().backward()
        finally:
            for h in handles:
                h.remove()
        for m, x, out in seen:
            x, g = x.detach().double().reshape(-1, x.shape[-1]), out.grad.double().reshape(-1, out.shape[-1])
            names = [(tracked[id(m.weight)], x.T @ x)]
            if m.bias is not None and id(m.bias) in tracked:
                names.append((tracked[id(m.bias)], torch.full((1, 1), float(x.shape[0]), dtype=torch.float64)))
            for name, a in names:
                a_sum[name] = a_sum.get(name, 0) + a
                s_sum[name] = s_sum.get(name, 0) + g.T @ g
                tokens[name] = tokens.get(name, 0) + x.shape[0]
    model.zero_grad(set_to_none=True)
    return {name: (a_sum[name] / tokens[name], s_sum[name] / n) for name in a_sum}


def assert_factors_close(got: KFACFactors, expected: dict) -> None:
    covs = got.covariances()
    assert set(covs) == set(expected)
    for name, (A, S) in expected.items():
        assert_close_to(covs[name][0], A, what=f"A of {name}")
        assert_close_to(covs[name][1], S, what=f"S of {name}")


def test_hook_factors_equal_a_plain_loop_and_exclude_padding(bert):
    batch = random_classification_batch(6, min_len=2, max_len=9, seed=4)
    assert (batch["attention_mask"] == 0).any()
    expected = loop_factors(bert, batch)
    one = hooked_factors(bert, [batch])
    assert_factors_close(one, expected)
    lora_a = next(name for name in one.block_names if "lora_A" in name)
    assert one.tokens[lora_a] == batch["attention_mask"].sum()  # padded positions are not counted
    head_bias = next(name for name in one.block_names if name.endswith("bias"))
    torch.testing.assert_close(one.covariances()[head_bias][0], torch.ones(1, 1, dtype=torch.float64))


def test_factors_batched_merged_and_unpadded_agree(bert, tmp_path):
    batch = random_classification_batch(6, min_len=2, max_len=9, seed=5)
    one = hooked_factors(bert, [batch]).covariances()
    rows = [{k: v[i : i + 2] for k, v in batch.items()} for i in (0, 2, 4)]
    many = hooked_factors(bert, rows)
    first = save_factor_sums(hooked_factors(bert, rows[:1]), tmp_path / "first.safetensors")  # "process 1"
    halves = load_factor_sums(first).merge(hooked_factors(bert, rows[1:]))
    alone = hooked_factors(bert, [unpad(batch, k) for k in range(6)])
    for other in (many, halves, alone):
        assert other.n_examples == 6
        assert_factors_close(other, one)


def test_end_to_end_on_a_model_matches_dense_formula(bert, tmp_path):
    batch = random_classification_batch(8, min_len=2, max_len=9, seed=6)
    acc = KFACFactors()
    grads = per_example_gradients(bert, batch, "classification", factors=acc)
    curvature = fit_curvature(acc, grads, basis="activations")
    queries = {k: v[:2] for k, v in grads.items()}
    lam = {k: 1e-3 for k in grads}
    scores = datainf.influence(grads, queries, method="kfac", damping=lam, factors=curvature)
    expected = 0
    for name, (A, S) in acc.covariances().items():
        g = grads[name].double().reshape(8, -1)
        expected = expected + dense_scores(g, g[:2], torch.kron(S, A), lam[name])
    assert scores.dtype == torch.float64  # float64 model -> float64 gradients -> float64 scores
    assert_close_to(scores, expected, what="kfac scores vs dense (A kron S + lambda I)^-1")

    fingerprints = {"model": "m1", "dataset": "d1"}
    path = save_curvature(curvature, tmp_path / "kfac.safetensors", fingerprints=fingerprints, fit_seconds=1.5)
    loaded, seconds = load_curvature(path, fingerprints=fingerprints)
    assert loaded.fingerprints == fingerprints and seconds == 1.5
    # saved exactly; the loaded tensors are contiguous where eigh's were not, so kernels may round differently
    assert_close_to(datainf.influence(grads, queries, method="ekfac", factors=loaded),
                    datainf.influence(grads, queries, method="ekfac", factors=curvature), what="reloaded curvature")
    with pytest.raises(DataInfError, match="different model"):
        load_curvature(path, fingerprints={"model": "m2", "dataset": "d1"})


def test_bad_inputs_raise():
    factors, G = factorial_block()
    with pytest.raises(DataInfError, match="no block 'x'"):
        kfac_influence({"x": G}, {"x": G[:1]}, factors)
    with pytest.raises(DataInfError, match="entries per example"):
        kfac_influence({"w": G[:, :, :2]}, {"w": G[:1, :, :2]}, factors)
    with pytest.raises(DataInfError, match="unknown method .kfc."):
        kfac_influence({"w": G}, {"w": G[:1]}, factors, method="kfc")
    with pytest.raises(DataInfError, match="empty"):
        KFACFactors().covariances()
