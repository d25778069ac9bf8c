"""Command-line options defined once (issue 30): ``--option NAME=VALUE`` reaches a method's options dataclass,
bad ones are refused in one line naming the method and the allowed names, ``explain`` takes ``score``'s scoring
options, and no flag is spelled in many ``click.option`` calls.

The LiSSA scores are checked against the recursion written here in float64 on a float64 store (given scale,
every row in each step, so the result is deterministic): ``r_0 = v``, ``r_j = r_{j-1} + v - (H + lambda I)
r_{j-1} / s``, ``x = r_k / s``, ``score = -g . x`` summed over blocks, with ``H = G^T G / n``. Both sides round
the same float64 sums in another order: 1e-9 of the largest score bounds that; three iterations instead of
two, or another scale, move the scores by far more.
"""

from __future__ import annotations

import ast
import os
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from cli_helpers import hashes, refused  # noqa: E402
from cli_helpers import run_cli as run  # noqa: E402
from datainf.scoring import load_scores  # noqa: E402
from datainf.store import GradientStore  # noqa: E402

SHAPES = {"w": (6, 10), "b": (6,)}
FPS = {"model": "m" * 16, "adapter": "a" * 16, "task": "t" * 16, "dataset": "d" * 16}
SRC = Path(__file__).resolve().parents[1] / "src" / "datainf"


def write_store(path: Path, n: int, seed: int) -> dict[str, torch.Tensor]:
    """A finished float64 store of seeded random gradients; returns them."""
    gen = torch.Generator().manual_seed(seed)
    g = {k: torch.randn(n, *s, generator=gen, dtype=torch.float64) for k, s in SHAPES.items()}
    with GradientStore.create(path, blocks=SHAPES, n_examples=n, fingerprints=FPS, chunk_size=16,
                              dtype="float64") as store:
        for c in store.missing_chunks():
            rows = store.chunk_rows(c)
            store.write_chunk(c, {k: v[rows.start: rows.stop] for k, v in g.items()})
        store.finalize()
    return g


def lissa_reference(train: dict[str, torch.Tensor], query: dict[str, torch.Tensor], damping: float, scale: float,
                    iterations: int) -> torch.Tensor:
    total = torch.zeros(next(iter(train.values())).shape[0], next(iter(query.values())).shape[0],
                        dtype=torch.float64)
    for name in train:
        G = train[name].reshape(train[name].shape[0], -1)
        V = query[name].reshape(query[name].shape[0], -1).T  # (d, m)
        H = G.T @ G / G.shape[0] + damping * torch.eye(G.shape[1], dtype=torch.float64)
        R = V.clone()
        for _ in range(iterations):
            R = R + V - H @ R / scale
        total -= G @ (R / scale)
    return total


@pytest.fixture()
def stores(tmp_path):
    train = write_store(tmp_path / "train", 40, 0)
    query = write_store(tmp_path / "queries", 3, 1)
    return tmp_path, train, query


def test_option_reaches_the_methods_options_dataclass(stores, capsys):
    tmp, train, query = stores
    base = ["score", "--store", str(tmp / "train"), "--queries", str(tmp / "queries"), "--method", "lissa",
            "--damping", "0.1", "--compute-dtype", "float64", "--option", "scale=50"]
    assert run([*base, "--option", "iterations=3", "--out", str(tmp / "a.safetensors")], capsys)[0] == 0
    stored = load_scores(str(tmp / "a.safetensors")).scores["lissa"]
    got = stored.double()
    want = lissa_reference(train, query, 0.1, 50.0, 3)
    assert float((got - want).abs().max()) <= 1e-9 * float(want.abs().max())
    assert float((want - lissa_reference(train, query, 0.1, 50.0, 2)).abs().max()) > 1e-3 * float(want.abs().max())
    # the old flag is the same option; METHOD.NAME targets one method
    assert run([*base, "--lissa-iterations", "3", "--out", str(tmp / "b.safetensors")], capsys)[0] == 0
    assert torch.equal(load_scores(str(tmp / "b.safetensors")).scores["lissa"], stored)
    assert run([*base, "--method", "datainf", "--option", "lissa.iterations=3", "--out",
                str(tmp / "c.safetensors")], capsys)[0] == 0
    assert torch.equal(load_scores(str(tmp / "c.safetensors")).scores["lissa"], stored)


@pytest.mark.parametrize("extra, words", [
    (["--method", "datainf", "--option", "depth=3"], ["--option depth=3", "datainf", "depth", "allowed"]),
    (["--method", "lissa", "--option", "iterations=abc"], ["lissa", "iterations", "'abc'", "allowed"]),
    (["--method", "lissa", "--option", "iterations"], ["NAME=VALUE", "lissa: iterations, scale, batch_size, seed"]),
    (["--method", "lissa", "--option", "exact.iterations=2"], ["exact", "not among the chosen methods", "lissa"]),
    (["--method", "lissa", "--option", "iterations=0"], ["lissa", "iterations must be >= 1"]),
    (["--method", "nope"], ["unknown method 'nope'", "datainf"]),
])
def test_bad_option_is_one_line_naming_the_method_and_allowed_names(stores, capsys, extra, words):
    tmp, _, _ = stores
    before = hashes(tmp / "train", tmp / "queries")
    refused(["score", "--store", str(tmp / "train"), "--queries", str(tmp / "queries"), *extra,
             "--out", str(tmp / "s.safetensors")], capsys, *words)
    assert not (tmp / "s.safetensors").exists() and hashes(tmp / "train", tmp / "queries") == before


def test_explain_takes_the_scoring_options_of_score(tmp_path, capsys):
    code, out, _ = run(["explain", "--help"], capsys)
    assert code == 0
    for flag in ("--method", "--damping", "--option", "--compute-dtype", "--normalize", "--lissa-iterations"):
        assert flag in out, flag
    # read (and refused) before any model or store is opened
    for folder in ("model", "adapter", "store"):
        (tmp_path / folder).mkdir()
    refused(["explain", "--model", str(tmp_path / "model"), "--adapter", str(tmp_path / "adapter"), "--store",
             str(tmp_path / "store"), "--prompt", "hi", "--method", "datainf", "--option", "depth=3"], capsys,
            "depth", "datainf", "allowed")


def test_each_flag_is_spelled_in_few_click_options():
    """At most 10 flags are spelled in more than one ``click.option`` call (the rest come from cli/options.py)."""
    spelled: Counter[str] = Counter()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "option"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "click"):
                for arg in node.args:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("-"):
                        spelled.update(f.strip() for f in arg.value.split("/"))
    repeated = sorted(f for f, n in spelled.items() if n > 1)
    assert len(repeated) <= 10, repeated
    assert "--method" not in repeated and "--damping" not in repeated


def test_method_names_are_written_only_in_the_estimators_package():
    """At most 3 string literals outside datainf/estimators/ name a registered method (the default lists live in
    datainf.estimators.defaults); "datainf" as the package, program, logger or metadata key is not a method."""
    import re

    from datainf.estimators import method_names

    names = set(method_names())
    found = []
    for path in SRC.rglob("*.py"):
        if "estimators" in path.relative_to(SRC).parts:
            continue
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                line = lines[node.lineno - 1]
                if node.value == "datainf" and re.search(
                        r'getLogger|package_name|prog_name|split\(|\.cache|\.get\("datainf"|\{"datainf":', line):
                    continue
                found.append(f"{path.relative_to(SRC)}:{node.lineno}:{node.value}")
    assert len(found) <= 3, found


def datainf_reference(train: dict[str, torch.Tensor], query: dict[str, torch.Tensor], remove_top: int = 0
                      ) -> torch.Tensor:
    """DataInf in float64 from its formula (the paper's damping rule per block), after removing each block's
    top right singular vectors of the training gradients (an explicit SVD) from both sides."""
    total = 0
    for name in train:
        G = train[name].reshape(train[name].shape[0], -1)
        V = query[name].reshape(query[name].shape[0], -1)
        if remove_top:
            top = torch.linalg.svd(G, full_matrices=False).Vh[:remove_top].T  # (d, r)
            G, V = G - G @ top @ top.T, V - V @ top @ top.T
        n, d = G.shape
        lam = 0.1 * float((G * G).sum()) / (n * d)
        coef = (V @ G.T) / (lam + (G * G).sum(1))[None, :]  # (m, n)
        total = total - ((G @ V.T) - G @ G.T @ coef.T / n) / lam
    return total


@pytest.mark.parametrize("question", ["per_query", "mean_query"])
@pytest.mark.parametrize("spec", ["datainf", "datainf:remove_top=1"])
def test_score_without_method_uses_the_default_spec_of_the_stores_kind(stores, capsys, monkeypatch, spec, question):
    """No --method on a store that is not over tokens: `score` uses DEFAULTS['classification'][question] (a
    method and options; here each of two specs in turn, for each queries and --mean-query), against DataInf
    from its formula in float64 (the direction removal by an explicit SVD); a flag the user gives wins over the
    spec's option."""
    from datainf.estimators import defaults

    monkeypatch.setitem(defaults.DEFAULTS, "classification", {**defaults.DEFAULTS["classification"], question: spec})
    tmp, train, query = stores
    if question == "mean_query":
        query = {k: v.mean(0, keepdim=True) for k, v in query.items()}  # influence is linear in the query
    flags = ["--mean-query"] if question == "mean_query" else []
    out = tmp / "s.safetensors"
    code, printed, err = run(["score", "--store", str(tmp / "train"), "--queries", str(tmp / "queries"), "--out",
                              str(out), *flags], capsys)
    assert code == 0, err
    assert f"method: {spec} (the default for classification stores, {question.replace('_', ' ')}" in printed
    got = load_scores(out).scores["datainf"].double()
    want = datainf_reference(train, query, remove_top=1 if "remove_top" in spec else 0)
    assert float((got - want).abs().max()) <= 1e-9 * float(want.abs().max())
    code, _, err = run(["score", "--store", str(tmp / "train"), "--queries", str(tmp / "queries"), "--out",
                        str(out), "--remove-top", "2", *flags], capsys)
    assert code == 0, err
    want = datainf_reference(train, query, remove_top=2)
    assert float((load_scores(out).scores["datainf"].double() - want).abs().max()) <= 1e-9 * float(want.abs().max())


def test_the_declared_defaults_are_valid_specs_of_every_question():
    """Every default in estimators.defaults.DEFAULTS is a spec ScoreArguments accepts, for every kind and question."""
    from datainf.estimators import arguments_from_spec
    from datainf.estimators.defaults import DEFAULTS, QUESTIONS

    for kind, table in DEFAULTS.items():
        assert set(table) == set(QUESTIONS), kind
        for question, spec in table.items():
            arguments_from_spec(spec, mean_query=question == "mean_query")
