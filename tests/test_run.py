"""The run as the scoring unit (issues 29-31): `finetune --checkpoints K` saves step 0 (checkpoint-0, the
LoRA before the first optimizer step) with every checkpoint's learning-rate weight; `grads --run` makes one
store per checkpoint (complete ones kept); `score` on the run stores and `explain --run` sum the checkpoints'
scores with those weights through one library function (`datainf.combine.combine`), whose provenance goes
into the scores file. Every number is checked against an independent computation: the scheduler's rates
from transformers, a LoRA initialised afresh by peft, per-checkpoint scores summed by hand.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import datainf  # noqa: E402
from cli_helpers import (
    refused,  # noqa: E402
    write_jsonl,  # noqa: E402
)
from cli_helpers import run_cli as run  # noqa: E402
from datainf.data.generation import make_task  # noqa: E402
from datainf.errors import DataInfError  # noqa: E402
from datainf.estimators import ScoreArguments  # noqa: E402
from datainf.scoring import load_scores, query_blocks, score_store  # noqa: E402
from datainf.store import GradientStore  # noqa: E402
from reference import FLOAT64_TOL  # noqa: E402

PROMPT = "Sentence: the old fox finds the book near the lake\nAva:"
RESPONSE = " lake the near book the finds fox old the"
LR, STEPS, WARMUP = 5e-2, 12, 1  # 6 examples, batch 1, 2 epochs; warm-up round(0.06 * 12) = 1 step


def files(folder: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime (ns) of every file under ``folder``."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def scheduler_rates() -> list[float]:
    """The rate each of the STEPS optimizer steps uses under transformers' linear warm-up and decay."""
    from transformers import get_linear_schedule_with_warmup

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    scheduler = get_linear_schedule_with_warmup(optimizer, WARMUP, STEPS)
    rates = []
    for _ in range(STEPS):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.fixture(scope="module")
def setup(tiny_llama_dir, tmp_path_factory):
    """`finetune --checkpoints 2` (12 steps: checkpoint-0, checkpoint-6 and the final adapter), then `grads
    --run` of the training data and of two queries (float64)."""
    from datainf.cli import main

    root = tmp_path_factory.mktemp("run")
    records = [{"prompt": r["prompt"], "response": r["response"]}
               for r in make_task("sentences", classes=2, per_class=3)]
    data = write_jsonl(root / "data.jsonl", records)
    queries = write_jsonl(root / "queries.jsonl", [{"prompt": PROMPT, "response": RESPONSE}, records[0]])
    out = root / "adapter"

    def cli(argv: list[str]) -> None:
        with pytest.raises(SystemExit) as e:
            main(["--quiet", *argv])
        assert e.value.code == 0, argv

    cli(["finetune", "--task", "causal_lm", "--model", str(tiny_llama_dir), "--train", str(data), "--out", str(out),
         "--epochs", "2", "--batch-size", "1", "--rank", "2", "--lr", str(LR), "--checkpoints", "2", "--device",
         "cpu"])
    for name, path in (("stores", data), ("query-stores", queries)):
        cli(["grads", "--task", "causal_lm", "--model", str(tiny_llama_dir), "--run", str(out), "--data", str(path),
             "--store", str(root / name), "--dtype", "float64", "--model-dtype", "float64", "--chunk-size", "4"])
    return {"root": root, "model": Path(tiny_llama_dir), "data": data, "queries": queries, "run": out,
            "stores": root / "stores", "query_stores": root / "query-stores"}


def test_finetune_saves_step_0_and_the_learning_rates_the_scheduler_used(setup):
    """checkpoint-0, checkpoint-6 and the final adapter, each weighing the mean rate of the steps from it to
    the next checkpoint (the final: its own step's), from transformers' scheduler computed here; step 1 runs at
    rate 0 (warm-up), so checkpoint-0 weighs the mean of steps 1-6, not 0."""
    out = setup["run"]
    saved = {p.parent.name: json.loads(p.read_text()) for p in out.rglob("datainf_checkpoint.json")}
    assert sorted(saved) == ["adapter", "checkpoint-0", "checkpoint-6"]
    rates = scheduler_rates()
    assert rates[0] == 0.0  # what step 0 would weigh under the old rule (refused as a weight)
    want = {"checkpoint-0": sum(rates[0:6]) / 6, "checkpoint-6": sum(rates[6:12]) / 6, "adapter": rates[11]}
    for name, meta in saved.items():
        assert meta["steps"] == STEPS
        assert meta["learning_rate"] == pytest.approx(want[name], rel=1e-12), name
    assert [saved[n]["step"] for n in ("checkpoint-0", "checkpoint-6", "adapter")] == [0, 6, 12]
    from datainf.models.checkpoints import run_checkpoints

    assert [(c.adapter, c.step) for c in run_checkpoints(out)] == [
        (out / "checkpoint-0", 0), (out / "checkpoint-6", 6), (out, 12)]


def test_finetune_counts_every_checkpoint_it_saved(tiny_llama_dir, tmp_path, capsys):
    """`--checkpoints 4` on 4 steps: checkpoint-0..3 and the final adapter, and the message says so (old:
    "3 checkpoints", and no checkpoint-0)."""
    records = [{"prompt": r["prompt"], "response": r["response"]}
               for r in make_task("sentences", classes=2, per_class=3)]
    data = write_jsonl(tmp_path / "data.jsonl", records)
    out = tmp_path / "a"
    code, text, err = run(["finetune", "--task", "causal_lm", "--model", str(tiny_llama_dir), "--train", str(data),
                           "--out", str(out), "--epochs", "2", "--batch-size", "3", "--rank", "2", "--checkpoints",
                           "4", "--device", "cpu"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{i}" for i in range(4)]
    assert "a run of 5 checkpoints: steps 0, 1, 2, 3 in" in text and "step 4, the final adapter" in text, text


def test_checkpoint_0_is_the_initial_lora(setup):
    """checkpoint-0 holds B = 0 and the A that peft draws for the same LoRA config under the same seed."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    saved = load_file(str(setup["run"] / "checkpoint-0" / "adapter_model.safetensors"))
    torch.manual_seed(0)  # finetune's default --seed
    base = AutoModelForCausalLM.from_pretrained(str(setup["model"]))
    fresh = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=32, lora_dropout=0.05,
                                            target_modules=["q_proj", "v_proj"]))
    initial = {n.replace(".default", ""): p.detach() for n, p in fresh.named_parameters() if "lora_" in n}
    assert sorted(saved) == sorted(initial) and len(saved) == 8  # 2 layers x (q, v) x (A, B)
    for name, tensor in saved.items():
        if "lora_B" in name:
            assert torch.count_nonzero(tensor) == 0, name
        else:
            assert torch.equal(tensor, initial[name]), name
    final = load_file(str(setup["run"] / "adapter_model.safetensors"))
    assert any(torch.count_nonzero(t) for n, t in final.items() if "lora_B" in n)  # training moved B


@pytest.mark.parametrize("method", ["identity", "datainf"])
def test_run_scores_are_the_checkpoints_scores_weighted_by_their_learning_rates(setup, tmp_path, capsys, method):
    """`score` on run stores = sum over checkpoints of lr_c x the checkpoint's scores (each scored alone with
    score_store, its learning rate read from its own datainf_checkpoint.json); the scores file names every
    term (store path and fingerprints, weight, method)."""
    out = tmp_path / "scores.safetensors"
    code, text, err = run(["score", "--store", str(setup["stores"]), "--queries", str(setup["query_stores"]),
                           "--method", method, "--compute-dtype", "float64", "--out", str(out)], capsys)
    assert code == 0, err
    assert "summed over 3 checkpoints" in text
    want, terms = 0, []
    for name, adapter in (("checkpoint-0", setup["run"] / "checkpoint-0"),
                          ("checkpoint-6", setup["run"] / "checkpoint-6"), ("checkpoint-12", setup["run"])):
        lr = json.loads((adapter / "datainf_checkpoint.json").read_text())["learning_rate"]
        train, queries = GradientStore.open(setup["stores"] / name), GradientStore.open(setup["query_stores"] / name)
        scores = score_store(train, queries, ScoreArguments(method=method, dtype="float64")).scores
        want = want + lr * scores
        terms.append((str(train.path), lr, train.fingerprints["adapter"]))
    loaded = load_scores(out)
    got = loaded.scores[method]
    assert got.shape == (6, 2)
    torch.testing.assert_close(got.double(), want.double(), rtol=FLOAT64_TOL, atol=1e-300)
    provenance = loaded.provenance[method]
    assert [(t["train_store"]["path"], t["weight"], t["train_store"]["fingerprints"]["adapter"]) for t in provenance
            ] == [(p, pytest.approx(w, rel=1e-15), f) for p, w, f in terms]
    assert all(t["method"] == method and t["queries"]["path"].startswith(str(setup["query_stores"]))
               for t in provenance)


@pytest.mark.parametrize("weighting", ["standardized", "squared-standardized"])
def test_run_scores_standardized_are_each_checkpoints_scores_over_their_sd(setup, tmp_path, capsys, weighting):
    """`score --weighting`: each checkpoint's scores (scored alone with score_store) divided by their standard
    deviation over all entries (numpy's, ddof 0), times its learning rate (squared for squared-standardized),
    summed; the scores file records the weighting. Refused without run stores."""
    import numpy as np

    out = tmp_path / "scores.safetensors"
    code, text, err = run(["score", "--store", str(setup["stores"]), "--queries", str(setup["query_stores"]),
                           "--method", "identity", "--compute-dtype", "float64", "--weighting", weighting,
                           "--out", str(out)], capsys)
    assert code == 0, err
    assert f"summed over 3 checkpoints ({weighting})" in text
    want = 0
    for name, adapter in (("checkpoint-0", setup["run"] / "checkpoint-0"),
                          ("checkpoint-6", setup["run"] / "checkpoint-6"), ("checkpoint-12", setup["run"])):
        lr = json.loads((adapter / "datainf_checkpoint.json").read_text())["learning_rate"]
        train, queries = GradientStore.open(setup["stores"] / name), GradientStore.open(setup["query_stores"] / name)
        scores = score_store(train, queries, ScoreArguments(method="identity", dtype="float64")).scores.numpy()
        want = want + (lr if weighting == "standardized" else lr * lr) * scores / np.std(scores)
    loaded = load_scores(out)
    torch.testing.assert_close(loaded.scores["identity"].double(), torch.from_numpy(want), rtol=FLOAT64_TOL,
                               atol=1e-300)
    assert loaded.settings["identity"]["weighting"] == weighting
    single = setup["stores"] / "checkpoint-6"
    code, _, err = run(["score", "--store", str(single), "--queries", str(setup["query_stores"] / "checkpoint-6"),
                        "--weighting", weighting, "--out", str(tmp_path / "x.safetensors")], capsys)
    assert code == 2 and "--weighting" in err and not (tmp_path / "x.safetensors").exists()


def test_combine_refuses_an_unknown_weighting_before_scoring(setup, monkeypatch):
    import datainf.combine as combine_module

    monkeypatch.setattr(combine_module, "_scored", lambda *a: pytest.fail("scored before the weighting was checked"))
    terms = combine_module.run_terms(setup["stores"], setup["query_stores"], ScoreArguments(method="identity"))
    with pytest.raises(DataInfError, match=r"unknown weighting 'squared'.*weights, standardized, squared-standardized"):
        combine_module.combine(terms, weighting="squared")


def test_checkpoint_0_gradients_live_in_the_b_blocks_only(setup):
    """At step 0, B = 0: the A blocks' gradients are zero, the B blocks' are not."""
    store = GradientStore.open(setup["stores"] / "checkpoint-0")
    for name in store.block_names:
        norm = float(store.block(name)[0:store.n_examples].abs().sum())
        assert (norm == 0) == ("lora_A" in name), (name, norm)


def test_grads_run_keeps_complete_stores_and_makes_missing_ones(setup, tmp_path, capsys):
    """A second `grads --run` changes no file (contents and mtimes); a checkpoint's store removed is made
    again, equal to the first, and the other stores stay untouched."""
    stores = shutil.copytree(setup["stores"], tmp_path / "stores")
    argv = ["grads", "--task", "causal_lm", "--model", str(setup["model"]), "--run", str(setup["run"]), "--data",
            str(setup["data"]), "--store", str(stores), "--dtype", "float64", "--model-dtype", "float64",
            "--chunk-size", "4"]
    before = files(stores)
    code, _, err = run(argv, capsys)
    assert code == 0, err
    assert files(stores) == before
    first = GradientStore.open(stores / "checkpoint-6")
    kept = {n: first.block(n)[0:first.n_examples].clone() for n in first.block_names}
    shutil.rmtree(stores / "checkpoint-6")
    code, _, err = run(argv, capsys)
    assert code == 0, err
    after = files(stores)
    assert {k: v for k, v in after.items() if not k.startswith("checkpoint-6")} == {
        k: v for k, v in before.items() if not k.startswith("checkpoint-6")}
    again = GradientStore.open(stores / "checkpoint-6")
    for name, block in kept.items():
        torch.testing.assert_close(again.block(name)[0:again.n_examples], block, rtol=0, atol=0)


def test_a_trainer_output_folder_is_read_in_step_order_with_its_rates(setup, tmp_path):
    """checkpoint-2, -5, -10 (listed out of order by name), each with trainer_state.json written here: read
    in step order, each weighing the last rate logged at or before its step; the root's final adapter is the
    same point as checkpoint-10 (its trainer_state says step 10), so it is not counted twice."""
    from datainf.models.checkpoints import run_checkpoints

    log = [{"step": s, "learning_rate": lr, "loss": 1.0} for s, lr in ((1, 1e-3), (4, 8e-4), (8, 4e-4), (10, 2e-4))]
    run_dir = tmp_path / "trainer-out"
    for step in (10, 2, 5):
        folder = run_dir / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        shutil.copy2(setup["run"] / "adapter_config.json", folder)
        (folder / "trainer_state.json").write_text(json.dumps(
            {"global_step": step, "log_history": [e for e in log if e["step"] <= step]}))
    shutil.copy2(setup["run"] / "adapter_config.json", run_dir)
    (run_dir / "trainer_state.json").write_text(json.dumps({"global_step": 10, "log_history": log}))
    (run_dir / "checkpoint-7").mkdir()  # no adapter in it: not a checkpoint
    got = run_checkpoints(run_dir)
    assert [(c.adapter.name, c.step, c.learning_rate) for c in got] == [
        ("checkpoint-2", 2, 1e-3), ("checkpoint-5", 5, 8e-4), ("checkpoint-10", 10, 2e-4)]
    (run_dir / "trainer_state.json").write_text(json.dumps({"global_step": 12, "log_history": log}))
    assert [c.step for c in run_checkpoints(run_dir)] == [2, 5, 10, 12]  # a later final adapter counts
    (run_dir / "trainer_state.json").unlink()
    assert [c.step for c in run_checkpoints(run_dir)] == [2, 5, 10]  # one that says nothing: left out


def test_terms_over_other_training_sets_are_refused(setup, tmp_path):
    """combine refuses, before scoring, terms whose training stores hold other rows, naming both stores and
    what differs; a zero or NaN weight too."""
    from datainf.cli import main
    from datainf.combine import Term, combine

    subset = write_jsonl(tmp_path / "subset.jsonl", [json.loads(line) for line in
                                                     setup["data"].read_text().splitlines()[:4]])
    with pytest.raises(SystemExit) as e:
        main(["--quiet", "grads", "--task", "causal_lm", "--model", str(setup["model"]), "--adapter",
              str(setup["run"]), "--data", str(subset), "--store", str(tmp_path / "subset"), "--dtype", "float64",
              "--model-dtype", "float64"])
    assert e.value.code == 0
    full, part = GradientStore.open(setup["stores"] / "checkpoint-12"), GradientStore.open(tmp_path / "subset")
    queries = GradientStore.open(setup["query_stores"] / "checkpoint-12")
    arguments = ScoreArguments(method="identity")
    with pytest.raises(DataInfError) as error:
        combine([Term(full, queries, arguments, 1.0), Term(part, queries, arguments, 1.0)])
    message = str(error.value)
    assert "cannot be summed" in message and str(full.path) in message and str(part.path) in message
    assert "dataset fingerprint" in message
    for weight in (0.0, float("nan")):
        with pytest.raises(DataInfError, match="finite non-zero"):
            combine([Term(full, queries, arguments, weight)])
    # a difference of two terms (a debias) is a call of the same function
    got = combine([Term(full, queries, arguments, 1.0),
                   Term(GradientStore.open(setup["stores"] / "checkpoint-0"),
                        GradientStore.open(setup["query_stores"] / "checkpoint-0"), arguments, -1.0)])
    want = (datainf.influence(full.blocks(), query_blocks(queries), "identity")
            - datainf.influence(GradientStore.open(setup["stores"] / "checkpoint-0").blocks(),
                                query_blocks(GradientStore.open(setup["query_stores"] / "checkpoint-0")), "identity"))
    torch.testing.assert_close(got.scores.double(), want.double(), rtol=1e-6, atol=1e-12)


def test_score_refuses_a_run_beside_a_single_store(setup, tmp_path, capsys):
    """Run stores against one query store (or the reverse): one error line, nothing written."""
    out = tmp_path / "s.safetensors"
    refused(["score", "--store", str(setup["stores"]), "--queries", str(setup["query_stores"] / "checkpoint-12"),
             "--out", str(out)], capsys, "run", "grads --run")
    refused(["score", "--store", str(setup["stores"] / "checkpoint-12"), "--queries", str(setup["query_stores"]),
             "--out", str(out)], capsys, "run", "grads --run")
    assert not out.exists()


def query_scores_per_checkpoint(setup) -> list[tuple[float, torch.Tensor]]:
    """(learning rate, identity scores of PROMPT/RESPONSE against the checkpoint's training store, float64 (n,))
    per checkpoint of the run, the query's gradient from a model loaded afresh from the checkpoint's own folder
    (no weight swapping)."""
    from datainf.attributor import Attributor
    from datainf.data.collate import TextCollator
    from datainf.models.llm import load_causal_lm_adapter

    out = []
    for name, adapter in (("checkpoint-0", setup["run"] / "checkpoint-0"),
                          ("checkpoint-6", setup["run"] / "checkpoint-6"), ("checkpoint-12", setup["run"])):
        lr = json.loads((adapter / "datainf_checkpoint.json").read_text())["learning_rate"]
        model, tok = load_causal_lm_adapter(setup["model"], adapter, dtype=torch.float64)
        query = Attributor(model, task="causal_lm", collate=TextCollator(tok, task="causal_lm"), progress=False
                           ).gradients([{"prompt": PROMPT, "response": RESPONSE}])
        scores = datainf.influence(GradientStore.open(setup["stores"] / name).blocks(), query, "identity")[:, 0]
        out.append((lr, scores.double()))
    return out


def test_explain_run_sums_every_checkpoint_with_its_learning_rate(setup, tmp_path, capsys):
    """`explain --run RUN --store STORES` = sum_c lr_c x the query's scores at checkpoint c, each computed
    from a model loaded afresh from the checkpoint's own folder (no weight swapping), float64."""
    out = tmp_path / "e.json"
    code, text, err = run(["explain", "--model", str(setup["model"]), "--run", str(setup["run"]), "--store",
                           str(setup["stores"]), "--prompt", PROMPT, "--response", RESPONSE, "--method",
                           "identity", "--k", "3", "--json", str(out), "--model-dtype", "float64"], capsys)
    assert code == 0, err
    assert "scores summed over 3 checkpoints" in text
    want = sum(lr * scores for lr, scores in query_scores_per_checkpoint(setup))
    answer = json.loads(out.read_text())
    rows = answer["answers"][0]["rows"]
    assert rows and answer["run"] == str(setup["run"])
    for r in rows:
        assert r["score"] == pytest.approx(float(want[r["train_index"]]), rel=FLOAT64_TOL, abs=1e-300)
    # a --store that is not run stores, and --adapter beside --run: refused
    capsys.readouterr()
    refused(["explain", "--model", str(setup["model"]), "--run", str(setup["run"]), "--store",
             str(setup["stores"] / "checkpoint-12"), "--prompt", PROMPT], capsys, "--store", "grads --run")
    refused(["explain", "--model", str(setup["model"]), "--run", str(setup["run"]), "--adapter", str(setup["run"]),
             "--store", str(setup["stores"]), "--prompt", PROMPT], capsys, "--adapter", "--run")


@pytest.mark.parametrize("weighting", ["standardized", "squared-standardized"])
def test_explain_run_weighting_divides_each_checkpoints_scores_by_their_sd(setup, tmp_path, capsys, weighting):
    """`explain --run --weighting`: the query's scores at each checkpoint (a model loaded afresh from the
    checkpoint's folder, float64) divided by their standard deviation (numpy's, ddof 0, over the training rows
    of this one query), times the learning rate (squared for squared-standardized), summed; the JSON records
    the weighting. With --tokens, or one adapter alone, refused before any scoring."""
    import numpy as np

    out = tmp_path / "e.json"
    base = ["explain", "--model", str(setup["model"]), "--prompt", PROMPT, "--response", RESPONSE, "--method",
            "identity", "--weighting", weighting]
    code, text, err = run([*base, "--run", str(setup["run"]), "--store", str(setup["stores"]), "--k", "3",
                           "--json", str(out), "--model-dtype", "float64"], capsys)
    assert code == 0, err
    assert f"scores summed over 3 checkpoints, weighted by lr ({weighting})" in text
    want = sum((lr if weighting == "standardized" else lr * lr) * s / np.std(s.numpy())
               for lr, s in query_scores_per_checkpoint(setup))
    answer = json.loads(out.read_text())
    assert answer["weighting"] == weighting and answer["answers"][0]["rows"]
    for r in answer["answers"][0]["rows"]:
        assert r["score"] == pytest.approx(float(want[r["train_index"]]), rel=FLOAT64_TOL, abs=1e-300)
    capsys.readouterr()
    refused([*base, "--run", str(setup["run"]), "--store", str(setup["stores"]), "--tokens"], capsys, "--tokens",
            "--weighting")
    refused([*base, "--adapter", str(setup["run"]), "--store", str(setup["stores"] / "checkpoint-12")], capsys,
            "--weighting", "--run")


def test_step_0_zero_blocks_are_one_warning_per_checkpoint(setup):
    """Scoring checkpoint-0 (B = 0: the 4 A blocks have no gradient) through combine warns once, naming the
    store and the count, not once per block."""
    from datainf.combine import Term, combine

    train = GradientStore.open(setup["stores"] / "checkpoint-0")
    queries = GradientStore.open(setup["query_stores"] / "checkpoint-0")
    with pytest.warns(UserWarning) as caught:
        combine([Term(train, queries, ScoreArguments(method="identity"), 1.0)])
    zero = [str(w.message) for w in caught if "all-zero" in str(w.message) or "gradient is zero" in str(w.message)]
    assert len(zero) == 1 and "4 blocks" in zero[0] and str(train.path) in zero[0], zero
