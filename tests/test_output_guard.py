"""Issue 33, the one output guard (datainf.outputs): every command that writes checks its output before any work.

Defects: (1) `explain --json` overwrote the store, the adapter, the model's config.json, the conversation; (5) a
rerun of `finetune --out` deleted every other file in the adapter folder; (11) `score --out` replaced any
.safetensors file (a model's weights) and `report --out` any file, with mode 0600; (14c) `top --format csv` wrote
texts starting with = + - @ tab CR as they are (CSV injection).

Every command that writes x every kind of input it reads: refused with exit 2, one `error:` line, and the sha256
of every input file unchanged. Built once per module on the tiny BERT and tiny Llama of conftest.py.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

from cli_helpers import hashes as every_hash  # noqa: E402
from cli_helpers import (
    refused,  # noqa: E402
    write_jsonl,  # noqa: E402
)
from cli_helpers import run_cli as run  # noqa: E402
from datainf.data.generation import chat_records, make_task  # noqa: E402
from datainf.store import GradientStore  # noqa: E402

#: texts a spreadsheet would run as formulas (OWASP's list: = + - @ tab CR), and plain ones
DANGEROUS = ["=HYPERLINK(\"http://x\")", "+1+2 great film", "-3 dull film", "@SUM(A1) fine", "\tTab start",
             "\rCR start"]


def ok(argv: list[str], capsys) -> str:
    code, out, err = run(argv, capsys)
    assert code == 0, (code, err)
    return out


def built(argv: list[str]) -> None:
    """Run a command that builds the module's fixtures (exit 0 asserted)."""
    from datainf.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--quiet", *argv])
    assert e.value.code == 0, argv


#: sha256 of every file under the roots, following no link (a link to an input is not the input)
hashes = functools.partial(every_hash, follow_links=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_bert_dir, tiny_llama_dir):
    """Copies of both tiny models, a classifier flow (finetune -> grads -> score -> report) whose training
    texts include formula-like ones, and a causal LM flow (finetune -> grads) with a conversation file."""
    from conftest import SENTENCES

    root = tmp_path_factory.mktemp("guard")
    bert = shutil.copytree(tiny_bert_dir, root / "bert")
    llama = shutil.copytree(tiny_llama_dir, root / "llama")
    texts = [t for t, _ in SENTENCES]
    texts[: len(DANGEROUS)] = DANGEROUS
    (root / "data").mkdir()
    train = write_jsonl(root / "data" / "train.jsonl", [{"text": t, "label": y} for t, (_, y) in zip(texts, SENTENCES)])
    built(["finetune", "--model", str(bert), "--train", str(train), "--out", str(root / "adapter"), "--epochs", "1",
        "--batch-size", "4", "--device", "cpu"])
    for name in ("train", "val"):
        built(["grads", "--model", str(bert), "--adapter", str(root / "adapter"), "--data", str(train), "--store",
            str(root / f"{name}-store"), "--chunk-size", "4"])
    built(["score", "--store", str(root / "train-store"), "--queries", str(root / "val-store"), "--method", "identity",
        "--out", str(root / "scores.safetensors")])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(llama))  # a chat template, so that --conversation applies
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} [EOS] {% endfor %}"
                               "{% if add_generation_prompt %}assistant : {% endif %}")
    tokenizer.save_pretrained(str(llama))
    records = chat_records(make_task("sentences", classes=2, per_class=3))
    (root / "lm-data").mkdir()
    lm_data = write_jsonl(root / "lm-data" / "chat.jsonl", records)
    built(["finetune", "--task", "causal_lm", "--model", str(llama), "--train", str(lm_data), "--out",
        str(root / "lm-adapter"), "--epochs", "1", "--rank", "2", "--device", "cpu"])
    built(["grads", "--task", "causal_lm", "--model", str(llama), "--adapter", str(root / "lm-adapter"), "--data",
        str(lm_data), "--store", str(root / "lm-store"), "--chunk-size", "4"])
    conversation = root / "conversation.json"
    conversation.write_text(json.dumps(records[0]["messages"]))
    return {"root": root, "bert": bert, "llama": llama, "train": train, "adapter": root / "adapter",
            "store": root / "train-store", "val": root / "val-store", "scores": root / "scores.safetensors",
            "lm_data": lm_data, "lm_adapter": root / "lm-adapter", "lm_store": root / "lm-store",
            "conversation": conversation, "prompt": records[0]["messages"][-2]["content"],
            "response": records[0]["messages"][-1]["content"]}


def _link(world: dict, target: Path, name: str) -> Path:
    """A fresh symbolic link to ``target``, next to the inputs (not inside any)."""
    links = world["root"] / "links"
    links.mkdir(exist_ok=True)
    link = links / name
    link.unlink(missing_ok=True)
    link.symlink_to(target)
    return link


# --------------------------------------------------------------------------------------------------
# every writing command x every kind of input: refused, nothing changed
# --------------------------------------------------------------------------------------------------

#: command -> (argv with OUT for the output, the input kinds: name -> (output path, words of the refusal))
def _cases(w: dict) -> dict[str, tuple[list[str], dict[str, tuple[Path, str]]]]:
    chunk = w["store"] / "chunks" / "00000" / "chunk.json"
    explain = ["explain", "--model", str(w["llama"]), "--adapter", str(w["lm_adapter"]), "--store", str(w["lm_store"]),
               "--conversation", str(w["conversation"]), "--method", "identity", "--device", "cpu", "--json", "OUT"]
    return {
        "explain": (explain, {
            "store manifest.json": (w["lm_store"] / "manifest.json", "lies inside the training store"),
            "store records.jsonl": (w["lm_store"] / "records.jsonl", "lies inside the training store"),
            "store chunk.json": (w["lm_store"] / "chunks" / "00000" / "chunk.json", "lies inside the training store"),
            "adapter_config.json": (w["lm_adapter"] / "adapter_config.json", "lies inside the adapter folder"),
            "model config.json": (w["llama"] / "config.json", "lies inside the model folder"),
            "conversation file": (w["conversation"], "is the --conversation file"),
            "parent of the store": (w["root"], "is a directory"),  # click's own refusal of a folder for a file
            "link to the manifest": (_link(w, w["lm_store"] / "manifest.json", "m.json"), "a link to"),
            "link to the conversation": (_link(w, w["conversation"], "c.json"), "is the --conversation file"),
        }),
        "finetune": (["finetune", "--model", str(w["bert"]), "--train", str(w["train"]), "--epochs", "1", "--device",
                      "cpu", "--out", "OUT"], {
            "model folder": (w["bert"], "is the model folder"),
            "model config.json": (w["bert"] / "config.json", "is a file"),  # click's refusal of a file for a folder
            "inside the model folder": (w["bert"] / "adapter", "lies inside the model folder"),
            "data file": (w["train"], "is a file"),
            "parent of the data": (w["train"].parent, "contains the training data"),
            "link to the model": (_link(w, w["bert"], "model-link"), "is the model folder"),
        }),
        "grads": (["grads", "--model", str(w["bert"]), "--adapter", str(w["adapter"]), "--data", str(w["train"]),
                   "--labels-from", str(w["val"]), "--store", "OUT"], {
            "adapter_config.json": (w["adapter"] / "adapter_config.json", "is a file"),
            "inside the adapter folder": (w["adapter"] / "store", "lies inside the adapter folder"),
            "model folder": (w["bert"], "is the model folder"),
            "data file": (w["train"], "is a file"),
            "parent of the data": (w["train"].parent, "contains the data file"),
            "--labels-from manifest.json": (w["val"] / "manifest.json", "is a file"),
            "inside the --labels-from store": (w["val"] / "store", "lies inside the --labels-from store"),
            "link to the adapter": (_link(w, w["adapter"], "adapter-link"), "is the adapter folder"),
        }),
        "score": (["score", "--store", str(w["store"]), "--queries", str(w["val"]), "--method", "identity", "--out",
                   "OUT"], {
            "a file in the store": (w["store"] / "chunks" / "x.safetensors", "lies inside the training store"),
            "a file in the query store": (w["val"] / "x.safetensors", "lies inside the query store"),
            "link to the store's manifest": (_link(w, w["store"] / "manifest.json", "s.safetensors"),
                                             "lies inside the training store"),
        }),
        "top": (["top", "--scores", str(w["scores"]), "--data", str(w["train"]), "--out", "OUT"], {
            "scores file": (w["scores"], "is the scores file"),
            "data file": (w["train"], "is the data file"),
            "parent of the data": (w["train"].parent, "is a directory"),
            "store records.jsonl": (w["store"] / "records.jsonl", "lies inside the training store"),
            "query store chunk.json": (w["val"] / "chunks" / "00000" / "chunk.json", "lies inside the query store"),
            "link to the scores": (_link(w, w["scores"], "scores-link"), "is the scores file"),
        }),
        "report": (["report", "--scores", str(w["scores"]), "--data", str(w["train"]), "--out", "OUT"], {
            "scores file": (w["scores"], "is the scores file"),
            "data file": (w["train"], "is the data file"),
            "store manifest.json": (w["store"] / "manifest.json", "lies inside the training store"),
            "store chunk.json": (chunk, "lies inside the training store"),
            "link to the data": (_link(w, w["train"], "data-link"), "is the data file"),
        }),
        "store precondition": (["store", "precondition", "--method", "identity", str(w["store"]), "OUT"], {
            "the store itself": (w["store"], "is the training store"),
            "inside the store": (w["store"] / "pre", "lies inside the training store"),
            "parent of the store": (w["root"], "contains the training store"),
            "link to the store": (_link(w, w["store"], "store-link"), "is the training store"),
        }),
        # each experiment also gets a setting it refuses at once: were the output not checked first, the old
        # code would refuse that instead (rather than run a whole experiment)
        "experiment lds": (["experiment", "lds", "--model", str(w["bert"]), "--subsets", "1", "--out", "OUT"], {
            "model folder": (w["bert"] / "runs", "lies inside the model folder"),
        }),
        "experiment mislabeled": (["experiment", "mislabeled", "--model", str(w["bert"]), "--seeds", "", "--out",
                                   "OUT"], {
            "model folder": (w["bert"], "is the model folder"),
        }),
        "experiment llm-identification": (["experiment", "llm-identification", "--model", str(w["llama"]),
                                           "--load-in-8bit", "--device", "cpu", "--out", "OUT"], {
            "model folder": (w["llama"] / "out", "lies inside the model folder"),
        }),
        "experiment diffusion-style": (["experiment", "diffusion-style", "--base", str(w["bert"]), "--timesteps", "x",
                                        "--device", "cpu", "--out", "OUT"], {
            "base folder": (w["bert"], "is the base UNet folder"),
        }),
    }


CASES = [
    ("explain", k) for k in ("store manifest.json", "store records.jsonl", "store chunk.json", "adapter_config.json",
                             "model config.json", "conversation file", "parent of the store", "link to the manifest",
                             "link to the conversation")
] + [
    ("finetune", k) for k in ("model folder", "model config.json", "inside the model folder", "data file", "parent of the data",
                              "link to the model")
] + [
    ("grads", k) for k in ("adapter_config.json", "inside the adapter folder", "model folder", "data file",
                           "parent of the data", "--labels-from manifest.json", "inside the --labels-from store",
                           "link to the adapter")
] + [
    ("score", k) for k in ("a file in the store", "a file in the query store", "link to the store's manifest")
] + [
    ("top", k) for k in ("scores file", "data file", "parent of the data", "store records.jsonl",
                         "query store chunk.json", "link to the scores")
] + [
    ("report", k) for k in ("scores file", "data file", "store manifest.json", "store chunk.json", "link to the data")
] + [
    ("store precondition", k) for k in ("the store itself", "inside the store", "parent of the store",
                                        "link to the store")
] + [("experiment lds", "model folder"), ("experiment mislabeled", "model folder"),
     ("experiment llm-identification", "model folder"), ("experiment diffusion-style", "base folder")]


@pytest.mark.parametrize(("command", "case"), CASES, ids=[f"{c}-{k}" for c, k in CASES])
def test_1_an_output_may_not_be_contain_or_lie_inside_an_input(world, command, case, capsys):
    argv, cases = _cases(world)[command]
    out, words = cases[case]
    before, existed = hashes(world["root"]), out.exists()
    refused([str(out) if a == "OUT" else a for a in argv], capsys, words)
    assert hashes(world["root"]) == before and out.exists() == existed  # every output is under the root


def test_1_explain_json_replaces_its_own_file_and_refuses_any_other(world, tmp_path, capsys):
    argv = ["explain", "--model", str(world["llama"]), "--adapter", str(world["lm_adapter"]), "--store",
            str(world["lm_store"]), "--prompt", world["prompt"], "--response", world["response"], "--method",
            "identity", "--k", "2", "--device", "cpu", "--json"]
    mine = tmp_path / "explain.json"
    ok([*argv, str(mine)], capsys)
    first = json.loads(mine.read_text())
    assert first["format"] == "datainf-explain" and first["answers"][0]["response"] == world["response"]
    ok([*argv, str(mine)], capsys)  # its own file: replaced
    other = tmp_path / "settings.json"
    other.write_text('{"learning_rate": 0.1}')
    before = hashes(other)
    refused([*argv, str(other)], capsys, "is not an explain JSON file written by `datainf explain --json`",
            "--overwrite")
    assert hashes(other) == before
    ok([*argv, str(other), "--overwrite"], capsys)
    assert json.loads(other.read_text())["format"] == "datainf-explain"


# --------------------------------------------------------------------------------------------------
# 5. finetune --out over its own adapter deleted every other file in the folder
# --------------------------------------------------------------------------------------------------


def test_5_finetune_keeps_files_it_did_not_write_and_refuses(world, tmp_path, capsys):
    argv = ["finetune", "--model", str(world["bert"]), "--train", str(world["train"]), "--epochs", "1",
            "--batch-size", "8", "--device", "cpu", "--checkpoints", "2", "--out"]
    adapter = tmp_path / "adapter"
    ok([*argv, str(adapter)], capsys)
    assert any(p.name.startswith("checkpoint-") for p in adapter.iterdir())
    ok([*argv, str(adapter)], capsys)  # every file is finetune's: replaced whole
    (adapter / "notes.txt").write_text("my notes")
    shutil.copytree(world["val"], adapter / "store")
    before = hashes(adapter)
    refused([*argv, str(adapter)], capsys, "holds notes.txt (and 1 more), which `datainf finetune` does not write")
    refused([*argv, str(adapter), "--overwrite"], capsys, "notes.txt", "does not write")
    assert hashes(adapter) == before
    (adapter / "notes.txt").unlink()
    next(adapter.glob("checkpoint-*")).joinpath("mine.csv").write_text("a,b\n")
    refused([*argv, str(adapter)], capsys, "holds checkpoint-", "mine.csv")


def test_5_an_adapter_from_elsewhere_is_replaced_only_with_overwrite(world, tmp_path, capsys):
    foreign = shutil.copytree(world["adapter"], tmp_path / "peft-adapter")
    (foreign / "datainf_finetune.json").unlink()  # peft's own files only
    argv = ["finetune", "--model", str(world["bert"]), "--train", str(world["train"]), "--epochs", "1",
            "--batch-size", "8", "--device", "cpu", "--out", str(foreign)]
    before = hashes(foreign)
    refused(argv, capsys, "exists and is not an adapter written by `datainf finetune`", "--overwrite")
    assert hashes(foreign) == before
    ok([*argv, "--overwrite"], capsys)
    assert (foreign / "datainf_finetune.json").is_file()


# --------------------------------------------------------------------------------------------------
# 11. score --out replaced any .safetensors file (a model's weights); report --out any file; mode 0600
# --------------------------------------------------------------------------------------------------


@pytest.fixture()
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_11_score_refuses_a_foreign_safetensors_and_replaces_its_own(world, tmp_path, capsys, umask_022):
    weights = shutil.copy(world["bert"] / "model.safetensors", tmp_path / "model.safetensors")
    argv = ["score", "--store", str(world["store"]), "--self", "--method", "identity", "--out"]
    before = hashes(Path(weights))
    refused([*argv, str(weights)], capsys, "is not a scores file written by `datainf score`", "--overwrite")
    assert hashes(Path(weights)) == before
    mine = tmp_path / "scores.safetensors"
    ok([*argv, str(mine)], capsys)
    os.chmod(mine, 0o600)  # as the old code left it
    ok([*argv, str(mine)], capsys)  # its own: replaced
    assert mine.stat().st_mode & 0o777 == 0o644
    ok([*argv, str(weights), "--overwrite"], capsys)
    from datainf.scoring import load_scores

    assert load_scores(weights).n_train == GradientStore.open(world["store"]).n_examples
    assert Path(weights).stat().st_mode & 0o777 == 0o644


def test_11_report_refuses_a_foreign_html_and_replaces_its_own(world, tmp_path, capsys, umask_022):
    page = tmp_path / "index.html"
    page.write_text("<!DOCTYPE html><html><body>my page</body></html>\n")
    argv = ["report", "--scores", str(world["scores"]), "--data", str(world["train"]), "--out"]
    before = hashes(page)
    refused([*argv, str(page)], capsys, "is not an HTML report written by `datainf report`", "--overwrite")
    assert hashes(page) == before
    mine = tmp_path / "report.html"
    ok([*argv, str(mine)], capsys)
    ok([*argv, str(mine), "--title", "second"], capsys)
    assert "<title>second</title>" in mine.read_text() and mine.stat().st_mode & 0o777 == 0o644
    ok([*argv, str(page), "--overwrite"], capsys)
    assert "my page" not in page.read_text()


def test_11_top_and_example_data_refuse_files_they_did_not_write(world, tmp_path, capsys):
    notes = tmp_path / "notes.csv"
    notes.write_text("name,phone\nann,123\n")
    before = hashes(notes)
    refused(["top", "--scores", str(world["scores"]), "--format", "csv", "--out", str(notes)], capsys,
            "is not a top-k table written by `datainf top`")
    refused(["example-data", "--out", str(notes)], capsys, "exists; choose a new file name, or pass --overwrite")
    assert hashes(notes) == before
    table = tmp_path / "top.jsonl"
    ok(["top", "--scores", str(world["scores"]), "--out", str(table)], capsys)
    ok(["top", "--scores", str(world["scores"]), "--format", "csv", "--out", str(table)], capsys)  # its own
    ok(["example-data", "--per-class", "1", "--classes", "2", "--out", str(notes), "--overwrite"], capsys)
    assert len(notes.read_text().splitlines()) == 2


def test_11_a_run_folder_with_a_foreign_scores_file_or_report_is_refused(world, tmp_path, capsys):
    """The demo and single-run experiments write scores.safetensors and report.html into --out: one there
    that is not datainf's is refused (the --device options are refused right after, were it not)."""
    out = tmp_path / "demo-out"
    out.mkdir()
    shutil.copy(world["bert"] / "model.safetensors", out / "scores.safetensors")
    before = hashes(out)
    refused(["demo", "--device", "cuda", "--out", str(out)], capsys,
            "holds a scores.safetensors that is not a scores file")
    assert hashes(out) == before
    (out / "scores.safetensors").unlink()
    (out / "report.html").write_text("<html>my page</html>")
    before = hashes(out)
    refused(["experiment", "llm-identification", "--load-in-8bit", "--device", "cpu", "--out", str(out)], capsys,
            "holds a report.html that is not an HTML report")
    assert hashes(out) == before


def test_modes_follow_the_umask(tmp_path, umask_022):
    import torch

    from datainf import atomic

    atomic.save_safetensors(tmp_path / "a.safetensors", {"x": torch.zeros(2)})
    with atomic.new_directory(tmp_path / "d") as folder:
        atomic.save_safetensors(folder / "w.safetensors", {"x": torch.zeros(2)})
    os.umask(0o077)
    atomic.write_text(tmp_path / "private.txt", "x")
    modes = {p.name: p.stat().st_mode & 0o777 for p in [tmp_path / "a.safetensors", tmp_path / "d",
                                                         tmp_path / "d" / "w.safetensors", tmp_path / "private.txt"]}
    assert modes == {"a.safetensors": 0o644, "d": 0o755, "w.safetensors": 0o644, "private.txt": 0o600}


# --------------------------------------------------------------------------------------------------
# 14c. top --format csv wrote formula-like texts as they are
# --------------------------------------------------------------------------------------------------


def test_14c_top_csv_neutralises_formula_like_texts_only(world, capsys):
    argv = ["top", "--scores", str(world["scores"]), "--k", "50"]
    texts = [r["text"] for r in GradientStore.open(world["store"]).records()]
    assert [t for t in texts if t in DANGEROUS] == DANGEROUS  # the store kept them as they are
    rows = list(csv.DictReader(io.StringIO(ok([*argv, "--format", "csv"], capsys), newline="")))
    shown = {int(r["train_index"]): r["train_text"] for r in rows}
    assert set(shown) == set(range(len(texts)))
    for i, text in enumerate(texts):
        expected = "'" + text if text[0] in "=+-@\t\r" else text
        assert shown[i] == expected, (i, text, shown[i])
    assert all(float(r["score"]) == float(r["score"]) for r in rows)  # numbers stay numbers
    lines = [json.loads(line) for line in ok([*argv, "--format", "jsonl"], capsys).splitlines()]
    assert {r["train_index"]: r["train_text"] for r in lines} == dict(enumerate(texts))  # JSON: unchanged
