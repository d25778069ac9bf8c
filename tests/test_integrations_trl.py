"""DatainfCallback and TRL's SFTTrainer settings that decide which tokens a training row is: packing (refused)
and the truncation of an example longer than max_length (followed).

TRL 1.16 tokenizes each example whole, then keeps its first ``max_length`` tokens (``truncation_mode=
"keep_start"``, the default; ``"keep_end"`` keeps the last ones) and drops the examples left without a loss
token. The callback's collator must cut the same way, or the stored gradients are of tokens the model never
saw. The reference here is TRL's own prepared dataset (``trainer.train_dataset``: input_ids and labels).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("trl")

from cli_helpers import hashes  # noqa: E402
from datainf.errors import DataInfError  # noqa: E402
from datainf.integrations import TRAINING_FILE, DatainfCallback  # noqa: E402
from test_integrations import lora_model, model_dir, tok  # noqa: E402,F401  (the tiny Llama and its tokenizer)

MAX_LENGTH = 12
LONG = " ".join(["red green blue"] * 6)  # well over MAX_LENGTH tokens


def sft_args(tmp_path, **settings):
    from trl import SFTConfig

    return SFTConfig(output_dir=str(tmp_path / "trainer"), max_steps=1, per_device_train_batch_size=2,
                     learning_rate=1e-2, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                     **settings)


def rows_of(data_format: str) -> list[dict]:
    """Rows of one TRL format, each longer than MAX_LENGTH tokens in a different place."""
    if data_format == "text":
        return [{"text": f"the cat {LONG}"}, {"text": f"{LONG} the dog"}, {"text": "a short one"}]
    if data_format == "prompt-completion":
        return [{"prompt": "say sun", "completion": f" sun {LONG}"},  # the completion runs past max_length
                {"prompt": f"{LONG} say moon", "completion": " moon"},  # the prompt alone fills max_length
                {"prompt": "say tree", "completion": " tree tree"}]
    return [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {LONG}"}]}
            for w in ("cat", "dog")]


@pytest.mark.parametrize("data_format,mode", [("text", "keep_start"), ("prompt-completion", "keep_start"),
                                              ("messages", "keep_start"), ("prompt-completion", "keep_end")])
def test_the_callbacks_collator_cuts_long_examples_as_the_sft_trainer_does(tok, model_dir, tmp_path,  # noqa: F811
                                                                          data_format, mode):
    """Every row, tokenized by the collator the callback derived from the SFTConfig, has the token ids and
    labels of TRL's prepared row; the rows TRL dropped (no loss token left after the cut) are exactly those
    whose labels the collator leaves all -100; the run's record names the side and the grads option."""
    import warnings

    from datasets import Dataset
    from trl import SFTTrainer

    rows = rows_of(data_format)
    callback = DatainfCallback(tmp_path / "run", checkpoints=1, train_data=rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # keep_end is deprecated in TRL 1.16, still applied
        args = sft_args(tmp_path, max_length=MAX_LENGTH, truncation_mode=mode)
    trainer = SFTTrainer(model=lora_model(model_dir), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok, callbacks=[callback])
    trainer.train()
    trl_rows = [(list(r["input_ids"]), list(r["labels"])) for r in trainer.train_dataset]
    ours = [callback.collate.tokenize(r, i) for i, r in enumerate(callback.records)]
    kept = [pair for pair in ours if any(label != -100 for label in pair[1])]
    assert kept == trl_rows
    assert callback.collate.truncation == mode
    assert all(len(ids) <= MAX_LENGTH for ids, _ in ours)
    assert any(len(ids) == MAX_LENGTH for ids, _ in ours)  # the rows were long enough to be cut
    if data_format == "prompt-completion" and mode == "keep_start":
        assert len(trl_rows) == len(rows) - 1  # the row whose prompt fills max_length carries no loss: dropped
    tokenization = json.loads((tmp_path / "run" / TRAINING_FILE).read_text())["tokenization"]
    assert tokenization["truncation"] == mode and tokenization["collate"]["truncation"] == mode
    assert f"--truncation {mode}" in tokenization["grads_options"]


def relative_hashes(folder) -> dict[str, str]:
    """sha256 of every file under ``folder``, by its path relative to it."""
    return {str(Path(k).relative_to(folder)): v for k, v in hashes(folder).items()}


def test_grads_on_a_callback_run_applies_the_recorded_options(tok, model_dir, tmp_path, capsys):  # noqa: F811
    """`datainf grads --run` on a run the callback recorded, with no tokenization option: it tokenizes as the
    run trained (TRL's keep_start and max_length, from datainf_training.json): every file of its stores is
    sha256-identical to those of `grads --run ... --truncation keep_start`, and their gradients are those of
    the token ids TRL trained on (TRL's own prepared rows, single-example backward calls in float64, compared
    as Gram matrices, which do not depend on how the store lays out its blocks). An explicit option that
    contradicts the record still wins, with one `warning:` line stating it and the recorded options."""
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    from cli_helpers import run_cli, write_jsonl
    from datainf.models.checkpoints import run_checkpoints
    from datainf.store import GradientStore
    from reference import FLOAT32_TOL
    from test_integrations import single_example_gradients

    rows = rows_of("text")
    trainer = SFTTrainer(model=lora_model(model_dir), args=sft_args(tmp_path, max_length=MAX_LENGTH),
                         train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[DatainfCallback(tmp_path / "run", checkpoints=1, train_data=rows)])
    trainer.train()
    trained = [(list(r["input_ids"]), list(r["labels"])) for r in trainer.train_dataset]
    assert len(trained) == len(rows) and max(len(ids) for ids, _ in trained) == MAX_LENGTH  # every row kept, cut
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    before = hashes(tmp_path / "run", data)
    common = ["grads", "--task", "causal_lm", "--model", str(model_dir), "--run", str(tmp_path / "run"), "--data",
              str(data)]
    code, _, err = run_cli([*common, "--store", str(tmp_path / "applied")], capsys)
    assert code == 0, err
    assert not [line for line in err.splitlines() if line.startswith("warning: ")], err
    code, _, err = run_cli([*common, "--store", str(tmp_path / "explicit"), "--truncation", "keep_start"], capsys)
    assert code == 0, err
    applied = relative_hashes(tmp_path / "applied")
    assert applied and applied == relative_hashes(tmp_path / "explicit")

    for checkpoint in run_checkpoints(tmp_path / "run"):
        store = GradientStore.open(tmp_path / "applied" / f"checkpoint-{checkpoint.step}")
        gram = sum(b.double().reshape(len(rows), -1) @ b.double().reshape(len(rows), -1).T
                   for b in (store.load(name) for name in store.block_names))
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64)
        model = PeftModel.from_pretrained(base, str(checkpoint.adapter), is_trainable=True).eval()
        reference = single_example_gradients(model, trained)
        want = reference @ reference.T
        scale = reference.norm(dim=1)[:, None] * reference.norm(dim=1)[None, :]
        assert bool((scale > 0).all())
        assert bool(((gram - want).abs() <= FLOAT32_TOL * scale).all()), (checkpoint.step, gram, want)

    code, _, err = run_cli([*common, "--store", str(tmp_path / "override"), "--truncation", "auto"], capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1, err
    assert "--truncation auto given here" in warnings[0] and TRAINING_FILE in warnings[0]
    assert "trained with --max-length 12 --loss-tokens all --truncation keep_start" in warnings[0]
    assert relative_hashes(tmp_path / "override") != applied
    assert hashes(tmp_path / "run", data) == before


def test_a_given_collator_that_cuts_the_other_end_is_refused(tok, model_dir, tmp_path):  # noqa: F811
    """A collate= of one's own that keeps the end while the SFTConfig keeps the start: one DataInfError naming
    both settings and the fix, before anything is written."""
    from datasets import Dataset
    from trl import SFTTrainer

    from datainf.data.collate import TextCollator

    rows = rows_of("text")
    before = hashes(tmp_path)
    trainer = SFTTrainer(model=lora_model(model_dir), args=sft_args(tmp_path, max_length=MAX_LENGTH),
                         train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[DatainfCallback(tmp_path / "run", checkpoints=1, train_data=rows,
                                                    collate=TextCollator(tok, task="causal_lm", max_length=MAX_LENGTH,
                                                                         truncation="keep_end"))])
    with pytest.raises(DataInfError, match=r"truncation_mode='keep_start'.*truncation='keep_end'.*"
                                           r"TextCollator\(\.\.\., truncation='keep_start'\)"):
        trainer.train()
    assert not (tmp_path / "run").exists()
    assert {k: v for k, v in hashes(tmp_path).items() if k in before} == before


@pytest.mark.parametrize("strategy", ["bfd", "wrapped"])
def test_packing_is_refused_at_the_start_of_training(tok, model_dir, tmp_path, strategy):  # noqa: F811
    """SFTTrainer with packing=True (rows of several examples concatenated): the callback refuses at
    on_train_begin with one DataInfError naming the setting to change; no run folder, no optimizer step."""
    from datasets import Dataset
    from trl import SFTTrainer

    rows = rows_of("text") * 2
    model = lora_model(model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    args = sft_args(tmp_path, max_length=MAX_LENGTH, packing=True, packing_strategy=strategy)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[DatainfCallback(tmp_path / "run", checkpoints=1, train_data=rows)])
    with pytest.raises(DataInfError) as error:
        trainer.train()
    message = str(error.value)
    assert "packing=True" in message and "set packing=False in the SFTConfig" in message and "\n" not in message
    assert not (tmp_path / "run").exists()
    assert all((p == before[n]).all() for n, p in model.named_parameters() if "lora_" in n)


def test_padding_free_is_refused_at_the_start_of_training(tok, model_dir, tmp_path):  # noqa: F811
    """SFTTrainer with padding_free=True without packing (each batch flattened into one row of its examples;
    TRL requires max_length=None with it): the callback refuses at on_train_begin with one DataInfError naming
    the setting to change; no run folder, no optimizer step."""
    from datasets import Dataset
    from trl import SFTTrainer

    rows = rows_of("text")
    model = lora_model(model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    args = sft_args(tmp_path, max_length=None, padding_free=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[DatainfCallback(tmp_path / "run", checkpoints=1, train_data=rows)])
    assert trainer.padding_free and not args.packing  # TRL accepted the setting on this CPU
    with pytest.raises(DataInfError) as error:
        trainer.train()
    message = str(error.value)
    assert "padding_free=True" in message and "set padding_free=False in the SFTConfig" in message
    assert "\n" not in message
    assert not (tmp_path / "run").exists()
    assert all((p == before[n]).all() for n, p in model.named_parameters() if "lora_" in n)
