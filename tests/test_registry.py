"""The estimator registry, the one arguments object and the typed result: extension, validation, normalize."""

from __future__ import annotations

import pytest
import torch

import datainf
from datainf.errors import DataInfError
from datainf.estimators import Estimator, ScoreArguments, method_names, register, score, unregister
from reference import assert_close_to

F64 = torch.float64


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    train = {"a": torch.randn(30, 7, generator=g, dtype=F64), "b": torch.randn(30, 2, 5, generator=g, dtype=F64)}
    query = {"a": torch.randn(3, 7, generator=g, dtype=F64), "b": torch.randn(3, 2, 5, generator=g, dtype=F64)}
    return train, query


def test_a_toy_method_is_one_class_through_the_registry():
    @register
    class Diagonal(Estimator):  # the whole extension: a name and a preconditioner
        name = "diagonal-test"
        summary = "diagonal of the block Fisher"

        def setup(self):
            self.diag = sum((g * g).sum(0) for _, g in self.block.rows()) / self.block.n

        def precondition(self, V):
            return V / (self.diag + self.damping)

    try:
        assert "diagonal-test" in method_names()
        train, query = _problem()
        got = datainf.influence(train, query, method="diagonal-test")
        selfs = datainf.self_influence(train, method="diagonal-test")
        want, want_self = 0, 0
        for name in train:  # dense float64 reference, the paper's damping rule per block
            G, V = train[name].reshape(30, -1), query[name].reshape(3, -1)
            h = (G * G).mean(0) + 0.1 * (G * G).sum(1).mean() / G.shape[1]
            want = want - G @ (V / h).T
            want_self = want_self - (G * G / h).sum(1)
        assert_close_to(got, want, what="toy method scores")
        assert_close_to(selfs, want_self, what="toy method self-influence (generic chunked form)")
        from datainf.cli.options import method_names_of

        assert method_names_of("datainf,diagonal-test") == ("datainf", "diagonal-test")  # the CLI sees it too
    finally:
        unregister("diagonal-test")
    assert "diagonal-test" not in method_names()


def test_what_a_methods_diagnostics_mean_is_said_by_the_method():
    """The scoring path hands each method its per-block diagnostics once (check_diagnostics) instead of
    special-casing a method by name: a toy method records each block's width and sees them all after
    scoring; LiSSA's not-converged warning comes from its own class the same way."""
    seen = []

    @register
    class Noted(Estimator):
        name = "noted-test"

        def setup(self):
            self.info["d"] = self.block.d

        def precondition(self, V):
            return V / self.damping

        @classmethod
        def check_diagnostics(cls, diagnostics):
            seen.append(diagnostics)

    try:
        train, query = _problem()
        score(train, query, ScoreArguments(method="noted-test"))
        assert seen == [{"a": {"d": 7}, "b": {"d": 10}}]
    finally:
        unregister("noted-test")
    from datainf.estimators.lissa import Lissa

    with pytest.warns(UserWarning, match="lissa has not converged: block 'b'"):
        Lissa.check_diagnostics({"a": {"relative_residual": 0.05}, "b": {"relative_residual": 0.5}})


def test_registry_refuses_a_second_method_of_the_same_name_and_names_unknown_ones():
    with pytest.raises(DataInfError, match="already registered"):
        @register
        class Other(Estimator):
            name = "datainf"
    with pytest.raises(DataInfError, match="unknown method 'newton'; choose one of datainf, exact, lissa"):
        ScoreArguments(method="newton")
    with pytest.raises(DataInfError, match="set the class attribute `name`"):
        register(type("Nameless", (Estimator,), {}))


def test_score_arguments_are_validated_once_and_round_trip():
    with pytest.raises(DataInfError, match=r"method 'lissa' takes no option\(s\) \['depth'\]"):
        ScoreArguments(method="lissa", options={"depth": 3})
    with pytest.raises(DataInfError, match="iterations must be >= 1"):
        ScoreArguments(method="lissa", options={"iterations": 0})
    with pytest.raises(DataInfError, match="damping for block 'b' is -1.0"):
        ScoreArguments(damping={"a": 1.0, "b": -1.0})
    with pytest.raises(DataInfError, match="compute dtype"):
        ScoreArguments(dtype="float16")
    args = ScoreArguments(method="lissa", damping=[0.1, 0.2], dtype=torch.float64, options={"iterations": 7})
    assert args.dtype == "float64" and args.damping == (0.1, 0.2)
    assert ScoreArguments.from_dict(args.to_dict()) == args
    with pytest.raises(DataInfError, match="no field"):
        ScoreArguments.from_dict({**args.to_dict(), "colour": "red"})


def test_score_result_carries_damping_diagnostics_and_time():
    train, query = _problem(1)
    result = score(train, query, ScoreArguments(method="lissa", options={"iterations": 300}))
    assert result.kind == "influence" and result.scores.shape == (30, 3) and result.seconds > 0
    assert set(result.damping) == {"a", "b"} and set(result.diagnostics) == {"a", "b"}
    assert result.diagnostics["a"]["relative_residual"] < 1e-6  # converged
    exact = score(train, query, ScoreArguments(method="exact")).scores
    assert_close_to(result.scores, exact, tol=1e-6, what="lissa (300 iterations) vs exact")
    assert result.settings()["arguments"]["options"] == {"iterations": 300}


def test_normalize_is_the_cosine_after_preconditioning():
    train, query = _problem(2)
    G = torch.cat([train[n].reshape(30, -1) for n in train], dim=1)
    V = torch.cat([query[n].reshape(3, -1) for n in query], dim=1)
    # identity: minus the cosine similarity of the raw gradients, over all blocks together
    cosine = (G / G.norm(dim=1, keepdim=True)) @ (V / V.norm(dim=1, keepdim=True)).T
    got = score(train, query, ScoreArguments(method="identity", normalize=True)).scores
    assert_close_to(got, -cosine, what="identity + normalize")
    # exact: the cosine in the metric of the block-diagonal inverse, computed densely
    blocks = []
    for name in train:
        g = train[name].reshape(30, -1)
        lam = 0.1 * (g * g).sum(1).mean() / g.shape[1]
        blocks.append(torch.linalg.inv(g.T @ g / 30 + lam * torch.eye(g.shape[1], dtype=F64)))
    P = torch.block_diag(*blocks)
    raw = -(G @ P @ V.T)
    norms = torch.sqrt(((G @ P) * G).sum(1))[:, None] * torch.sqrt(((V @ P) * V).sum(1))[None, :]
    got = score(train, query, ScoreArguments(method="exact", normalize=True)).scores
    assert_close_to(got, raw / norms, what="exact + normalize")
    assert float(got.abs().max()) <= 1 + 1e-12  # a cosine
    with pytest.raises(DataInfError, match="no meaning for self-influence"):
        datainf.estimators.score_self(train, ScoreArguments(normalize=True))


def test_mean_query_is_one_column_of_the_mean_gradient():
    train, query = _problem(3)
    got = score(train, query, ScoreArguments(method="datainf", mean_query=True)).scores
    mean = {k: v.mean(0, keepdim=True) for k, v in query.items()}
    assert got.shape == (30, 1)
    assert_close_to(got, datainf.influence(train, mean, "datainf"), what="mean query")


def test_a_damping_that_makes_scores_non_finite_is_refused():
    train, query = _problem(4)
    small = {k: v.float() for k, v in train.items()}
    with pytest.raises(DataInfError, match="NaN or infinite scores"):
        datainf.influence(small, {k: v.float() for k, v in query.items()}, "datainf", damping=1e-42)
