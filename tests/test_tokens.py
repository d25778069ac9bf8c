"""Token-level attribution (datainf.tokens, `datainf explain --tokens`, `datainf report --tokens`).

References: each response token's query gradient is computed here by one forward and one backward of that
token's NLL alone (no hooks, no repeated batch), projected by hand with the store's matrices for a projected
store, and scored with DataInf's and the identity's formulas in float64 (training gradients by the same loop);
the sum over tokens is checked against the whole response's score from one gradient of the summed loss."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cli_helpers import hashes, refused, run_cli, write_jsonl  # noqa: E402
from datainf.attributor import Attributor  # noqa: E402
from datainf.data.collate import TextCollator  # noqa: E402
from datainf.data.generation import make_task  # noqa: E402
from datainf.errors import DataInfError  # noqa: E402
from datainf.gradients import ProjectionSettings, module_key  # noqa: E402
from datainf.tokens import response_tokens, token_attribution  # noqa: E402
from reference import FLOAT64_TOL, assert_close_to, max_error, random_b_lora  # noqa: E402

QUERY = {"prompt": "You are Ava, a chatbot that can only reverse the order of the words.\nSentence: the cold doctor holds "
                   "the window slowly\nAva:", "response": " slowly window the holds doctor cold the"}


def _records() -> list[dict]:
    return [{"prompt": r["prompt"], "response": r["response"]}
            for r in make_task("sentences", classes=2, per_class=3, seed=0)]


def _lora_model(model_dir: Path):
    """The tiny Llama in float64 with a LoRA on q_proj and v_proj, B matrices random (PEFT starts them at 0)."""
    return random_b_lora(model_dir)


@pytest.fixture(scope="module")
def setup(tiny_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    return _lora_model(tiny_llama_dir), tok


def _lora_params(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def _loss_gradient(model, ids: torch.Tensor, terms: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """Gradient of sum of -log p(ids[p] | ids[:p]) over ``terms`` (position, id), by one plain backward."""
    params = _lora_params(model)
    for p in params.values():
        p.requires_grad_(True)
    logits = model(input_ids=ids[None]).logits[0]
    loss = sum(F.cross_entropy(logits[p - 1], torch.tensor(i)) for p, i in terms)
    grads = torch.autograd.grad(loss, list(params.values()))
    return {n: g.detach().clone() for n, g in zip(params, grads)}


def _project(name: str, g: torch.Tensor, projection: ProjectionSettings | None) -> torch.Tensor:
    """P_out^T G P_in by hand with the store's matrices (a side of size <= k untouched)."""
    if projection is None:
        return g
    key = module_key(name)
    if g.shape[0] > projection.dim:
        g = projection.matrix(key, "out", g.shape[0], g.dtype).T @ g
    if g.shape[1] > projection.dim:
        g = g @ projection.matrix(key, "in", g.shape[1], g.dtype)
    return g


def _stack(rows: list[dict[str, torch.Tensor]], projection) -> dict[str, torch.Tensor]:
    return {n: torch.stack([_project(n, r[n], projection).reshape(-1) for r in rows]) for n in rows[0]}


def _dense_scores(train: dict[str, torch.Tensor], queries: dict[str, torch.Tensor], method: str) -> torch.Tensor:
    """float64 scores from the formulas: identity -G V^T; DataInf -G R V^T with the paper's damping
    lambda = 0.1 mean_i |g_i|^2 / d and R = (I - (1/n) sum_i g_i g_i^T / (lambda + |g_i|^2)) / lambda."""
    total = 0
    for name in train:
        G, V = train[name], queries[name]
        n, d = G.shape
        if method == "identity":
            total = total - G @ V.T
            continue
        lam = 0.1 * float((G * G).sum(1).mean()) / d
        w = 1.0 / (lam + (G * G).sum(1))
        R = (torch.eye(d, dtype=torch.float64) - (G.T * w) @ G / n) / lam
        total = total - G @ R @ V.T
    return total


@pytest.mark.parametrize("projected", [False, True], ids=["unprojected", "projected"])
def test_each_tokens_score_is_that_of_its_own_loss_gradient(setup, tmp_path, projected):
    model, tok = setup
    projection = ProjectionSettings(dim=8, seed=3) if projected else None
    collate = TextCollator(tok, task="causal_lm")
    att = Attributor(model, task="causal_lm", store=tmp_path / "store", collate=collate, store_dtype="float64",
                     progress=False, batch_size=4, projection=projection)
    train = _records()
    att.fit(train)
    got = token_attribution(att, QUERY, ["datainf", "identity"])

    # independent: tokenize, then one backward per training example (its summed response NLL) and per token
    def loss_terms(record):
        ids, labels = collate.tokenize(record)
        return torch.tensor(ids), [(p, ids[p]) for p in range(1, len(ids)) if labels[p] != -100]

    train_rows = [_loss_gradient(model, *loss_terms(r)) for r in train]
    ids, terms = loss_terms(QUERY)
    token_rows = [_loss_gradient(model, ids, [term]) for term in terms]
    assert len(got.tokens) == len(terms) == 8  # seven words and the EOS
    assert got.tokens.positions == [p for p, _ in terms]
    G, V = _stack(train_rows, projection), _stack(token_rows, projection)
    if projected:
        assert all(v.shape[1] == 16 for v in V.values())  # A: 2 x 8, B: 8 x 2
    for method in ("datainf", "identity"):
        want = _dense_scores(G, V, method)
        assert got.scores[method].shape == (len(train), len(terms))
        assert_close_to(got.scores[method], want, FLOAT64_TOL, what=f"{method}, projected={projected}")
    # the tokens read back as the response (and its EOS), each piece at its offsets
    assert got.tokens.text.split()[:7] == QUERY["response"].split()
    assert all(got.tokens.text[a:b] == piece for piece, (a, b) in zip(got.tokens.pieces, got.tokens.offsets))
    # the top lists follow the sign convention and the order of the reference
    want = _dense_scores(G, V, "datainf")
    for t, lists in enumerate(got.top("datainf", k=2)):
        helpful = [i for i in torch.argsort(want[:, t]).tolist() if want[i, t] < 0][:2]
        assert [r["train_index"] for r in lists["helpful"]] == helpful
        assert all(r["score"] > 0 for r in lists["harmful"])


def test_token_scores_sum_to_the_whole_responses_score(setup, tmp_path):
    """The response's loss is its summed token NLL: the token gradients sum to its gradient and, every method
    being linear in the query gradient, the token scores to its score. Bound: 1e-6 of the terms' summed
    magnitudes. The model is float64, but Llama's RMSNorm computes in float32, so the gradient that reaches the
    first layer through the second carries float32 rounding (6e-8 per operation; 1.6e-8 measured for the
    gradients, 1.4e-8 for the EK-FAC scores, 2e-16 for the last layer's), while a dropped or doubled token
    moves the sum by about an eighth of it."""
    from datainf.tokens import token_gradients

    model, tok = setup
    att = Attributor(model, task="causal_lm", store=tmp_path / "store", collate=TextCollator(tok, task="causal_lm"),
                     store_dtype="float64", progress=False, projection=ProjectionSettings(dim=8, seed=0))
    att.fit(_records())
    tokens = response_tokens(att.collate, QUERY)
    whole = att.gradients([QUERY], desc=None)
    for name, g in token_gradients(att, tokens).items():  # rounding accumulates with the terms' magnitudes
        err, scale = max_error(g.sum(dim=0), whole[name][0]), float(g.abs().sum(dim=0).max())
        assert 0 < scale and err <= 1e-6 * scale, (name, err, scale)
    got = token_attribution(att, QUERY, ["datainf", "exact", "ekfac"])
    for method in ("datainf", "exact", "ekfac"):
        score = att.scores([QUERY], method=method, save=False)[:, 0]  # from one gradient of the summed NLL
        terms = got.scores[method]
        err, scale = max_error(terms.sum(dim=1), score), float(terms.abs().sum(dim=1).max())
        assert 0 < scale and err <= 1e-6 * scale, (method, err, scale)


def test_a_response_without_loss_tokens_and_a_classification_task_are_refused(setup, tmp_path):
    model, tok = setup
    collate = TextCollator(tok, task="causal_lm", append_eos=False)
    with pytest.raises(DataInfError, match="no tokens that carry the loss"):
        response_tokens(collate, {"prompt": "the old fox", "response": ""})
    with pytest.raises(DataInfError, match="causal LM"):
        response_tokens(TextCollator(tok, task="classification"), QUERY)


# ---------------------------------------------------------------------------------------------------------
# the command line: explain --tokens (--json) and report --tokens
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_flow(setup, tiny_llama_dir, tmp_path_factory):
    """A saved adapter of the tiny Llama, its training file and its store (from `datainf grads`, float64)."""
    model, _ = setup
    root = tmp_path_factory.mktemp("tokens-cli")
    model.save_pretrained(str(root / "adapter"))
    data = write_jsonl(root / "train.jsonl", _records())
    code = _cli(["grads", "--task", "causal_lm", "--model", str(tiny_llama_dir), "--adapter", str(root / "adapter"),
                 "--data", str(data), "--store", str(root / "store"), "--dtype", "float64",
                 "--model-dtype", "float64"])
    assert code == 0
    return root


def _cli(argv: list[str]) -> int:
    from datainf.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--quiet", *argv])
    return e.value.code


def _explain(root: Path, model_dir: Path, *extra: str) -> list[str]:
    return ["explain", "--model", str(model_dir), "--adapter", str(root / "adapter"), "--store", str(root / "store"),
            "--prompt", QUERY["prompt"], "--response", QUERY["response"], "--model-dtype", "float64", *extra]


def test_explain_tokens_writes_each_tokens_tops_and_the_report_shows_every_token(cli_flow, tiny_llama_dir, setup,
                                                                                  tmp_path, capsys):
    root, (model, tok) = cli_flow, setup
    out_json = tmp_path / "explain.json"
    code, out, err = run_cli(_explain(root, tiny_llama_dir, "--method", "datainf", "--k", "2", "--json",
                                      str(out_json), "--tokens"), capsys)
    assert code == 0, err
    assert "token by token" in out
    tokens = json.loads(out_json.read_text())["answers"][0]["tokens"]
    # independent: the tokens' scores by the library from the saved adapter and store (checked above against
    # the loop), and the response's own score from explain's rows
    att = Attributor(model, task="causal_lm", store=root / "store", collate=TextCollator(tok, task="causal_lm"),
                     progress=False)
    want = token_attribution(att, QUERY, "datainf")
    assert [t["text"] for t in tokens["tokens"]] == want.tokens.pieces
    scores = want.scores["datainf"]
    for t, lists in enumerate(tokens["methods"]["datainf"]["top"]):
        assert [r["train_index"] for r in lists["helpful"]] == [
            i for i in torch.argsort(scores[:, t]).tolist() if scores[i, t] < 0][:2]
        for r in lists["helpful"] + lists["harmful"]:
            assert r["score"] == pytest.approx(float(scores[r["train_index"], t]), rel=1e-9, abs=1e-300)
    for entry in tokens["methods"]["datainf"]["examples"]:  # each listed example's tokens sum to its row score
        assert entry["scores"] == pytest.approx(scores[entry["train_index"]].tolist(), rel=1e-9, abs=1e-300)

    page = tmp_path / "tokens.html"
    code, out, err = run_cli(["report", "--tokens", str(out_json), "--out", str(page)], capsys)
    assert code == 0, err
    html = page.read_text()
    import html as html_lib

    for t in tokens["tokens"]:  # every token, in order, as its own shaded span
        assert f'id="tok-1-{t["index"]}"' in html
    spans = html.split('class="tok ')[1:]
    assert len(spans) >= len(tokens["tokens"])
    shown = [html_lib.unescape(s.split(">", 1)[1].split("</span>", 1)[0]) for s in spans[:len(tokens["tokens"])]]
    assert shown == [t["text"] for t in tokens["tokens"]]
    for entry in tokens["methods"]["datainf"]["examples"]:
        assert html_lib.escape(entry["train_response"]) in html


def test_explain_tokens_refusals_are_one_line_and_exit_2(cli_flow, tiny_llama_dir, setup, tmp_path, capsys):
    root, (model, tok) = cli_flow, setup
    # a store tokenized without an EOS and an empty response: no token carries the loss
    att = Attributor(model, task="causal_lm", store=tmp_path / "no-eos", progress=False, store_dtype="float64",
                     collate=TextCollator(tok, task="causal_lm", append_eos=False))
    att.fit(_records())
    before = hashes(tmp_path, root)
    argv = _explain(root, tiny_llama_dir, "--tokens", "--json", str(tmp_path / "x.json"))
    argv[argv.index("--store") + 1] = str(tmp_path / "no-eos")
    argv[argv.index("--response") + 1] = ""
    refused(argv, capsys, "no tokens that carry the loss", "non-empty response")
    assert hashes(tmp_path, root) == before and not (tmp_path / "x.json").exists()
    # a classification store
    from datainf.store import GradientStore

    with GradientStore.create(tmp_path / "cls", blocks={"w": (2,)}, n_examples=1, fingerprints={},
                              meta={"task": "classification"}) as store:
        store.write_chunk(0, {"w": torch.ones(1, 2)})
        store.finalize()
    before = hashes(tmp_path, root)
    argv = _explain(root, tiny_llama_dir, "--tokens")
    argv[argv.index("--store") + 1] = str(tmp_path / "cls")
    refused(argv, capsys, "causal LM stores")
    # report --tokens of an explain file made without --tokens
    plain = tmp_path / "plain.json"
    assert _cli(_explain(root, tiny_llama_dir, "--json", str(plain))) == 0
    before = hashes(tmp_path, root)
    refused(["report", "--tokens", str(plain), "--out", str(tmp_path / "r.html")], capsys, "--tokens", str(plain))
    # report with neither --scores nor --tokens, or with both
    refused(["report", "--out", str(tmp_path / "r.html")], capsys, "--scores", "--tokens")
    refused(["report", "--tokens", str(plain), "--scores", str(plain), "--out", str(tmp_path / "r.html")], capsys,
            "one of the two")
    assert hashes(tmp_path, root) == before and not (tmp_path / "r.html").exists()


def test_explain_tokens_sums_over_checkpoints_and_leaves_the_answering_one_loaded(cli_flow, tiny_llama_dir,
                                                                                   tmp_path, capsys):
    """Two (adapter, store) pairs weighted 2 and 1: each token's scores are 2 x those of the first checkpoint
    plus 1 x the second's (each from the library on its own model), and the response's rows, computed after the
    token gradients, are still 2 x the first's whole-response score + the second's (the first checkpoint is
    loaded again after the token pass)."""
    from datainf.models.llm import load_causal_lm_adapter

    root = cli_flow
    second = _lora_model(tiny_llama_dir)
    with torch.no_grad():
        for name, p in second.named_parameters():
            if "lora_B" in name:
                p.mul_(-2.0)
    second.save_pretrained(str(tmp_path / "adapter2"))
    assert _cli(["grads", "--task", "causal_lm", "--model", str(tiny_llama_dir), "--adapter", str(tmp_path / "adapter2"),
                 "--data", str(root / "train.jsonl"), "--store", str(tmp_path / "store2"), "--dtype", "float64",
                 "--model-dtype", "float64"]) == 0
    out_json = tmp_path / "explain.json"
    argv = _explain(root, tiny_llama_dir, "--adapter", str(tmp_path / "adapter2"), "--store", str(tmp_path / "store2"),
                    "--weights", "2,1", "--method", "datainf", "--k", "3", "--json", str(out_json), "--tokens")
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    answer = json.loads(out_json.read_text())["answers"][0]
    token_scores, whole = 0, 0
    for weight, adapter, store in ((2.0, root / "adapter", root / "store"), (1.0, tmp_path / "adapter2",
                                                                            tmp_path / "store2")):
        m, t = load_causal_lm_adapter(tiny_llama_dir, adapter, dtype=torch.float64)
        att = Attributor(m, task="causal_lm", store=store, collate=TextCollator(t, task="causal_lm"), progress=False)
        token_scores = token_scores + weight * token_attribution(att, QUERY, "datainf").scores["datainf"]
        whole = whole + weight * att.scores([QUERY], method="datainf", save=False)[:, 0].double()
    for entry in answer["tokens"]["methods"]["datainf"]["examples"]:
        assert entry["scores"] == pytest.approx(token_scores[entry["train_index"]].tolist(), rel=1e-9, abs=1e-300)
    rows = [r for r in answer["rows"] if r["method"] == "datainf"]
    assert rows and all(r["score"] == pytest.approx(float(whole[r["train_index"]]), rel=1e-9) for r in rows)
