"""The command line on a tiny random BERT: the whole flow, its help, and every bad-input case (message + exit code)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import pytest
import torch

import datainf
from cli_helpers import run_cli as run
from cli_helpers import write_jsonl
from datainf.cli import main
from datainf.scoring import load_scores
from datainf.store import GradientStore
from reference import FLOAT32_TOL, assert_close_to


@pytest.fixture(scope="module")
def flow(tmp_path_factory, tiny_bert_dir):
    """finetune -> grads (train, val) -> score, once for the module (the expensive part)."""
    from conftest import SENTENCES

    root = tmp_path_factory.mktemp("cli")
    train = write_jsonl(root / "train.jsonl", [{"text": t, "label": y, "flipped": i % 5 == 0}
                                               for i, (t, y) in enumerate(SENTENCES)])
    val = write_jsonl(root / "val.jsonl", [{"text": t, "label": y} for t, y in SENTENCES[:4]])
    codes = []
    for argv in (
        ["finetune", "--model", str(tiny_bert_dir), "--train", str(train), "--out", str(root / "adapter"),
         "--epochs", "1", "--batch-size", "4", "--device", "cpu"],
        ["grads", "--model", str(tiny_bert_dir), "--adapter", str(root / "adapter"), "--data", str(train),
         "--store", str(root / "train-store"), "--chunk-size", "5", "--batch-size", "3"],
        ["grads", "--model", str(tiny_bert_dir), "--adapter", str(root / "adapter"), "--data", str(val),
         "--store", str(root / "val-store")],
        ["score", "--store", str(root / "train-store"), "--queries", str(root / "val-store"),
         "--method", "datainf,exact,identity", "--out", str(root / "scores.safetensors")],
    ):
        with pytest.raises(SystemExit) as e:
            main(["--quiet", *argv])
        codes.append(e.value.code)
    return root, train, val, codes


def test_flow_runs_and_scores_match_the_library(flow):
    root, train, val, codes = flow
    assert codes == [0, 0, 0, 0]
    assert (root / "adapter" / "adapter_config.json").exists()
    tr, va = GradientStore.open(root / "train-store"), GradientStore.open(root / "val-store")
    assert tr.n_examples == 12 and va.n_examples == 4 and tr.block_names == va.block_names
    loaded = load_scores(root / "scores.safetensors")
    saved = {k: v.numpy() for k, v in loaded.scores.items()}
    assert set(saved) == {"datainf", "exact", "identity"}
    # the CLI scores in float32; the reference is the library in float64 on the same stored gradients, so
    # the two differ by float32 rounding only (FLOAT32_TOL, tests/reference.py); scoring the wrong store,
    # method or queries is an O(1) difference
    queries = {n: va.load(n, dtype=torch.float64) for n in va.block_names}
    train_blocks = {n: tr.load(n, dtype=torch.float64) for n in tr.block_names}
    for method, got in saved.items():
        want = datainf.influence(train_blocks, queries, method)
        assert_close_to(torch.from_numpy(got), want, tol=FLOAT32_TOL, what=method)
    assert set(loaded.settings) == {"datainf", "exact", "identity"}
    assert set(loaded.settings["datainf"]["damping"]) == set(tr.block_names)
    assert loaded.meta["train_store"]["fingerprints"] == tr.fingerprints


def test_self_influence_and_report(flow, capsys):
    root, train, _, _ = flow
    code, out, err = run(["score", "--store", str(root / "train-store"), "--self", "--method", "identity",
                          "--out", str(root / "self.safetensors")], capsys)
    assert code == 0, err
    got = load_scores(root / "self.safetensors").scores["identity"].numpy()
    tr = GradientStore.open(root / "train-store")
    want = -sum((tr.load(n).reshape(12, -1).double() ** 2).sum(1) for n in tr.block_names)
    assert_close_to(torch.from_numpy(got), want, tol=FLOAT32_TOL, what="self-influence, identity")
    code, out, err = run(["report", "--scores", str(root / "scores.safetensors"), "--data", str(train), "--out",
                          str(root / "report.html")], capsys)
    assert code == 0, err
    html = (root / "report.html").read_text()
    for section in ('id="methods"', 'id="roc"', 'id="harmful"', 'id="helpful"', 'id="queries"', 'id="damping-blocks"'):
        assert section in html
    assert "a tedious mess with no heart" in html
    # a classification report: labels and the flipped column of --data, queries named by their texts
    assert "n/a" not in html and "query 0" not in html.lower()
    assert "<th>Given label</th>" in html and "<th>Flipped</th>" in html and "Mislabeled examples" in html
    assert "averaged over the 4 queries" in html
    from conftest import SENTENCES

    for text, _ in SENTENCES[:4]:
        assert f'<pre class="query-text">{text}</pre>' in html
    # without --data: the store's own records (texts and labels; no flipped column, so no ROC)
    code, out, err = run(["report", "--scores", str(root / "scores.safetensors"), "--out",
                          str(root / "report-store.html")], capsys)
    assert code == 0, err
    html = (root / "report-store.html").read_text()
    assert "a tedious mess with no heart" in html and "<th>Label</th>" in html
    assert 'id="roc"' not in html and "Flipped" not in html and "Mislabeled" not in html and "n/a" not in html


def test_help_is_complete(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    for command in ("finetune", "grads", "score", "report", "demo", "experiment"):
        assert command in out
    for command, option in (("finetune", "--target-modules"), ("grads", "--store"), ("score", "--mean-query"),
                            ("report", "--scores"), ("demo", "--n-train")):
        code, out, _ = run([command, "--help"], capsys)
        assert code == 0 and option in out


def test_help_imports_no_torch():
    """`datainf --help`, `datainf experiment --help` and the help of the practitioner's commands list their
    commands and options without importing torch (which takes seconds)."""
    import subprocess
    import sys

    child = ("import sys\nfrom datainf.cli import main\nfor argv in (['--help'], ['experiment', '--help'], "
             "['grads', '--help'], ['score', '--help'], ['explain', '--help'], ['top', '--help'], "
             "['report', '--help'], ['finetune', '--help']):\n"
             "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0, e.code\n"
             "    assert 'torch' not in sys.modules, f'torch was imported by {argv}'\n")
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in ("experiment", "mislabeled", "approximation", "selection", "scaling", "llm-identification",
                 "diffusion-style", "diffusion-subject", "lds"):
        assert name in proc.stdout


def test_missing_optional_dependency_is_one_line(monkeypatch, capsys):
    """An experiment whose optional package is absent names the package; it is not an unknown command."""
    import sys

    from datainf.cli.experiment import command as experiment_group

    monkeypatch.setattr(experiment_group, "commands", {})  # nothing loaded yet
    for module in ("datainf.cli.experiment.diffusion", "datainf.experiments.diffusion", "datainf.models.diffusion"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` raises ModuleNotFoundError
    code, _, err = run(["experiment", "diffusion-style", "--help"], capsys)
    lines = [line for line in err.strip().splitlines() if line]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: `datainf experiment diffusion-style` needs the package 'diffusers'"), err


def test_a_repeated_method_flag_adds_methods(flow, tmp_path, capsys):
    """``--method identity --method datainf,identity`` scores both, once each (click's default would keep only
    the last flag); the scores equal the library's on the same store."""
    root, *_ = flow
    code, _, err = run(["score", "--store", str(root / "train-store"), "--self", "--method", "identity",
                        "--method", "datainf,identity", "--out", str(tmp_path / "r.safetensors")], capsys)
    assert code == 0, err
    loaded = load_scores(tmp_path / "r.safetensors")
    assert sorted(loaded.scores) == ["datainf", "identity"]
    tr = GradientStore.open(root / "train-store")
    want = -sum((tr.load(n).reshape(12, -1).double() ** 2).sum(1) for n in tr.block_names)
    assert_close_to(loaded.scores["identity"].double(), want, tol=FLOAT32_TOL, what="self-influence, identity")


def test_config_file_sets_defaults_and_flags_override(flow, tmp_path, capsys):
    root, *_ = flow
    config = tmp_path / "run.yaml"
    config.write_text(f"store: {root / 'train-store'}\nscore:\n  method: identity\n  self: true\n")
    code, _, err = run(["--config", str(config), "score", "--out", str(tmp_path / "a.safetensors")], capsys)
    assert code == 0, err
    assert list(load_scores(tmp_path / "a.safetensors").scores) == ["identity"]
    code, _, err = run(["--config", str(config), "score", "--method", "datainf", "--out",
                        str(tmp_path / "b.safetensors")], capsys)
    assert code == 0, err
    assert list(load_scores(tmp_path / "b.safetensors").scores) == ["datainf"]


@pytest.mark.parametrize("case", ["missing_file", "missing_column", "empty", "no_adapter", "not_an_adapter",
                                  "bad_method"])
def test_bad_input_one_line_and_exit_2(case, flow, tiny_bert_dir, tmp_path, capsys):
    root, train, *_ = flow
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    base = ["grads", "--model", str(tiny_bert_dir), "--adapter", str(root / "adapter"), "--store",
            str(tmp_path / "s")]
    argv, expected = {
        "missing_file": (base + ["--data", str(tmp_path / "nope.jsonl")], "does not exist"),
        "missing_column": (base + ["--data", str(train), "--text-column", "sentence"], "has no column 'sentence'"),
        "empty": (base + ["--data", str(empty)], "holds no examples"),
        "no_adapter": (["grads", "--model", str(tiny_bert_dir), "--data", str(train), "--store",
                        str(tmp_path / "s")], "--adapter is required"),
        "not_an_adapter": (["grads", "--model", str(tiny_bert_dir), "--adapter", str(tiny_bert_dir), "--data",
                            str(train), "--store", str(tmp_path / "s")], "has no adapter_config.json"),
        "bad_method": (["score", "--store", str(root / "train-store"), "--self", "--method", "magic", "--out",
                        str(tmp_path / "x.safetensors")], "unknown method 'magic'"),
    }[case]
    code, out, err = run(argv, capsys)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())


def test_adapter_that_does_not_fit(flow, other_tiny_bert_dir, tmp_path, capsys):
    root, train, *_ = flow
    code, _, err = run(["grads", "--model", str(other_tiny_bert_dir), "--adapter", str(root / "adapter"),
                        "--data", str(train), "--store", str(tmp_path / "s")], capsys)
    assert code == 2 and "does not fit" in err and err.count("\n") == 1, err


def test_store_of_another_model_is_refused(flow, tiny_bert_dir, tmp_path, capsys):
    root, train, val, _ = flow
    # the validation store exists for other data: pointing the training run at it must be refused
    code, _, err = run(["grads", "--model", str(tiny_bert_dir), "--adapter", str(root / "adapter"), "--data",
                        str(train), "--store", str(root / "val-store")], capsys)
    assert code == 2 and "use a new --store directory" in err, err


def test_failed_score_leaves_no_output(flow, tmp_path, capsys):
    root, *_ = flow
    out = tmp_path / "scores.safetensors"
    code, _, err = run(["score", "--store", str(root / "train-store"), "--self", "--method", "datainf",
                        "--damping", "-1", "--out", str(out)], capsys)
    assert code == 2 and "damping" in err
    assert list(tmp_path.iterdir()) == []


def test_cuda_asked_without_cuda(flow, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    root, *_ = flow
    code, _, err = run(["score", "--store", str(root / "train-store"), "--self", "--device", "cuda", "--out",
                        str(tmp_path / "x.safetensors")], capsys)
    assert code == 2 and "no CUDA device" in err


def test_a_library_warning_is_one_warning_line_on_the_command_line():
    """Under the command line a warning the library raises (e.g. step 0's all-zero A blocks) is one
    `warning: ...` line, not Python's file:line header plus the source line that raised it."""
    import subprocess
    import sys

    code = ("import warnings\nimport datainf.cli as c\n"
            "c.cli.main(args=['--quiet', 'store', '--help'], standalone_mode=False)\n"
            "warnings.warn('two\\nlines')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stderr == "warning: two lines\n", out.stderr
