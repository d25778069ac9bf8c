"""Issue 29's evaluation pieces on a tiny random Llama, each against an independent computation: the scores at
step 0 and summed along the run (a twin fine-tune, weights from the recorded learning rates by hand, gradients
from single-example backward calls, DataInf from its formula in float64), and the resemblance control (a loop
over the base model's hidden states)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from datainf.experiments.llm_identification import (  # noqa: E402
    CONTROL,
    LLMIdentificationSettings,
    prompts_and_responses,
    resemblance_scores,
    run_llm_identification,
    task_records,
)
from datainf.models.finetune import LoraSettings, TrainSettings  # noqa: E402
from datainf.models.llm import finetune_causal_lm, load_causal_lm  # noqa: E402
from datainf.scoring import load_scores  # noqa: E402
from reference import FLOAT32_TOL  # noqa: E402

LORA = LoraSettings(rank=2, alpha=8, target_modules=("q_proj", "v_proj"), modules_to_save=())


def _response_ids(tok, record):
    """prompt + response + EOS token ids and the labels of the response protocol (-100 on the prompt)."""
    prompt_ids = tok(record["prompt"])["input_ids"]
    ids = tok(record["prompt"] + record["response"])["input_ids"] + [tok.eos_token_id]
    assert ids[: len(prompt_ids)] == prompt_ids
    return ids, [-100] * len(prompt_ids) + ids[len(prompt_ids):]


def _per_block_grads(model, tok, records):
    """{parameter name: (n, numel)} float64, each row one single-example backward of the summed response NLL."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rows = {n: [] for n in params}
    for record in records:
        ids, labels = _response_ids(tok, record)
        n_loss = sum(1 for x in labels if x != -100)
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss * n_loss
        for (name, _), g in zip(params.items(), torch.autograd.grad(loss, list(params.values()))):
            rows[name].append(g.flatten().double())
    return {n: torch.stack(r) for n, r in rows.items()}


def _dense_datainf(G, V):
    """DataInf from its formula, float64, per block (blocks whose training gradients are all zero add nothing):
    lambda = 0.1 mean |g_i|^2 / d, R = (I - (1/n) sum g_i g_i^T / (lambda + |g_i|^2)) / lambda, -G R V^T."""
    total = 0
    for name in G:
        g, v = G[name], V[name]
        if not bool(g.abs().sum() > 0):
            continue
        n, d = g.shape
        lam = 0.1 * float((g * g).sum(1).mean()) / d
        w = 1.0 / (lam + (g * g).sum(1))
        R = (torch.eye(d, dtype=torch.float64) - (g.T * w) @ g / n) / lam
        total = total - g @ R @ v.T
    return total


def _identity(G, V):
    return -sum(G[n] @ V[n].T for n in G)


def test_step0_and_run_sum_against_a_twin_fine_tune(tiny_llama_dir, tmp_path):
    """--checkpoints 2 over 4 steps: checkpoints at steps 0, 2, 4; weights as finetune records them (the mean
    learning rate of the steps from a checkpoint to the next; the final: its own step's), computed here from
    the rates the twin fine-tune used; "+step0" is step 0's scores alone, "+run" the weighted sum."""
    settings = LLMIdentificationSettings(task="sentences", classes=2, train_per_class=3, test_per_class=1,
                                         train=TrainSettings(epochs=2, batch_size=3, learning_rate=1e-2),
                                         grad_batch_size=2,
                                         methods=("identity", "datainf"), checkpoints=2)
    model, tok = load_causal_lm(tiny_llama_dir, LORA, seed=0)
    result = run_llm_identification(settings, tmp_path, progress=False, model=model, tokenizer=tok)
    assert set(result.methods) == {f"{m}{s}" for m in ("identity", "datainf") for s in ("", "+step0", "+run")}
    # the same fine-tune again, every step's weights and learning rate recorded here
    twin, _ = load_causal_lm(tiny_llama_dir, LORA, seed=0)
    params = {n: p for n, p in twin.named_parameters() if p.requires_grad}
    states = {0: {n: p.detach().clone() for n, p in params.items()}}
    rates = {}

    def on_step(step, lr):
        rates[step] = lr
        states[step] = {n: p.detach().clone() for n, p in params.items()}

    train, test = task_records(settings)
    finetune_causal_lm(twin, tok, prompts_and_responses(train), epochs=2, lr=1e-2, batch_size=3, seed=0,
                       progress=False, on_step=on_step)
    assert sorted(rates) == [1, 2, 3, 4] and min(rates.values()) > 0
    weights = {0: (rates[1] + rates[2]) / 2, 2: (rates[3] + rates[4]) / 2, 4: rates[4]}
    assert [(row["step"], row["lr"]) for row in result.checkpoints] == [(s, pytest.approx(w))
                                                                        for s, w in weights.items()]
    twin.eval()
    want = {"identity": {}, "datainf": {}}
    for step in weights:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(states[step][n])
        G, V = _per_block_grads(twin, tok, train), _per_block_grads(twin, tok, test)
        if step == 0:  # B = 0 at step 0: every A block has no gradient
            assert all(float(G[n].abs().max()) == 0 for n in G if "lora_A" in n)
        want["identity"][step], want["datainf"][step] = _identity(G, V), _dense_datainf(G, V)
    saved = load_scores(tmp_path / "scores.safetensors").scores
    for m in ("identity", "datainf"):
        expected = {"": want[m][4], "+step0": want[m][0], "+run": sum(weights[s] * want[m][s] for s in weights),
                    **{f"@step{s}": want[m][s] for s in weights}}  # each checkpoint alone, kept for re-weighting
        for suffix, ref in expected.items():
            got = saved[m + suffix].double()
            err = float((got - ref).abs().max())
            assert err <= FLOAT32_TOL * float(ref.abs().max()), (m + suffix, err)
    # the per-checkpoint metrics are of each checkpoint's own scores; the run's weighting is recorded
    results = json.loads((tmp_path / "results.json").read_text())
    assert "interval_rates" in results["checkpoint_weight_rule"]
    assert not (tmp_path / "store-run").exists()  # the checkpoints' stores are deleted, the final one kept
    assert (tmp_path / "store").is_dir()
    for n, p in model.named_parameters():  # the model is left with its final weights
        if p.requires_grad:
            assert torch.equal(p.detach(), states[4][n])


def test_resemblance_control_is_the_base_models_hidden_state_cosine(tiny_llama_dir, tmp_path):
    """The control row: -cos of the mean last hidden state over prompt + response + EOS, from the base model;
    checked against a loop of single-example forward passes of the model loaded without any adapter, and
    computed again after fine-tuning (the adapter must be switched off for it)."""
    from transformers import AutoModelForCausalLM

    settings = LLMIdentificationSettings(task="math", classes=2, train_per_class=3, test_per_class=2,
                                         train=TrainSettings(epochs=2, batch_size=3, learning_rate=5e-2),
                                         grad_batch_size=2,
                                         methods=("identity",), control=True)
    model, tok = load_causal_lm(tiny_llama_dir, LORA, seed=0)
    result = run_llm_identification(settings, tmp_path, progress=False, model=model, tokenizer=tok)
    assert CONTROL in result.methods and 0 <= result.methods[CONTROL].auc <= 1
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).double().eval()
    train, test = task_records(settings)

    def mean_state(record):
        ids, _ = _response_ids(tok, record)
        with torch.no_grad():
            return base(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0].mean(0)

    A = torch.stack([mean_state(r) for r in train])
    B = torch.stack([mean_state(r) for r in test])
    want = -(A @ B.T) / (A.norm(dim=1)[:, None] * B.norm(dim=1)[None, :])
    saved = load_scores(tmp_path / "scores.safetensors")
    assert saved.settings[CONTROL]["kind"] == "control"
    got = saved.scores[CONTROL].double()
    assert float((got - want).abs().max()) <= FLOAT32_TOL
    # after fine-tuning (the LoRA weights have moved), the control still reads the base model
    with torch.no_grad():
        trained = model(**tok("a b", return_tensors="pt"), output_hidden_states=True).hidden_states[-1]
        with model.disable_adapter():
            untouched = model(**tok("a b", return_tensors="pt"), output_hidden_states=True).hidden_states[-1]
    assert float((trained - untouched).abs().max()) > 1e-4  # so the check below could fail
    again = resemblance_scores(model, tok, prompts_and_responses(train), prompts_and_responses(test), 128)
    assert float((again.scores.double() - want).abs().max()) <= FLOAT32_TOL


# --------------------------------------------------------------------------------------------------- LDS
def test_lds_scores_step0_run_and_control_and_correlates_them_like_scipy(tiny_llama_dir, tmp_path, monkeypatch,
                                                                         capsys):
    """`experiment lds --checkpoints 1 --control --loo-examples 0` on a generation task: step 0's identity
    scores are -G0 V0^T from single-example backward calls at the initial adapter (the same LoRA seed); the
    control is the base model's hidden-state cosine; every row's LDS is scipy's Spearman of the subset sums of
    its scores against the cached retrains' losses; no leave-one-out retrain is made; a rerun with more
    subsets from a folder made before these settings existed retrains only the new subset."""
    from scipy.stats import spearmanr
    from transformers import AutoModelForCausalLM

    from datainf.cli import main
    from datainf.experiments import lds as lds_module

    out = tmp_path / "out"
    argv = ["--quiet", "experiment", "lds", "--task", "math", "--out", str(out), "--model", str(tiny_llama_dir),
            "--classes", "2", "--n-train", "6", "--n-query", "2", "--rank", "2", "--epochs", "1", "--lr", "1e-2",
            "--subsets", "3", "--loo-examples", "0", "--loo-seeds", "1", "--methods", "identity,datainf",
            "--checkpoints", "1", "--control", "--device", "cpu"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    res = json.loads((out / "lds.json").read_text())
    rows = {f"{m}{x}" for m in ("identity", "datainf") for x in ("", "+step0", "+run")} | {CONTROL}
    dda = {f"{m}+dda" for m in ("identity", "datainf")}  # DDA's debias: final minus step 0, by hand below
    scores = json.loads((out / "scores.json").read_text())
    # each checkpoint alone (step 0 and the final adapter here), whose weighted sum is the run's row
    steps = {k for k in scores if "@step" in k and ":" not in k}
    assert len(steps) == 4 and set(res["methods"]) == rows | dda | steps
    for m in ("identity", "datainf"):
        ours = sorted((k for k in steps if k.startswith(m + "@")), key=lambda k: int(k.rpartition("step")[2]))
        as_array = {k: torch.tensor(scores[k], dtype=torch.float64) for k in [*ours, m, m + "+step0", m + "+run"]}
        assert torch.equal(as_array[ours[0]], as_array[m + "+step0"]) and torch.equal(as_array[ours[-1]],
                                                                                     as_array[m])
        by_hand = sum(scores[k + ":weight"] * as_array[k] for k in ours)
        assert float((by_hand - as_array[m + "+run"]).abs().max()) <= 1e-5 * float(by_hand.abs().max())
    rows |= steps
    assert not (out / "loo").exists() and res["loo"]["examples"] == []
    assert all(r["loo_pearson"] is None for r in res["methods"].values())
    settings = lds_module.LdsSettings(task="math", classes=2, n_train=6, n_query=2, rank=2, epochs=1,
                                      learning_rate=1e-2, subsets=3, loo_examples=0, loo_seeds=1,
                                      methods=("identity", "datainf"), checkpoints=1, control=True)
    train, queries, _ = lds_module._records(settings, None)
    # step 0: the initial adapter, by hand
    model, tok = load_causal_lm(tiny_llama_dir, LoraSettings(rank=2, alpha=32.0, dropout=0.05,
                                                             target_modules=("q_proj", "v_proj"),
                                                             modules_to_save=()), seed=0)
    model.eval()
    G, V = _per_block_grads(model, tok, train), _per_block_grads(model, tok, queries)
    want = _identity(G, V)
    got = torch.tensor(scores["identity+step0"], dtype=torch.float64)
    assert float((got - want).abs().max()) <= FLOAT32_TOL * float(want.abs().max())
    # the control, from the base model alone
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).double().eval()

    def mean_state(record):
        ids, _ = _response_ids(tok, record)
        with torch.no_grad():
            return base(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0].mean(0)

    A, B = torch.stack([mean_state(r) for r in train]), torch.stack([mean_state(r) for r in queries])
    cosine = (A @ B.T) / (A.norm(dim=1)[:, None] * B.norm(dim=1)[None, :])
    assert float((torch.tensor(scores[CONTROL], dtype=torch.float64) + cosine).abs().max()) <= FLOAT32_TOL
    # every row's LDS from the cached retrains, by scipy
    masks = lds_module.subset_masks(settings, 6).astype(float)
    losses = [json.loads((out / "subsets" / f"{i:04d}.json").read_text()) for i in range(3)]
    for name in rows | dda:
        s = torch.tensor(scores[name], dtype=torch.float64).numpy() if name in rows else (
            torch.tensor(scores[name[:-4]], dtype=torch.float64) - torch.tensor(scores[name[:-4] + "+step0"],
                                                                              dtype=torch.float64)).numpy()
        per_query = [spearmanr(masks @ s[:, j], [row[j] for row in losses]).statistic for j in range(2)]
        assert res["methods"][name]["lds"] == pytest.approx(sum(per_query) / 2, abs=1e-12), name
    # a folder made before --checkpoints/--control existed (settings.json without them) resumes when they are
    # left at their defaults, and only the new subset is retrained
    saved = json.loads((out / "settings.json").read_text())
    old = {k: v for k, v in saved.items() if k not in ("checkpoints", "control")}
    (out / "settings.json").write_text(json.dumps(old))
    (out / "scores.json").write_text(json.dumps({k: v for k, v in scores.items() if "+" not in k
                                                 and "@" not in k and not k.startswith(CONTROL)}))
    fits = []
    real_fit = lds_module.CausalLMTrainer.fit
    monkeypatch.setattr(lds_module.CausalLMTrainer, "fit", lambda self, *a, **k: fits.append(a) or real_fit(
        self, *a, **k))
    plain = [a for a in argv if a not in ("--control",)]
    plain = plain[: plain.index("--checkpoints")] + plain[plain.index("--checkpoints") + 2:]
    plain[plain.index("--subsets") + 1] = "4"
    with pytest.raises(SystemExit) as e:
        main(plain)
    assert e.value.code == 0 and len(fits) == 1
    assert set(json.loads((out / "lds.json").read_text())["methods"]) == {"identity", "datainf"}


def test_lds_refuses_step0_and_control_on_a_classifier(tiny_bert_dir, tmp_path, capsys):
    """A classifier's head is random at step 0: --checkpoints / --control are refused in one line, before
    anything is written."""
    from datainf.cli import main

    for flag in (["--checkpoints", "2"], ["--control"]):
        out = tmp_path / "o"
        with pytest.raises(SystemExit) as e:
            main(["--quiet", "experiment", "lds", "--out", str(out), "--model", str(tiny_bert_dir), *flag])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ")
        assert "generation tasks only" in err[0]
        assert not out.exists()


def test_a_run_stopped_part_way_picks_up_its_kept_work_and_scores_as_a_whole_run(tiny_llama_dir, tmp_path,
                                                                                  monkeypatch):
    """A run stopped while it makes its second checkpoint's gradients, started again with the same settings:
    it does not fine-tune again (the kept snapshots are put back), reuses the stores it finished (only the
    missing checkpoint's training gradients are computed), scores as a run never stopped, and leaves no kept
    work behind."""
    from datainf.attributor import Attributor
    from datainf.experiments import llm_identification as experiment

    settings = LLMIdentificationSettings(task="sentences", classes=2, train_per_class=3, test_per_class=1,
                                         train=TrainSettings(epochs=2, batch_size=3, learning_rate=1e-2),
                                         grad_batch_size=2, methods=("identity", "datainf"), checkpoints=2)
    model, tok = load_causal_lm(tiny_llama_dir, LORA, seed=0)
    run_llm_identification(settings, tmp_path / "whole", progress=False, model=model, tokenizer=tok)

    computed: list[int] = []  # training-gradient chunks computed (the query gradients pass no progress bar)
    real_grads = Attributor._grads_in_order
    monkeypatch.setattr(Attributor, "_grads_in_order", lambda self, records, rows, **kw: (
        computed.append(len(rows)) if kw.get("bar") is not None else None, real_grads(self, records, rows, **kw))[1])
    real_gradients, calls = experiment.gradients, []

    def stopping(*args):
        calls.append(args[-2])
        if len(calls) == 3:  # the final store, checkpoint 0's, then checkpoint 2's: stopped before it
            raise KeyboardInterrupt
        return real_gradients(*args)

    monkeypatch.setattr(experiment, "gradients", stopping)
    out = tmp_path / "stopped"
    model, tok = load_causal_lm(tiny_llama_dir, LORA, seed=0)
    with pytest.raises(KeyboardInterrupt):
        run_llm_identification(settings, out, progress=False, model=model, tokenizer=tok)
    assert (out / "progress" / "finetune.safetensors").is_file() and (out / "store-run" / "checkpoint-0").is_dir()
    assert not (out / "results.json").exists() and len(computed) == 2

    computed.clear()
    monkeypatch.setattr(experiment, "gradients", real_gradients)
    monkeypatch.setattr(experiment, "finetune", lambda *a, **k: pytest.fail("fine-tuned again"))
    model, tok = load_causal_lm(tiny_llama_dir, LORA, seed=0)
    run_llm_identification(settings, out, progress=False, model=model, tokenizer=tok)
    assert computed == [settings.train_per_class * settings.classes]  # checkpoint 2's store alone
    assert not (out / "progress").exists() and not (out / "store-run").exists()
    whole, resumed = load_scores(tmp_path / "whole" / "scores.safetensors").scores, load_scores(
        out / "scores.safetensors").scores
    assert set(whole) == set(resumed)
    for name in whole:
        ref = whole[name].double()
        assert float((resumed[name].double() - ref).abs().max()) <= FLOAT32_TOL * float(ref.abs().max()), name
    saved = {p: json.loads((tmp_path / p / "results.json").read_text()) for p in ("whole", "stopped")}
    assert saved["whole"]["checkpoints"] == saved["stopped"]["checkpoints"]
    assert saved["whole"]["test_loss_after"] == saved["stopped"]["test_loss_after"]


def test_kept_work_of_another_run_is_replaced_and_a_folder_datainf_did_not_write_is_refused(tmp_path):
    from datainf.errors import DataInfError
    from datainf.experiments.progress import RunProgress

    first = RunProgress(tmp_path, "a", work=("store",))
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "chunk").write_text("kept")
    assert not first.resumed and RunProgress(tmp_path, "a", work=("store",)).resumed
    assert (tmp_path / "store" / "chunk").read_text() == "kept"
    assert not RunProgress(tmp_path, "b", work=("store",)).resumed and not (tmp_path / "store").exists()
    other = tmp_path / "other"
    (other / "progress").mkdir(parents=True)
    (other / "progress" / "notes.txt").write_text("mine")
    with pytest.raises(DataInfError, match="not a run's kept work"):
        RunProgress(other, "a", work=("store",))
    assert (other / "progress" / "notes.txt").read_text() == "mine"
