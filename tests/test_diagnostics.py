"""approximation_report: hand-made cases where the answer is known, and dense cross-checks."""

import json
import warnings

import pytest
import torch

from datainf.diagnostics import approximation_report
from datainf.errors import DataInfError
from datainf.estimators.kfac import KFACFactors


def test_single_example_makes_datainf_exact():
    G = torch.randn(1, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    V = torch.randn(4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    report = approximation_report({"w": G}, {"w": V}, methods=("datainf",), damping=0.3)
    r = report["blocks"]["w"]["methods"]["datainf"]
    assert r["ihvp_relative_error"]["max"] < 1e-12
    assert r["score_correlation"] == pytest.approx(1.0)
    assert not report["flags"]
    json.dumps(report)


def test_blocks_of_dimension_one_rank_like_exact():
    gen = torch.Generator().manual_seed(2)
    train = {"a": torch.randn(30, 1, generator=gen), "b": torch.randn(30, 1, generator=gen) * 3}
    query = {"a": torch.randn(5, 1, generator=gen), "b": torch.randn(5, 1, generator=gen)}
    factors = KFACFactors()
    for name in train:  # one token per example: the weight gradient is s * a
        factors.update(name, None, torch.ones(30, 1), train[name])
    factors.add_examples(30)
    report = approximation_report(train, query, factors=factors, lissa_iterations=200)
    for block in report["blocks"].values():
        for method, r in block["methods"].items():
            assert r["score_correlation"] == pytest.approx(1.0), method
        # ekfac's corrected eigenvalue is mean g^2 = H itself, and lissa converges on a 1-d block
        assert block["methods"]["ekfac"]["ihvp_relative_error"]["max"] < 1e-6
        assert block["methods"]["lissa"]["ihvp_relative_error"]["max"] < 1e-4
    assert not report["flags"]


def test_relative_errors_match_dense_computations():
    gen = torch.Generator().manual_seed(3)
    n, out, inn = 25, 3, 4
    x = torch.randn(n, 2, inn, generator=gen, dtype=torch.float64)
    s = torch.randn(n, 2, out, generator=gen, dtype=torch.float64)
    factors = KFACFactors()
    factors.update("w", None, x, s)
    factors.add_examples(n)
    G = torch.einsum("bto,bti->boi", s, x).reshape(n, -1)
    V = torch.randn(3, out * inn, generator=gen, dtype=torch.float64)
    lam = 0.2
    report = approximation_report({"w": G}, {"w": V}, methods=("datainf", "kfac"), factors=factors,
                                  damping=lam, n_sub=n, threshold=-1.0)
    eye = torch.eye(out * inn, dtype=torch.float64)
    exact = torch.linalg.solve(G.T @ G / n + lam * eye, V.T).T
    datainf = sum(torch.linalg.solve(torch.outer(g, g) + lam * eye, V.T).T for g in G) / n
    A = torch.einsum("bti,btj->ij", x, x) / (2 * n)
    S = torch.einsum("bto,btp->op", s, s) / n
    kfac = torch.linalg.solve(torch.kron(S, A) + lam * eye, V.T).T
    for method, X in (("datainf", datainf), ("kfac", kfac)):
        expected = ((X - exact).norm(dim=1) / exact.norm(dim=1)).max()
        got = report["blocks"]["w"]["methods"][method]["ihvp_relative_error"]["max"]
        assert got == pytest.approx(float(expected), rel=1e-6)


def test_far_approximation_is_flagged_with_a_warning():
    """Low-rank, badly scaled gradients and a tiny damping: DataInf's harmonic-mean inverse is far off."""
    gen = torch.Generator().manual_seed(4)
    basis = torch.randn(3, 40, generator=gen, dtype=torch.float64)
    G = (torch.randn(200, 3, generator=gen, dtype=torch.float64) * torch.tensor([30.0, 1.0, 0.03])) @ basis
    V = torch.randn(6, 40, generator=gen, dtype=torch.float64)
    with pytest.warns(UserWarning, match="far from exact"):
        report = approximation_report({"w": G}, {"w": V}, methods=("datainf",), damping=1e-4, n_sub=200)
    r = report["blocks"]["w"]["methods"]["datainf"]
    assert r["far"] and r["score_correlation"] < 0.5
    assert report["flags"] == [{"block": "w", "method": "datainf", "score_correlation": r["score_correlation"]}]


def test_kfac_skipped_without_factors_and_bad_input():
    G = torch.randn(10, 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = approximation_report({"w": G}, methods=("datainf", "ekfac"))
    assert "skipped" in report["blocks"]["w"]["methods"]["ekfac"]
    with pytest.raises(DataInfError, match="unknown method"):
        approximation_report({"w": G}, methods=("exact",))
