"""The remedies as options of the one scoring path (issue 29, item 3; :mod:`datainf.remedies`), each checked
against an independent computation: the top-r removal against an explicit float64 SVD, the Adam
normalization against gradients divided by hand, DDA's debias against two scores subtracted, the damping
knob against the damping the method receives and a dense float64 solve."""

from __future__ import annotations

import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from cli_helpers import hashes, refused  # noqa: E402
from cli_helpers import run_cli as run  # noqa: E402
from datainf.combine import combine, debias_terms  # noqa: E402
from datainf.errors import DataInfError  # noqa: E402
from datainf.estimators import ScoreArguments  # noqa: E402
from datainf.remedies import SECOND_MOMENTS_FILE  # noqa: E402
from datainf.scoring import load_scores, score_store  # noqa: E402
from datainf.store import GradientStore  # noqa: E402
from stores import write_store  # noqa: E402

F64 = torch.float64
#: float64 all through on both sides: agreement to rounding of a few d x d solves
TOL = 1e-9


def make_store(path: Path, shapes: dict[str, tuple[int, ...]], n: int, seed: int, *, dtype: str = "float64",
               projection: dict | None = None) -> tuple[GradientStore, dict[str, torch.Tensor]]:
    """A finished store of seeded random gradients (rows of unequal scale), chunks of 8 rows."""
    g = torch.Generator().manual_seed(seed)
    grads = {k: torch.randn(n, *s, generator=g, dtype=F64) * (0.5 + torch.rand(n, *[1] * len(s), generator=g,
                                                                                  dtype=F64))
             for k, s in shapes.items()}
    return write_store(path, grads, dtype=dtype, projection=projection), grads


def queries_for(shapes: dict[str, tuple[int, ...]], m: int = 3, seed: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(m, *s, generator=g, dtype=F64) for k, s in shapes.items()}


def flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).double()


def dense_exact(G: torch.Tensor, V: torch.Tensor, lam: float | None = None) -> tuple[torch.Tensor, float]:
    """``-V (G^T G / n + lam I)^{-1} G^T`` transposed to (n, m), lam the paper's rule unless given: a dense
    float64 solve."""
    n, d = G.shape
    lam = 0.1 * float((G * G).sum(1).mean()) / d if lam is None else lam
    H = G.T @ G / n + lam * torch.eye(d, dtype=F64)
    return -(G @ torch.linalg.solve(H, V.T)), lam


SHAPES = {"w": (4, 6), "b": (5,)}  # d = 24 and 5: with n = 40 both take the d x d route, with n = 12 "w" the Gram


@pytest.mark.parametrize("n", [40, 12])
def test_remove_top_matches_an_explicit_float64_svd(tmp_path, n):
    """remove_top=r: each block's training and query gradients lose the top-r right singular vectors of the
    training gradients (torch.linalg.svd in float64, here), then exact scores them; and identity too."""
    store, grads = make_store(tmp_path / "s", SHAPES, n, seed=n)
    queries = queries_for(SHAPES)
    r = 3
    want_exact, want_identity = 0, 0
    for name in SHAPES:
        G, V = flat(grads[name]), flat(queries[name])
        top = torch.linalg.svd(G, full_matrices=False).Vh[:r]  # (r, d)
        Gp, Vp = G - G @ top.T @ top, V - V @ top.T @ top
        want_exact = want_exact + dense_exact(Gp, Vp)[0]
        want_identity = want_identity - Gp @ Vp.T
    for method, want in (("exact", want_exact), ("identity", want_identity)):
        got = score_store(store, queries, ScoreArguments(method=method, remove_top=r, dtype="float64"))
        assert torch.allclose(got.scores, want, rtol=TOL, atol=TOL * float(want.abs().max())), method
        assert got.arguments.remove_top == r  # recorded as asked
    # without the option, a different answer (the test can fail)
    plain = score_store(store, queries, ScoreArguments(method="identity", dtype="float64")).scores
    assert not torch.allclose(plain, want_identity, rtol=1e-3)


def test_remove_top_refuses_to_remove_everything(tmp_path):
    store, _ = make_store(tmp_path / "s", SHAPES, 12, seed=0)
    with pytest.raises(DataInfError, match="block 'b'.*at most 4 directions"):
        score_store(store, queries_for(SHAPES), ScoreArguments(method="identity", remove_top=5))


def test_adam_normalization_matches_gradients_divided_by_hand(tmp_path):
    """adam_moments=FILE: every gradient divided elementwise by sqrt(v) + 1e-8 of its parameter, then scaled
    to unit norm over all blocks; here divided by hand, then scored by a dense solve and by identity."""
    n = 30
    store, grads = make_store(tmp_path / "s", SHAPES, n, seed=3)
    queries = queries_for(SHAPES)
    g = torch.Generator().manual_seed(11)
    moments = {k: torch.rand(*s, generator=g, dtype=torch.float32) * 1e-4 + 1e-7 for k, s in SHAPES.items()}
    save_file(moments, str(tmp_path / SECOND_MOMENTS_FILE))

    def by_hand(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        scaled = {k: flat(x[k]) / (moments[k].double().reshape(1, -1).sqrt() + 1e-8) for k in SHAPES}
        norm = torch.cat(list(scaled.values()), dim=1).norm(dim=1, keepdim=True)
        return {k: v / norm for k, v in scaled.items()}

    G, V = by_hand(grads), by_hand(queries)
    want_identity = -sum(G[k] @ V[k].T for k in SHAPES)
    want_exact = sum(dense_exact(G[k], V[k])[0] for k in SHAPES)
    for folder_or_file in (tmp_path / SECOND_MOMENTS_FILE, tmp_path):
        for method, want in (("identity", want_identity), ("exact", want_exact)):
            got = score_store(store, queries, ScoreArguments(method=method, adam_moments=str(folder_or_file),
                                                             dtype="float64")).scores
            assert torch.allclose(got, want, rtol=TOL, atol=TOL * float(want.abs().max())), method
    # identity's normalized scores are minus cosines: within [-1, 1]
    assert float(want_identity.abs().max()) <= 1 + 1e-12


def test_adam_normalization_refusals(tmp_path):
    store, _ = make_store(tmp_path / "s", SHAPES, 10, seed=0)
    with pytest.raises(DataInfError, match="no optimizer second moments"):
        score_store(store, None, ScoreArguments(method="identity", adam_moments=str(tmp_path / "none")))
    save_file({"w": torch.ones(4, 6)}, str(tmp_path / SECOND_MOMENTS_FILE))
    with pytest.raises(DataInfError, match="no second moment for block 'b'"):
        score_store(store, None, ScoreArguments(method="identity", adam_moments=str(tmp_path)))
    with pytest.raises(DataInfError, match="kfac.*activations"):
        ScoreArguments(method="kfac", remove_top=1)


def test_damping_scale_scales_the_damping_the_method_receives(tmp_path):
    """damping_scale=s: every block's lambda is s x the paper's rule (computed here from the gradients),
    and the scores are the dense solve's under that lambda; damping_rule="rank" divides by min(n, d)."""
    n = 12
    store, grads = make_store(tmp_path / "s", SHAPES, n, seed=5)
    queries = queries_for(SHAPES)
    for scale in (0.001, 0.3, 10.0):
        got = score_store(store, queries, ScoreArguments(method="exact", damping_scale=scale, dtype="float64"))
        want = 0
        for name in SHAPES:
            G = flat(grads[name])
            rule = 0.1 * float((G * G).sum(1).mean()) / G.shape[1]
            assert got.damping[name] == pytest.approx(scale * rule, rel=1e-12)
            want = want + dense_exact(G, flat(queries[name]), scale * rule)[0]
        assert torch.allclose(got.scores, want, rtol=1e-8, atol=1e-8 * float(want.abs().max())), scale
    got = score_store(store, queries, ScoreArguments(method="datainf", damping_rule="rank", damping_scale=2.0))
    for name in SHAPES:
        G = flat(grads[name])
        rank_rule = 0.1 * float((G * G).sum(1).mean()) / min(n, G.shape[1])
        assert got.damping[name] == pytest.approx(2.0 * rank_rule, rel=1e-6)
    # a given damping is scaled too
    got = score_store(store, queries, ScoreArguments(method="identity", damping=0.5, damping_scale=4.0))
    assert all(v == pytest.approx(2.0) for v in got.damping.values())
    with pytest.raises(DataInfError, match="damping_scale must be a finite number > 0"):
        ScoreArguments(damping_scale=0.0)
    with pytest.raises(DataInfError, match="damping_rule must be one of"):
        ScoreArguments(damping_rule="gcv")


def test_dda_debias_is_the_difference_of_two_scores(tmp_path):
    """DDA's debias through combine equals the fine-tuned store's scores minus the base store's, each scored
    on its own and subtracted here."""
    store, _ = make_store(tmp_path / "final", SHAPES, 16, seed=1)
    base, _ = make_store(tmp_path / "base", SHAPES, 16, seed=2)
    q_final, q_base = queries_for(SHAPES, seed=3), queries_for(SHAPES, seed=4)
    args = ScoreArguments(method="datainf", dtype="float64")
    got = combine(debias_terms(store, q_final, base, q_base, args))
    want = score_store(store, q_final, args).scores - score_store(base, q_base, args).scores
    assert torch.allclose(got.scores, want, rtol=TOL, atol=TOL * float(want.abs().max()))
    assert [t["weight"] for t in got.terms] == [1.0, -1.0]


def test_cli_score_takes_each_remedy(tmp_path, capsys):
    """`datainf score --remove-top R --damping-scale X` writes the library's scores and records the remedy;
    `--debias` the library's difference; a bad value is refused with one error line and nothing written."""
    store, _ = make_store(tmp_path / "train", SHAPES, 16, seed=1)
    queries, _ = make_store(tmp_path / "queries", SHAPES, 3, seed=9)
    base, _ = make_store(tmp_path / "base", SHAPES, 16, seed=2)
    bq, _ = make_store(tmp_path / "base-q", SHAPES, 3, seed=10)
    out = tmp_path / "scores.safetensors"
    code, _, err = run(["score", "--store", str(store.path), "--queries", str(queries.path), "--method", "exact",
                        "--compute-dtype", "float64", "--remove-top", "2", "--damping-scale", "0.1", "--out", str(out)],
                       capsys)
    assert code == 0, err
    args = ScoreArguments(method="exact", dtype="float64", remove_top=2, damping_scale=0.1)
    want = score_store(store, queries, args).scores
    saved = load_scores(out)
    assert torch.allclose(saved.scores["exact"], want, rtol=TOL, atol=0)
    assert saved.settings["exact"]["arguments"]["remove_top"] == 2
    assert saved.settings["exact"]["arguments"]["damping_scale"] == 0.1
    code, _, err = run(["score", "--store", str(store.path), "--queries", str(queries.path), "--method", "identity",
                        "--debias", f"{base.path},{bq.path}", "--out", str(out)], capsys)
    assert code == 0, err
    want = (score_store(store, queries, ScoreArguments(method="identity")).scores
            - score_store(base, bq, ScoreArguments(method="identity")).scores)
    assert torch.allclose(load_scores(out).scores["identity"].double(), want.double(), rtol=1e-5,
                          atol=1e-5 * float(want.abs().max()))
    before = hashes(tmp_path)
    fresh = tmp_path / "fresh.safetensors"
    refused(["score", "--store", str(store.path), "--queries", str(queries.path), "--remove-top", "9", "--out",
             str(fresh)], capsys, "block 'b'", "directions")
    refused(["score", "--store", str(store.path), "--queries", str(queries.path), "--damping-scale", "-1", "--out",
             str(fresh)], capsys, "damping_scale")
    refused(["score", "--store", str(store.path), "--queries", str(queries.path), "--debias", str(base.path),
             "--out", str(fresh)], capsys, "--debias", "BASE_STORE,BASE_QUERIES")
    assert hashes(tmp_path) == before and not fresh.exists()


def test_adam_normalization_of_a_projected_store_is_refused(tmp_path):
    proj = {"kind": "gaussian", "dim": 2, "seed": 0, "blocks": {k: {"full_shape": list(s)} for k, s in SHAPES.items()}}
    try:
        store, _ = make_store(tmp_path / "p", SHAPES, 8, seed=0, projection=proj)
    except DataInfError:
        pytest.skip("this store layout does not take a hand-made projection record")
    save_file({k: torch.ones(*s) for k, s in SHAPES.items()}, str(tmp_path / SECOND_MOMENTS_FILE))
    with pytest.raises(DataInfError, match="projected gradients.*without --project"):
        score_store(store, None, ScoreArguments(method="identity", adam_moments=str(tmp_path)))


def test_remedies_round_trip_through_the_arguments_dict():
    args = ScoreArguments(method="lissa", remove_top=1, adam_moments="m.safetensors", damping_scale=3.0,
                          damping_rule="rank")
    assert ScoreArguments.from_dict(args.to_dict()) == args
    assert math.isclose(ScoreArguments.from_dict({"method": "datainf"}).damping_scale, 1.0)


def test_a_preconditioned_store_refuses_the_remedies(tmp_path):
    """Preconditioning bakes the method's damping into the rows; remedies apply to the original gradients:
    refused both when preconditioning and when scoring a preconditioned store."""
    from datainf.scoring import precondition_store

    store, _ = make_store(tmp_path / "s", SHAPES, 16, seed=0)
    with pytest.raises(DataInfError, match="precondition_store takes no remedy"):
        precondition_store(store, tmp_path / "p2", ScoreArguments(method="datainf", damping_scale=2.0))
    pre = precondition_store(store, tmp_path / "p", ScoreArguments(method="datainf"))
    with pytest.raises(DataInfError, match="preconditioned gradients; remove_top"):
        score_store(pre, queries_for(SHAPES), ScoreArguments(method="datainf", remove_top=1))
