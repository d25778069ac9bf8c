"""Step 0 from a final adapter alone (issue 29, item 1): `datainf grads --adapter FINAL --initial` builds the
LoRA before the first optimizer step from the adapter's own config (B = 0, A from the seed `datainf
finetune` recorded, else --seed) and its gradients equal those at the checkpoint-0 finetune saved; and the
all-zero A blocks of step 0 give one warning line, not one per block."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from cli_helpers import hashes, refused, write_jsonl  # noqa: E402
from cli_helpers import run_cli as run  # noqa: E402
from datainf.data.generation import make_task  # noqa: E402
from datainf.estimators import ScoreArguments  # noqa: E402
from datainf.store import GradientStore  # noqa: E402

PROMPT = "Sentence: the old fox finds the book near the lake\nAva:"
RESPONSE = " lake the near book the finds fox old the"


@pytest.fixture(scope="module")
def setup(tiny_llama_dir, tmp_path_factory):
    """`finetune --checkpoints 1 --seed 3` (checkpoint-0 and the final adapter); the data and queries."""
    from datainf.cli import main

    root = tmp_path_factory.mktemp("step0")
    records = [{"prompt": r["prompt"], "response": r["response"]}
               for r in make_task("sentences", classes=2, per_class=3)]
    data = write_jsonl(root / "data.jsonl", records)
    queries = write_jsonl(root / "queries.jsonl", [{"prompt": PROMPT, "response": RESPONSE}, records[0]])
    out = root / "adapter"
    with pytest.raises(SystemExit) as e:
        main(["--quiet", "finetune", "--task", "causal_lm", "--model", str(tiny_llama_dir), "--train", str(data),
              "--out", str(out), "--epochs", "1", "--batch-size", "2", "--rank", "2", "--lr", "0.05",
              "--checkpoints", "1", "--seed", "3", "--device", "cpu"])
    assert e.value.code == 0
    return {"root": root, "model": tiny_llama_dir, "data": data, "queries": queries, "adapter": out}


def grads(setup, capsys, adapter: Path, store: Path, *extra: str, data: Path | None = None) -> str:
    code, out, err = run(["grads", "--model", str(setup["model"]), "--adapter", str(adapter), "--data",
                          str(data or setup["data"]), "--store", str(store), "--task", "causal_lm", "--dtype",
                          "float64", "--model-dtype", "float64", *extra], capsys)
    assert code == 0, err[-2000:]
    return out


def test_initial_gradients_equal_checkpoint_0s(setup, tmp_path, capsys):
    """The recorded seed rebuilds the A that training started from: the --initial store holds the gradients
    of the checkpoint-0 folder finetune saved (float64 model and store); B blocks nonzero, A blocks zero."""
    finetune_record = json.loads((setup["adapter"] / "datainf_finetune.json").read_text())
    assert finetune_record["seed"] == 3
    out = grads(setup, capsys, setup["adapter"], tmp_path / "initial", "--initial")
    lines = [line for line in out.splitlines() if "seed" in line]
    assert len(lines) == 1 and "seed 3 (recorded in" in lines[0], out
    grads(setup, capsys, setup["adapter"] / "checkpoint-0", tmp_path / "c0")
    a, b = GradientStore.open(tmp_path / "initial"), GradientStore.open(tmp_path / "c0")
    assert a.block_names == b.block_names and len(a.block_names) == 8
    assert a.fingerprints["adapter"] == b.fingerprints["adapter"]  # the same LoRA weights
    for name in a.block_names:
        x, y = a.block(name)[0 : a.n_examples], b.block(name)[0 : b.n_examples]
        assert torch.allclose(x, y, rtol=1e-10, atol=1e-14), name
        if "lora_A" in name:
            assert torch.count_nonzero(x) == 0, name
        else:
            assert torch.count_nonzero(x) > 0, name
    final = GradientStore.open(tmp_path / "initial")
    assert final.fingerprints["adapter"] != _final_fingerprint(setup, tmp_path, capsys)


def _final_fingerprint(setup, tmp_path, capsys) -> str:
    grads(setup, capsys, setup["adapter"], tmp_path / "final")
    return GradientStore.open(tmp_path / "final").fingerprints["adapter"]


def test_initial_without_a_recorded_seed_uses_seed_and_says_so(setup, tmp_path, capsys):
    """An adapter that records no seed (TRL's, the Trainer's): A is drawn with --seed (peft's own LoRA under
    torch.manual_seed, built here), and the one line printed says which seed and why."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from datainf.models.initial import initial_lora

    foreign = tmp_path / "foreign"
    shutil.copytree(setup["adapter"], foreign, ignore=shutil.ignore_patterns("checkpoint-*"))
    (foreign / "datainf_finetune.json").unlink()
    out = grads(setup, capsys, foreign, tmp_path / "s5", "--initial", "--seed", "5")
    assert [line for line in out.splitlines() if "seed" in line][0].endswith("seed 5 (--seed)")
    model, _, used, source = initial_lora(setup["model"], foreign, seed=5)
    assert used == 5 and source == "--seed"
    torch.manual_seed(5)
    fresh = get_peft_model(AutoModelForCausalLM.from_pretrained(str(setup["model"])),
                           LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=32, lora_dropout=0.05,
                                      target_modules=["q_proj", "v_proj"]))
    want = {n: p for n, p in fresh.named_parameters() if "lora_" in n}
    got = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert sorted(got) == sorted(want)
    for name, p in got.items():
        assert torch.equal(p, want[name]), name
        assert p.requires_grad
        if "lora_B" in name:
            assert torch.count_nonzero(p) == 0
    _, _, used, source = initial_lora(setup["model"], foreign)
    assert used == 0 and source.startswith("default")


def test_initial_refusals(setup, tmp_path, capsys):
    before = hashes(setup["adapter"], setup["data"])
    base = ["grads", "--model", str(setup["model"]), "--data", str(setup["data"]), "--task", "causal_lm"]
    refused([*base, "--adapter", str(setup["adapter"]), "--store", str(tmp_path / "x"), "--initial", "--seed", "4"],
            capsys, "--seed 4", "seed 3", "drop --seed")
    refused([*base, "--adapter", str(setup["adapter"]), "--store", str(tmp_path / "x"), "--seed", "4"], capsys,
            "--initial")
    refused([*base, "--run", str(setup["adapter"]), "--store", str(tmp_path / "x"), "--initial"], capsys,
            "--initial", "checkpoint-0")
    # a classifier has no step 0 (its head is new and random): the causal adapter asked for as one is refused
    refused(["grads", "--model", str(setup["model"]), "--data", str(setup["data"]), "--task", "classification",
             "--adapter", str(setup["adapter"]), "--store", str(tmp_path / "x"), "--initial"], capsys,
            "--initial", "causal")
    assert hashes(setup["adapter"], setup["data"]) == before and not (tmp_path / "x").exists()


def test_step_0_zero_blocks_are_one_warning(setup, tmp_path, capsys):
    """Scoring a step-0 store (the 4 A blocks all zero) warns once naming the count, in the library and on
    the command line's stderr (one line, not one per block)."""
    import warnings

    from datainf.scoring import score_store

    step0 = setup["adapter"] / "checkpoint-0"  # what --initial rebuilds (above); a folder old code reads too
    grads(setup, capsys, step0, tmp_path / "t")
    grads(setup, capsys, step0, tmp_path / "q", data=setup["queries"])
    train, queries = GradientStore.open(tmp_path / "t"), GradientStore.open(tmp_path / "q")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        score_store(train, queries, ScoreArguments(method="identity"))
    zero = [str(w.message) for w in caught if "gradient is zero" in str(w.message)]
    assert len(zero) == 1 and zero[0].startswith("4 blocks"), zero
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "datainf", "score", "--store", str(train.path), "--queries",
                           str(queries.path), "--method", "identity", "--out", str(tmp_path / "s.safetensors")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len([line for line in done.stderr.splitlines() if "gradient is zero" in line]) == 1, done.stderr


def test_finetune_saves_second_moments_that_adam_normalization_reads(setup, tmp_path, capsys):
    """finetune writes Adam's exp_avg_sq of every LoRA parameter beside the final adapter (not at step 0, where
    Adam has none), named as the store's blocks; `score --adam-moments ADAPTER` then divides by hand's values."""
    from safetensors.torch import load_file

    from datainf.remedies import SECOND_MOMENTS_FILE
    from datainf.scoring import load_scores

    assert not (setup["adapter"] / "checkpoint-0" / SECOND_MOMENTS_FILE).exists()
    moments = load_file(str(setup["adapter"] / SECOND_MOMENTS_FILE))
    grads(setup, capsys, setup["adapter"], tmp_path / "t")
    grads(setup, capsys, setup["adapter"], tmp_path / "q", data=setup["queries"])
    train, queries = GradientStore.open(tmp_path / "t"), GradientStore.open(tmp_path / "q")
    assert sorted(moments) == sorted(train.block_names)
    assert all(bool((v > 0).any()) and bool((v >= 0).all()) for v in moments.values())
    code, _, err = run(["score", "--store", str(train.path), "--queries", str(queries.path), "--method", "identity",
                        "--adam-moments", str(setup["adapter"]), "--out", str(tmp_path / "s.safetensors")], capsys)
    assert code == 0, err

    def by_hand(store: GradientStore) -> torch.Tensor:
        parts = [store.block(n)[0 : store.n_examples].reshape(store.n_examples, -1).double()
                 / (moments[n].double().reshape(1, -1).sqrt() + 1e-8) for n in store.block_names]
        x = torch.cat(parts, dim=1)
        return x / x.norm(dim=1, keepdim=True)

    want = -by_hand(train) @ by_hand(queries).T
    got = load_scores(tmp_path / "s.safetensors").scores["identity"].double()
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12)


def test_explain_takes_the_remedies(setup, tmp_path, capsys):
    """`explain --remove-top 1` ranks by identity scores of gradients with the training gradients' top
    direction removed: the query's gradient (computed here by the Attributor) and the store's, projected with
    an explicit float64 SVD."""
    from datainf.attributor import Attributor
    from datainf.data.collate import TextCollator
    from datainf.models.llm import load_causal_lm_adapter

    grads(setup, capsys, setup["adapter"], tmp_path / "t")
    store = GradientStore.open(tmp_path / "t")
    out = tmp_path / "e.json"
    code, _, err = run(["explain", "--model", str(setup["model"]), "--adapter", str(setup["adapter"]), "--store",
                        str(store.path), "--prompt", PROMPT, "--response", RESPONSE, "--method", "identity",
                        "--remove-top", "1", "--k", "3", "--json", str(out), "--model-dtype", "float64"], capsys)
    assert code == 0, err
    model, tok = load_causal_lm_adapter(setup["model"], setup["adapter"], dtype=torch.float64)
    query = Attributor(model, task="causal_lm", collate=TextCollator(tok, task="causal_lm"), progress=False
                       ).gradients([{"prompt": PROMPT, "response": RESPONSE}])
    want = 0
    for name in store.block_names:
        G = store.block(name)[0 : store.n_examples].reshape(store.n_examples, -1).double()
        q = query[name].reshape(1, -1).double()
        top = torch.linalg.svd(G, full_matrices=False).Vh[:1]
        want = want - (G - G @ top.T @ top) @ (q - q @ top.T @ top).T
    rows = json.loads(out.read_text())["answers"][0]["rows"]
    assert rows
    for r in rows:
        assert r["score"] == pytest.approx(float(want[r["train_index"], 0]), rel=1e-8, abs=1e-12)


def test_explain_initial_answers_with_the_final_adapter_and_scores_at_step_0(setup, tmp_path, capsys):
    """`explain --adapter FINAL --initial --store S0` (S0 from `grads --initial`): every score equals minus the
    inner product of S0's rows with the query's own `grads --initial` gradient (read back from a store made by
    that command, float64); the response it generates is the final adapter's (the same as without --initial);
    without --initial the step-0 store is refused as made with another model or adapter."""
    grads(setup, capsys, setup["adapter"], tmp_path / "s0", "--initial")
    queries = write_jsonl(tmp_path / "q.jsonl", [{"prompt": PROMPT, "response": RESPONSE}])
    grads(setup, capsys, setup["adapter"], tmp_path / "q0", "--initial", data=queries)
    train, query = GradientStore.open(tmp_path / "s0"), GradientStore.open(tmp_path / "q0")
    want = -sum(train.block(n)[0 : train.n_examples].double() @ query.block(n)[0:1].double().T
                for n in train.block_names)[:, 0]
    base = ["explain", "--model", str(setup["model"]), "--adapter", str(setup["adapter"]), "--store",
            str(tmp_path / "s0"), "--method", "identity", "--k", "3", "--model-dtype", "float64"]
    out = tmp_path / "e.json"
    code, stdout, err = run([*base, "--initial", "--prompt", PROMPT, "--response", RESPONSE, "--json", str(out)],
                            capsys)
    assert code == 0, err
    assert "gradients at step 0 of" in stdout and "seed 3 (recorded in" in stdout
    rows = json.loads(out.read_text())["answers"][0]["rows"]
    assert len(rows) >= 3  # up to 3 helpful and 3 harmful of the 6 training examples
    for r in rows:
        assert r["score"] == pytest.approx(float(want[r["train_index"]]), rel=1e-8, abs=1e-12)
    # the generated response is the final adapter's
    grads(setup, capsys, setup["adapter"], tmp_path / "final")
    answers = {}
    for flag, store in (("--initial", "s0"), (None, "final")):
        path = tmp_path / f"{store}.json"
        argv = [*base, "--prompt", PROMPT, "--max-new-tokens", "6", "--json", str(path)]
        argv[argv.index("--store") + 1] = str(tmp_path / store)
        code, _, err = run(argv + ([flag] if flag else []), capsys)
        assert code == 0, err
        answers[store] = json.loads(path.read_text())["answers"][0]["response"]
    assert answers["s0"] == answers["final"]
    refused([*base, "--prompt", PROMPT, "--response", RESPONSE], capsys, "was made with a different")
