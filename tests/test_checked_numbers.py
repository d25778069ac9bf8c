"""Issue 33, "checked numbers" and the explain / top answers: checkpoint weights must be finite and > 0
(from --weights or from the checkpoint's files), stores summed in one answer must share tokenization,
projection and task, a (adapter, store) pair counts once, the helpful / harmful lists hold only examples
of their sign, a preconditioned store is refused before the model is loaded, CLI messages name what a CLI
user can run, and a model config.json without model_type is one error line.

Every refusal is asserted as one `error:` line, exit status 2 and every input file's sha256 unchanged;
every answer is compared with scores computed independently (the library's Attributor on a model loaded
from its own folder, float64).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import datainf  # noqa: E402
from cli_helpers import (  # noqa: E402
    hashes,
    refused,
    write_jsonl,  # noqa: E402
)
from cli_helpers import run_cli as run  # noqa: E402
from datainf.cli import main  # noqa: E402
from datainf.data.generation import make_task  # noqa: E402
from datainf.scoring import load_scores  # noqa: E402
from datainf.store import GradientStore  # noqa: E402
from reference import FLOAT64_TOL  # noqa: E402

PROMPT = "Sentence: the old fox finds the book near the lake and the gentle robot carries the candle\nAva:"
RESPONSE = " candle the carries robot gentle the and lake the near book the finds fox old the"


@pytest.fixture(scope="module")
def setup(tiny_llama_dir, tmp_path_factory):
    """A prompt/response data file; `finetune --checkpoints 2` (the final adapter and checkpoint-2, each with
    the learning rate it was saved at); float64 stores of each: the defaults (max_length 128), and of the
    final adapter also with --loss-tokens all, --max-length 16 and --project 8; checkpoint-2 also at 16."""
    root = tmp_path_factory.mktemp("checked-numbers")
    records = [{"prompt": r["prompt"], "response": r["response"]}
               for r in make_task("sentences", classes=2, per_class=3)]
    data = write_jsonl(root / "data.jsonl", records)
    adapter = root / "adapter"

    def cli(argv: list[str]) -> None:
        with pytest.raises(SystemExit) as e:
            main(["--quiet", *argv])
        assert e.value.code == 0, argv

    cli(["finetune", "--task", "causal_lm", "--model", str(tiny_llama_dir), "--train", str(data), "--out",
         str(adapter), "--epochs", "2", "--batch-size", "3", "--rank", "2", "--lr", "5e-2", "--checkpoints", "2",
         "--device", "cpu"])
    adapters = {"final": adapter, "early": adapter / "checkpoint-2"}
    stores = {}
    for name, which, extra in (("final", "final", []), ("early", "early", []),
                               ("loss-all", "final", ["--loss-tokens", "all"]),
                               ("final16", "final", ["--max-length", "16"]),
                               ("early16", "early", ["--max-length", "16"]),
                               ("projected", "final", ["--project", "8"])):
        stores[name] = root / f"store-{name}"
        cli(["grads", "--task", "causal_lm", "--model", str(tiny_llama_dir), "--adapter", str(adapters[which]),
             "--data", str(data), "--store", str(stores[name]), "--dtype", "float64", "--model-dtype", "float64",
             *extra])
    return {"root": root, "model": Path(tiny_llama_dir), "data": data, "records": records, "adapters": adapters,
            "stores": stores}


def explain_argv(setup: dict, pairs: list[tuple[Path, Path]], *extra: str) -> list[str]:
    argv = ["explain", "--model", str(setup["model"]), "--prompt", PROMPT, "--response", RESPONSE,
            "--model-dtype", "float64", *extra]
    return argv + [x for a, s in pairs for x in ("--adapter", str(a), "--store", str(s))]


def copy_adapter(source: Path, target: Path) -> Path:
    """The adapter's own files (not its checkpoint-N subfolders), without its datainf_checkpoint.json."""
    target.mkdir()
    for p in source.iterdir():
        if p.is_file() and p.name != "datainf_checkpoint.json":
            shutil.copy2(p, target / p.name)
    return target


def independent_scores(setup: dict, adapter: Path, store: Path, method: str, max_length: int = 128) -> torch.Tensor:
    """The query's scores against ``store``: the model loaded afresh from its folders with ``adapter``, the
    query tokenized by a collator of the given max_length, scored by ``datainf.influence``."""
    from datainf.attributor import Attributor
    from datainf.data.collate import TextCollator
    from datainf.models.llm import load_causal_lm_adapter

    model, tok = load_causal_lm_adapter(setup["model"], adapter, dtype=torch.float64)
    collate = TextCollator(tok, task="causal_lm", max_length=max_length)
    query = Attributor(model, task="causal_lm", collate=collate, progress=False).gradients(
        [{"prompt": PROMPT, "response": RESPONSE}])
    return datainf.influence(GradientStore.open(store).blocks(), query, method)[:, 0]


# ------------------------------------------------------------------------------------------------ defect 4
@pytest.mark.parametrize("weights", ["nan,1", "1,inf", "-1,1", "0,0", "1,-inf", "1e400,1"])
def test_bad_weights_given_by_flag_are_refused(setup, tmp_path, capsys, weights):
    """--weights NaN / infinite / negative / zero: refused naming the position in --weights and the
    adapter, before anything is computed (old: every score NaN, +-inf, helpful and harmful swapped, zero)."""
    s = setup
    second = shutil.copytree(s["stores"]["early"], tmp_path / "store-copy")
    pairs = [(s["adapters"]["final"], s["stores"]["final"]), (s["adapters"]["early"], second)]
    before = hashes(s["root"], second)
    bad = next(i for i, w in enumerate(weights.split(","), start=1) if not 0 < float(w) < math.inf)
    refused(explain_argv(s, pairs, "--weights", weights, "--json", str(tmp_path / "e.json")), capsys,
            f"--weights number {bad}", "finite number > 0")
    assert hashes(s["root"], second) == before and not (tmp_path / "e.json").exists()


@pytest.mark.parametrize("rate", [float("nan"), float("inf"), -1e-3, 0, 0.0, True, "1e-3"])
@pytest.mark.parametrize("source", ["trainer_state.json", "datainf_checkpoint.json"])
def test_bad_learning_rates_in_checkpoint_files_are_refused(setup, tmp_path, capsys, rate, source):
    """A checkpoint whose trainer_state.json (the Trainer's, TRL's) or datainf_checkpoint.json gives a
    learning rate of NaN, infinity, a negative number, 0, true or a string: refused naming the file (old:
    used as the checkpoint's weight, exit 0)."""
    s = setup
    good = copy_adapter(s["adapters"]["final"], tmp_path / "checkpoint-4")
    bad = copy_adapter(s["adapters"]["early"], tmp_path / "checkpoint-2")
    (good / "trainer_state.json").write_text(json.dumps(
        {"global_step": 4, "log_history": [{"step": 4, "learning_rate": 1e-3, "loss": 1.0}]}))
    if source == "trainer_state.json":
        (bad / source).write_text(json.dumps({"global_step": 2, "log_history": [
            {"step": 1, "learning_rate": 2e-3, "loss": 2.0}, {"step": 2, "learning_rate": rate, "loss": 1.5},
            {"step": 2, "train_runtime": 1.0}]}))  # json.dumps writes NaN / Infinity as Python reads them
    else:
        (bad / source).write_text(json.dumps({"step": 2, "learning_rate": rate, "steps": 4}))
    pairs = [(good, s["stores"]["final"]), (bad, s["stores"]["early"])]
    before = hashes(s["root"], good, bad)
    refused(explain_argv(s, pairs, "--weights", "lr"), capsys, str(bad / source), "learning_rate",
            "finite number > 0")
    assert hashes(s["root"], good, bad) == before


# ------------------------------------------------------------------------------------------------ defect 7
@pytest.mark.parametrize("other, field, values", [
    ("loss-all", "loss_tokens", ("'assistant'", "'all'")),
    ("final16", "max_length", ("128", "16")),
    ("projected", "projection", ("'none'", "'k=8, seed 0'")),
])
def test_stores_of_other_tokenization_or_projection_are_not_summed(setup, tmp_path, capsys, other, field, values):
    """A checkpoint sum over a store tokenized otherwise (--loss-tokens all, --max-length 16) or projected
    beside an unprojected one: refused naming both stores, the field and both values (old: summed, exit 0)."""
    s = setup
    adapter_copy = copy_adapter(s["adapters"]["final"], tmp_path / "adapter-copy")  # the same weights
    pairs = [(s["adapters"]["final"], s["stores"]["final"]), (adapter_copy, s["stores"][other])]
    before = hashes(s["root"], adapter_copy)
    refused(explain_argv(s, pairs, "--weights", "1,1"), capsys, str(s["stores"]["final"]), str(s["stores"][other]),
            field, *values)
    assert hashes(s["root"], adapter_copy) == before


def test_a_checkpoint_sum_tokenizes_the_query_as_every_store_was(setup, tmp_path, capsys):
    """A store of max_length 16 after one of 128 is refused (old: the query was cut to the first store's
    length for every checkpoint); two stores of 16 give sum_c w_c * score_c with the query cut to 16 tokens
    for each, checked against each checkpoint scored alone from its own folder."""
    s = setup
    a, b = s["adapters"]["final"], s["adapters"]["early"]
    refused(explain_argv(s, [(a, s["stores"]["final"]), (b, s["stores"]["early16"])], "--weights", "1,2"), capsys,
            "max_length", "128", "16")
    out = tmp_path / "e.json"
    code, _, err = run(explain_argv(s, [(a, s["stores"]["final16"]), (b, s["stores"]["early16"])], "--weights", "1,2",
                                    "--method", "identity", "--k", "3", "--json", str(out)), capsys)
    assert code == 0, err
    assert "more than the store's max_length of 16" in err  # the query is longer: cut, as the examples were
    want = (independent_scores(s, a, s["stores"]["final16"], "identity", max_length=16)
            + 2 * independent_scores(s, b, s["stores"]["early16"], "identity", max_length=16))
    rows = json.loads(out.read_text())["answers"][0]["rows"]
    assert rows
    for r in rows:
        assert r["score"] == pytest.approx(float(want[r["train_index"]]), rel=FLOAT64_TOL, abs=1e-300)


# ------------------------------------------------------------------------------------------------ defect 12
def test_explain_lists_only_examples_of_each_lists_sign(setup, tmp_path, capsys):
    """--k as large as the training set: at least one list must be short (helpful + harmful <= n). Each
    list holds exactly the examples of its sign, most extreme first, and the output says how many have it
    (old: k rows each, examples of the other sign among the "most harmful")."""
    s = setup
    adapter, store = s["adapters"]["final"], s["stores"]["final"]
    n = len(s["records"])
    out = tmp_path / "e.json"
    code, text, err = run(explain_argv(s, [(adapter, store)], "--method", "datainf,identity", "--k", str(n),
                                       "--json", str(out)), capsys)
    assert code == 0, err
    rows = json.loads(out.read_text())["answers"][0]["rows"]
    for method in ("datainf", "identity"):
        scores = independent_scores(s, adapter, store, method)
        helpful = [i for i in torch.argsort(scores).tolist() if scores[i] < 0]
        harmful = [i for i in torch.argsort(scores, descending=True).tolist() if scores[i] > 0]
        assert len(helpful) < n or len(harmful) < n
        for kind, want in (("helpful", helpful), ("harmful", harmful)):
            got = [r for r in rows if r["method"] == method and r["kind"] == kind]
            assert [r["train_index"] for r in got] == want
            for r in got:
                assert r["score"] == pytest.approx(float(scores[r["train_index"]]), rel=FLOAT64_TOL, abs=1e-300)
            if len(want) < n:
                assert f"only {len(want)} of {n} training examples" in text or (
                    not want and f"none of the {n} training examples has a {kind} score" in text)


def test_top_lists_only_examples_of_each_lists_sign(setup, tmp_path, capsys):
    """`top` JSON lines and CSV: the rows of each list are exactly the examples of its sign (from the scores
    file the command read), and stderr says which lists are short (old: k rows, either sign)."""
    s = setup
    scores_path = tmp_path / "s.safetensors"
    code, _, err = run(["score", "--store", str(s["stores"]["final"]), "--queries", str(s["stores"]["final"]),
                        "--method", "identity", "--out", str(scores_path)], capsys)
    assert code == 0, err
    scores = load_scores(scores_path).scores["identity"].double()
    n, m = scores.shape
    expected = {}
    for j in range(m):
        col = scores[:, j]
        expected[(f"query {j}", "helpful")] = [i for i in torch.argsort(col).tolist() if col[i] < 0]
        expected[(f"query {j}", "harmful")] = [i for i in torch.argsort(col, descending=True).tolist() if col[i] > 0]
    assert any(len(v) < n for v in expected.values())
    for out_format in ("jsonl", "csv"):
        out = tmp_path / f"top.{out_format}"
        code, _, err = run(["top", "--scores", str(scores_path), "--k", str(n), "--format", out_format,
                            "--out", str(out)], capsys)
        assert code == 0, err
        if out_format == "jsonl":
            rows = [json.loads(line) for line in out.read_text().splitlines()]
        else:
            import csv

            rows = list(csv.DictReader(out.open(newline="")))
        for (query, kind), want in expected.items():
            got = [r for r in rows if r["query"] == query and r["kind"] == kind]
            assert [int(r["train_index"]) for r in got] == want, (query, kind)
            for r in got:
                assert float(r["score"]) == pytest.approx(float(scores[int(r["train_index"]), int(query[6:])]),
                                                          rel=FLOAT64_TOL)
        short = [(q, k, len(v)) for (q, k), v in expected.items() if len(v) < n]
        query, kind, count = short[0]
        assert f"identity, {query}: " in err and f"{kind} score" in err and (
            f"only {count} of {n}" in err or f"none of the {n}" in err)


def test_html_report_lists_only_examples_of_each_lists_sign(tmp_path):
    """The HTML report agrees: a harmful table of the 2 positive scores only, its caption saying so."""
    from datainf.report.html import write_report

    values = np.array([-3.0, 2.0, -1.0, -0.5, 4.0, -2.0])
    train = [{"text": f"example {i}", "label": 0} for i in range(len(values))]
    raw = write_report(tmp_path / "r.html", results={"task": "classification", "methods": {"identity": {}}},
                       train=train, scores={"identity": values}, top_k=5).read_text(encoding="utf-8")
    section = raw[raw.index('id="harmful"'):]
    table = section[:section.index("</table>")]
    body = table[table.index("<tbody>"):]
    assert body.count("<tr") == 2 and "only 2 of 6 training examples raise it" in table
    assert body.index("example 4") < body.index("example 1")  # the two positive scores, largest first


# ------------------------------------------------------------------------------------------------ defect 14a
def test_a_store_preconditioned_for_another_method_is_refused_before_the_model_is_loaded(setup, tmp_path, capsys):
    """The model folder given is empty: loading it would fail; the precondition mismatch is refused first
    (old: the model was loaded, then the store refused)."""
    s = setup
    pre = tmp_path / "pre"
    code, _, err = run(["store", "precondition", str(s["stores"]["final"]), str(pre), "--method", "datainf"], capsys)
    assert code == 0, err
    empty_model = tmp_path / "not-a-model"
    empty_model.mkdir()
    before = hashes(s["root"], pre, empty_model)
    argv = explain_argv(s, [(s["adapters"]["final"], pre)], "--method", "identity")
    argv[argv.index("--model") + 1] = str(empty_model)
    refused(argv, capsys, "preconditioned for 'datainf'")
    assert hashes(s["root"], pre, empty_model) == before


# ------------------------------------------------------------------------------------------------ defect 14b
def test_an_incomplete_store_tells_a_cli_user_what_to_run(setup, tmp_path, capsys):
    """The message for an unfinished store names the command that finishes it, not the API's keyword."""
    s = setup
    store = shutil.copytree(s["stores"]["final"], tmp_path / "unfinished")
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["complete"] = False
    (store / "manifest.json").write_text(json.dumps(manifest))
    before = hashes(s["root"], store)
    for argv in (["score", "--store", str(store), "--self", "--out", str(tmp_path / "x.safetensors")],
                 explain_argv(s, [(s["adapters"]["final"], store)])):
        line = refused(argv, capsys, "incomplete", "datainf grads")
        assert "allow_incomplete" not in line
    assert hashes(s["root"], store) == before and not (tmp_path / "x.safetensors").exists()


# ------------------------------------------------------------------------------------------------ defect 14d
def test_the_same_pair_given_twice_is_refused(setup, tmp_path, capsys):
    """The same (adapter, store) pair twice, spelled the same or through a symbolic link: refused naming
    the pair (old: its scores counted twice)."""
    s = setup
    adapter, store = s["adapters"]["final"], s["stores"]["final"]
    (tmp_path / "adapter-link").symlink_to(adapter)
    (tmp_path / "store-link").symlink_to(store)
    before = hashes(s["root"])
    for second in ((adapter, store), (tmp_path / "adapter-link", tmp_path / "store-link")):
        refused(explain_argv(s, [(adapter, store), second], "--weights", "equal"), capsys,
                "pair 2", f"--adapter {second[0]} --store {second[1]}", "pair 1", "twice")
    assert hashes(s["root"]) == before


# ------------------------------------------------------------------------------------------------ defect 10c
def test_a_model_config_without_model_type_is_one_error_line(setup, tmp_path, capsys):
    s = setup
    model = shutil.copytree(s["model"], tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    del config["model_type"]
    (model / "config.json").write_text(json.dumps(config))
    before = hashes(s["root"], model)
    refused(["grads", "--task", "causal_lm", "--model", str(model), "--adapter", str(s["adapters"]["final"]),
             "--data", str(s["data"]), "--store", str(tmp_path / "store")], capsys,
            str(model / "config.json"), "model_type")
    assert not (tmp_path / "store").exists()
    argv = explain_argv(s, [(s["adapters"]["final"], s["stores"]["final"])])
    argv[argv.index("--model") + 1] = str(model)
    refused(argv, capsys, str(model / "config.json"), "model_type")
    refused(["finetune", "--task", "causal_lm", "--model", str(model), "--train", str(s["data"]), "--out",
             str(tmp_path / "adapter"), "--epochs", "1", "--device", "cpu"], capsys,
            str(model / "config.json"), "model_type")
    assert hashes(s["root"], model) == before and not (tmp_path / "adapter").exists()
