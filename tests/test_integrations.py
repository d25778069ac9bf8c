"""DatainfCallback on a real ``transformers`` Trainer and a real TRL ``SFTTrainer`` (a tiny random Llama over
SmolLM2's vocabulary, with SmolLM2's real tokenizer and chat template).

Every recorded number is checked against the trainer's own state captured by a second, independent callback
of this test (the optimizer's learning rate and exp_avg_sq at every step, the LoRA weights), the learning
rates against means computed here by hand, checkpoint 0 against the model before training, and `datainf
explain --run` on the recorded run against per-checkpoint scores computed here: per-example gradients from a
loop of single-example backward calls (float64) on the recorded adapters, tokenized by TRL's own pipeline
(or by hand), summed with the recorded learning rates.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("trl")

from transformers import TrainerCallback  # noqa: E402

from cli_helpers import hashes, run_cli, write_jsonl  # noqa: E402
from datainf.errors import DataInfError  # noqa: E402
from datainf.integrations import TRAINING_FILE, DatainfCallback  # noqa: E402
from datainf.models.checkpoints import CHECKPOINT_FILE, run_checkpoints  # noqa: E402
from datainf.remedies import SECOND_MOMENTS_FILE  # noqa: E402
from datainf.store import GradientStore  # noqa: E402
from reference import FLOAT32_TOL, assert_close_to  # noqa: E402

WORDS = "red green blue cat dog sun moon tree".split()


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from datainf.models.llm import smollm2_tokenizer_dir

    return AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir()))


@pytest.fixture(scope="module")
def model_dir(tok, tmp_path_factory) -> Path:
    """A saved random 1-layer Llama over SmolLM2's vocabulary, with SmolLM2's tokenizer and chat template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=32, max_position_embeddings=256,
                         tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    folder = tmp_path_factory.mktemp("tiny-smollm2-llama")
    LlamaForCausalLM(config).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def lora_model(model_dir: Path, dropout: float = 0.0, seed: int = 0, task_type: str | None = "CAUSAL_LM"):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                           lora_dropout=dropout, task_type=task_type))


def lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


class Capture(TrainerCallback):
    """The trainer's own state, copied at every optimizer step: the rate the step used, the LoRA weights after
    it and the optimizer's exp_avg_sq of each LoRA parameter."""

    def __init__(self):
        self.rates: list[float] = []
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.moments: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights[0] = lora_state(model)

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step + 1
        self.rates.append(float(optimizer.param_groups[0]["lr"]))
        self.weights[step] = lora_state(model)
        params = dict(model.named_parameters())
        self.moments[step] = {n: optimizer.state[params[n]]["exp_avg_sq"].detach().clone() for n in self.weights[step]}


def hand_rates(rates: list[float], steps: list[int]) -> list[float]:
    """Each checkpoint's weight, computed here: the mean rate of the steps after it up to the next checkpoint
    (steps that started from its weights); the final checkpoint: its own step's rate."""
    out = []
    for i, step in enumerate(steps):
        if i + 1 == len(steps):
            out.append(rates[step - 1])
        else:
            window = rates[step:steps[i + 1]]  # steps step+1 .. next (rates[t - 1] is step t's)
            out.append(sum(window) / len(window))
    return out


def check_recorded_run(run: Path, capture: Capture, initial: dict[str, torch.Tensor], model_dir: Path,
                       steps: list[int]) -> list[float]:
    """The run folder against the captured trainer state; returns the hand-computed weights."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from datainf.cli.finetune import RATE_RULE

    found = run_checkpoints(run)
    assert [c.step for c in found] == steps
    assert [c.adapter for c in found] == [run / f"checkpoint-{s}" for s in steps[:-1]] + [run]  # finetune's layout
    weights = hand_rates(capture.rates, steps)
    assert capture.rates[0] == 0.0 and weights[0] > 0  # a warm-up from 0: step 0 weighs the first steps' rates
    for c, weight in zip(found, weights):
        info = json.loads((c.adapter / CHECKPOINT_FILE).read_text())
        assert info["step"] == c.step and info["steps"] == steps[-1] and info["learning_rate_rule"] == RATE_RULE
        assert c.learning_rate == pytest.approx(weight, rel=1e-12)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(c.adapter))
        loaded = lora_state(model)
        assert loaded.keys() == capture.weights[c.step].keys() and loaded
        for name, value in capture.weights[c.step].items():
            assert torch.equal(loaded[name], value), (c.step, name)
        if c.step == 0:
            assert info["exp_avg_sq"] is None and "no optimizer step" in info["exp_avg_sq_note"]
            assert not (c.adapter / SECOND_MOMENTS_FILE).exists()
            for name, value in initial.items():  # the model before training, B = 0
                assert torch.equal(loaded[name], value), name
                if "lora_B" in name:
                    assert not value.any()
        else:
            moments = load_file(str(c.adapter / SECOND_MOMENTS_FILE))
            assert info["exp_avg_sq"] == SECOND_MOMENTS_FILE and moments.keys() == capture.moments[c.step].keys()
            for name, value in capture.moments[c.step].items():
                assert torch.equal(moments[name], value), (c.step, name)
            assert any(v.any() for v in moments.values())  # (lora_A's stay 0 while every B is 0)
    return weights


def single_example_gradients(model, examples: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """(n, d): each example's gradient of its summed next-token NLL over the labelled tokens, one backward
    per example, all LoRA parameters flattened in name order."""
    params = [p for n, p in sorted(model.named_parameters()) if "lora_" in n]
    rows = []
    for ids, labels in examples:
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
        target = torch.tensor(labels[1:])
        keep = target != -100
        loss = torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum")
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def reference_scores(model_dir: Path, run: Path, weights: list[float], train: list[tuple[list[int], list[int]]],
                     query: tuple[list[int], list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """sum over the run's checkpoints of weight * identity score (-g_query . g_train), in float64; and each
    score's scale, sum of weight * |g_query| |g_train| (the size a dot product's rounding error is relative to)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    total, scale = torch.zeros(len(train), dtype=torch.float64), torch.zeros(len(train), dtype=torch.float64)
    for c, weight in zip(run_checkpoints(run), weights):
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64)
        model = PeftModel.from_pretrained(base, str(c.adapter), is_trainable=True).eval()
        g_train = single_example_gradients(model, train)
        g_query = single_example_gradients(model, [query])[0]
        total += weight * -(g_train @ g_query)
        scale += weight * g_train.norm(dim=1) * g_query.norm()
    return total, scale


def assert_scores(got: dict[int, float], reference: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Every training example's score against the float64 reference. The stores and the query gradient are
    float32 (the trainer's model): each gradient is within FLOAT32_TOL of its norm, so each dot product
    within FLOAT32_TOL of the product of the norms (the scale), however much its terms cancel."""
    want, scale = reference
    assert sorted(got) == list(range(len(want))) and bool((scale > 0).all())
    for i, score in got.items():
        assert abs(score - float(want[i])) <= FLOAT32_TOL * float(scale[i]), (i, score, float(want[i]))


def explained_scores(path: Path) -> dict[int, float]:
    answer = json.loads(path.read_text())["answers"][0]
    return {r["train_index"]: r["score"] for r in answer["rows"] if r["method"] == "identity"}


def test_sft_trainer_run_is_recorded_and_explain_run_sums_its_checkpoints(tok, model_dir, tmp_path, capsys):
    """TRL's SFTTrainer on conversational prompt-completion rows, gradients=True: the recorded checkpoints
    (weights, rates, exp_avg_sq, the run's record) are the trainer's own; the stores written during training
    are the ones `grads --run` makes (run on them, it changes no file: same fingerprints although TRL turned
    the model's KV cache off); `explain --run` on them equals the learning-rate-weighted sum of per-checkpoint
    scores from single-example backward calls on the recorded adapters, tokenized by TRL's own pipeline."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from datainf.models.llm import load_causal_lm_adapter
    from datainf.store import fingerprint_model

    rows = [{"prompt": [{"role": "user", "content": f"say {w}"}],
             "completion": [{"role": "assistant", "content": f"{w} {w}"}]} for w in WORDS]
    run, stores, capture = tmp_path / "run", tmp_path / "stores", Capture()
    model = lora_model(model_dir)
    initial = lora_state(model)
    args = SFTConfig(output_dir=str(tmp_path / "trainer"), max_steps=6, per_device_train_batch_size=2,
                     learning_rate=1e-2, warmup_steps=1, logging_steps=1, save_strategy="no", report_to=[],
                     use_cpu=True, max_length=64, disable_tqdm=True, seed=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[DatainfCallback(run, checkpoints=2, train_data=rows, gradients=True,
                                                    store=stores), capture])
    trainer.train()
    weights = check_recorded_run(run, capture, initial, model_dir, [0, 3, 6])

    record = json.loads((run / TRAINING_FILE).read_text())
    loaded, _ = load_causal_lm_adapter(model_dir, run)  # the base model as `grads` and `explain` load it
    assert record["trainer"] == "trl.SFTTrainer" and record["base_model"]["path"] == str(model_dir)
    assert record["base_model"]["fingerprint"] == fingerprint_model(loaded)["model"]
    tokenization = record["tokenization"]
    assert tokenization["data_format"] == "conversational prompt-completion"
    assert tokenization["loss_tokens"] == "assistant" and tokenization["max_length"] == 64
    assert tokenization["grads_options"] == "--max-length 64 --truncation keep_start"
    assert tokenization["trainer_settings"]["assistant_only_loss"] is False
    assert tokenization["tokenizer"]["chat_template_sha256"] == hashlib.sha256(tok.chat_template.encode()).hexdigest()
    assert [c["step"] for c in record["checkpoints"]] == [0, 3, 6]

    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    before = hashes(stores)
    code, _, err = run_cli(["grads", "--task", "causal_lm", "--model", str(model_dir), "--run", str(run), "--data",
                            str(data), "--store", str(stores), "--max-length", "64", "--truncation",
                            "keep_start"], capsys)  # as recorded: tokenization["grads_options"]
    assert code == 0, err
    assert hashes(stores) == before and before  # complete stores of this run and data: nothing to redo
    prompt, response = "say sun", "sun sun"
    code, _, err = run_cli(["explain", "--model", str(model_dir), "--run", str(run), "--store", str(stores),
                            "--prompt", prompt, "--response", response, "--method", "identity", "--k", str(len(rows)),
                            "--json", str(tmp_path / "e.json")], capsys)
    assert code == 0, err

    # TRL's own tokenization of the training rows (its prepared dataset: input_ids, labels), and of the query
    # by TRL's rule for a conversational prompt-completion row
    train = [(list(r["input_ids"]), list(r["labels"])) for r in trainer.train_dataset]
    assert len(train) == len(rows)
    turns = [{"role": "user", "content": prompt}]
    prompt_ids = list(tok.apply_chat_template(turns, tokenize=True, add_generation_prompt=True, return_dict=True)
                      ["input_ids"])
    full_ids = list(tok.apply_chat_template(turns + [{"role": "assistant", "content": response}], tokenize=True,
                                            return_dict=True)["input_ids"])
    assert full_ids[:len(prompt_ids)] == prompt_ids
    query = (full_ids, [-100] * len(prompt_ids) + full_ids[len(prompt_ids):])
    assert_scores(explained_scores(tmp_path / "e.json"), reference_scores(model_dir, run, weights, train, query))


def test_trainer_run_with_gradients_writes_the_stores_grads_run_would_and_leaves_training_unchanged(
        tok, model_dir, tmp_path, capsys):
    """The transformers Trainer with datainf's TextCollator and gradients=True (a LoRA config without a
    task_type, which peft's save completes): the checkpoints are the trainer's own; the stores written during
    training are complete `grads --run` stores (a `grads --run` on them changes no file, and one into a new
    folder makes the same gradients); `explain --run` on them equals the hand-computed weighted sum; and the
    training itself (dropout on) ends at the same weights as without the callback."""
    from transformers import Trainer, TrainingArguments

    from datainf.data.collate import TextCollator

    records = [{"prompt": f"say {w} twice:", "response": f" {w} {w}"} for w in WORDS]
    collate = TextCollator(tok, task="causal_lm", max_length=64)

    def train(callbacks, out):
        model = lora_model(model_dir, dropout=0.1, task_type=None)
        initial = lora_state(model)
        args = TrainingArguments(output_dir=str(out), max_steps=5, per_device_train_batch_size=2, learning_rate=1e-2,
                                 warmup_steps=2, save_strategy="no", report_to=[], use_cpu=True,
                                 remove_unused_columns=False, disable_tqdm=True, seed=0)
        Trainer(model=model, args=args, train_dataset=records, data_collator=collate, callbacks=callbacks).train()
        return model, initial

    run, stores, capture = tmp_path / "run", tmp_path / "stores", Capture()
    callback = DatainfCallback(run, checkpoints=2, gradients=True, train_data=records, store=stores, collate=collate,
                               tokenizer=tok)
    model, initial = train([callback, capture], tmp_path / "t1")
    plain, _ = train([], tmp_path / "t2")
    for (name, p), (_, q) in zip(sorted(lora_state(model).items()), sorted(lora_state(plain).items())):
        assert torch.equal(p, q), name  # the callback (and its gradient passes) changed nothing in training
    weights = check_recorded_run(run, capture, initial, model_dir, [0, 2, 5])
    assert json.loads((run / TRAINING_FILE).read_text())["tokenization"]["loss_tokens_source"] == (
        "the collate given to the callback")

    data = write_jsonl(tmp_path / "records.jsonl", records)
    before = hashes(stores)
    assert all((stores / f"checkpoint-{s}").is_dir() for s in (0, 2, 5)) and (stores / "datainf_run.json").is_file()
    code, _, err = run_cli(["grads", "--task", "causal_lm", "--model", str(model_dir), "--run", str(run), "--data",
                            str(data), "--store", str(stores), "--max-length", "64"], capsys)
    assert code == 0, err
    assert hashes(stores) == before  # every store complete, made as grads --run makes it
    code, _, err = run_cli(["grads", "--task", "causal_lm", "--model", str(model_dir), "--run", str(run), "--data",
                            str(data), "--store", str(tmp_path / "fresh"), "--max-length", "64"], capsys)
    assert code == 0, err
    for step in (0, 2, 5):
        mine, theirs = (GradientStore.open(folder / f"checkpoint-{step}") for folder in (stores, tmp_path / "fresh"))
        assert mine.fingerprints == theirs.fingerprints and mine.block_names == theirs.block_names
        for name in mine.block_names:
            block, other = mine.load(name), theirs.load(name)
            if other.any():
                assert_close_to(block, other, tol=FLOAT32_TOL, what=f"checkpoint-{step} {name}")
            else:
                assert not block.any()  # lora_A at step 0, where B = 0

    prompt, response = "say moon twice:", " moon moon"
    code, _, err = run_cli(["explain", "--model", str(model_dir), "--run", str(run), "--store", str(stores),
                            "--prompt", prompt, "--response", response, "--method", "identity", "--k",
                            str(len(records)), "--json", str(tmp_path / "e.json")], capsys)
    assert code == 0, err

    def by_hand(prompt: str, response: str) -> tuple[list[int], list[int]]:  # prompt + response + EOS, loss after
        ids = tok(prompt + response)["input_ids"] + [tok.eos_token_id]
        n_prompt = len(tok(prompt)["input_ids"])
        return ids, [-100] * n_prompt + ids[n_prompt:]

    assert_scores(explained_scores(tmp_path / "e.json"), reference_scores(
        model_dir, run, weights, [by_hand(r["prompt"], r["response"]) for r in records], by_hand(prompt, response)))


def test_refusals_write_nothing(tok, model_dir, tmp_path):
    """A run folder that holds files, gradients without data or store, the trainer's own output_dir, and a
    model without LoRA are refused with one DataInfError saying what to fix; nothing is written."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from datainf.data.collate import TextCollator

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    before = hashes(tmp_path)
    with pytest.raises(DataInfError, match="already exists and is not an empty folder"):
        DatainfCallback(taken)
    with pytest.raises(DataInfError, match="gradients=True needs train_data"):
        DatainfCallback(tmp_path / "run", gradients=True, store=tmp_path / "stores")
    with pytest.raises(DataInfError, match="gradients=True needs store=FOLDER"):
        DatainfCallback(tmp_path / "run", gradients=True, train_data=[{"text": "a"}])
    with pytest.raises(DataInfError, match="checkpoints must be an integer >= 1"):
        DatainfCallback(tmp_path / "run", checkpoints=0)
    with pytest.raises(DataInfError, match="projection must be a datainf ProjectionSettings"):
        DatainfCallback(tmp_path / "run", projection=64)
    assert hashes(tmp_path) == before and not (tmp_path / "run").exists()

    records = [{"text": "the red cat"}, {"text": "the blue dog"}]
    collate = TextCollator(tok, task="causal_lm", max_length=16)
    for model, out, words in ((lora_model(model_dir), tmp_path / "trainer", "trainer's output_dir"),
                              (AutoModelForCausalLM.from_pretrained(str(model_dir)), tmp_path / "run", "LoRA")):
        args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=2, per_device_train_batch_size=2,
                                 save_strategy="no", report_to=[], use_cpu=True, remove_unused_columns=False,
                                 disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=records, data_collator=collate,
                          callbacks=[DatainfCallback(out, checkpoints=1)])
        with pytest.raises(DataInfError, match=words):
            trainer.train()
        assert not out.exists() or not any(out.iterdir())
    assert not (tmp_path / "run").exists()


def test_a_warm_up_from_zero_and_an_early_stop_give_finetunes_weights(tok, model_dir, tmp_path):
    """A checkpoint after every step with a warm-up that starts at rate 0: step 0's interval (step 1, rate 0)
    runs on to step 2, the first rate above 0, as `datainf finetune` weighs it. A run stopped at step 4 of 6
    (a callback of the test stops it) has step 4, its last, as the final checkpoint (RUN itself), weighing
    step 4's rate; checkpoint 3 weighs the rates of the steps from it to there."""
    from transformers import Trainer, TrainingArguments

    from datainf.data.collate import TextCollator

    records = [{"prompt": f"say {w}:", "response": f" {w}"} for w in WORDS]
    collate = TextCollator(tok, task="causal_lm", max_length=32)

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:
                control.should_training_stop = True

    for checkpoints, stop, steps in ((6, [], [0, 1, 2, 3, 4, 5, 6]), (2, [Stop()], [0, 3, 4])):
        run, capture = tmp_path / f"run-{checkpoints}", Capture()
        args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=6, per_device_train_batch_size=2,
                                 learning_rate=1e-2, warmup_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                                 remove_unused_columns=False, disable_tqdm=True)
        Trainer(model=lora_model(model_dir), args=args, train_dataset=records, data_collator=collate,
                callbacks=[DatainfCallback(run, checkpoints=checkpoints, tokenizer=tok), capture, *stop]).train()
        found = run_checkpoints(run)
        assert [c.step for c in found] == steps and found[-1].adapter == run
        rates = capture.rates
        assert len(rates) == steps[-1] and rates[0] == 0.0 < rates[1]
        if checkpoints == 6:
            # step 0 runs on to the first rate above 0; checkpoint k weighs step k + 1; the final its own step
            want = [(rates[0] + rates[1]) / 2, *rates[1:], rates[5]]
        else:
            want = [sum(rates[0:3]) / 3, rates[3], rates[3]]  # step 3 stands for step 4; the final: step 4's
        assert [c.learning_rate for c in found] == pytest.approx(want, rel=1e-12)
        for c in found:
            assert torch.equal(lora_state_of(model_dir, c.adapter)["base_model.model.model.layers.0.self_attn."
                                                                 "v_proj.lora_B.default.weight"],
                               capture.weights[c.step]["base_model.model.model.layers.0.self_attn.v_proj.lora_B."
                                                       "default.weight"])


def lora_state_of(model_dir: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return lora_state(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(adapter)))
