"""LoRA fine-tuning on a tiny random BERT (real MiniLM tokenizer), saving and loading adapters."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json
import shutil

import pytest
import torch
from transformers import BertConfig, BertModel

from datainf.data import minilm_dir
from datainf.errors import DataInfError
from datainf.models.finetune import (
    LoraSettings,
    TrainSettings,
    encode,
    evaluate_classifier,
    finetune_classifier,
    load_adapter,
    load_classifier,
    save_adapter,
)
from reference import FLOAT32_TOL, assert_close_to

# peft calls a transformers method that transformers 5 deprecates; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def _tiny_bert(folder, hidden=32):
    torch.manual_seed(0)
    config = BertConfig(
        initializer_range=0.2,  # larger than BERT's 0.02, so random sentence features differ enough to learn from
        vocab_size=30522,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(str(folder))
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_dir() / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return _tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def _toy_records():
    good = ["good", "great", "wonderful", "excellent", "lovely", "superb"]
    bad = ["bad", "awful", "terrible", "horrible", "dreadful", "poor"]
    records = []
    for i in range(24):
        records.append({"text": f"a {good[i % 6]} movie", "label": 1})
        records.append({"text": f"a {bad[i % 6]} movie", "label": 0})
    return records


def test_only_lora_and_head_are_trainable(tiny_dir):
    model, _ = load_classifier(tiny_dir, num_labels=2, lora=LoraSettings(rank=4), seed=0)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert all("lora_" in n or "modules_to_save" in n for n in trainable)
    hidden, layers, rank = 32, 2, 4
    lora_count = layers * (rank * hidden + hidden * rank)  # A: (r, h) and B: (h, r) on each value projection
    head_count = hidden * 2 + 2
    assert sum(trainable.values()) == lora_count + head_count
    assert model.peft_config["default"].lora_alpha == rank  # alpha=None -> alpha = rank


def test_encode_pads_to_longest_in_batch(tiny_dir):
    _, tokenizer = load_classifier(tiny_dir, num_labels=2, lora=LoraSettings(), seed=0)
    batch = encode(
        tokenizer, [{"text": "short", "label": 0}, {"text": "a much longer sentence here", "label": 1}], 128
    )
    lengths = batch["attention_mask"].sum(dim=1)
    assert batch["input_ids"].shape[1] == int(lengths.max()) < 128
    assert batch["labels"].tolist() == [0, 1]
    assert encode(tokenizer, [{"text": "x " * 300}], max_length=16)["input_ids"].shape == (1, 16)


def test_finetuning_lowers_the_training_loss(tiny_dir):
    records = _toy_records()
    model, tokenizer = load_classifier(tiny_dir, num_labels=2, lora=LoraSettings(rank=4, dropout=0.0), seed=0)
    before = evaluate_classifier(model, tokenizer, records)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    settings = TrainSettings(epochs=6, learning_rate=1e-2, batch_size=8, seed=0)
    out = finetune_classifier(model, tokenizer, records, settings, progress=False)
    after = evaluate_classifier(model, tokenizer, records)
    assert out["steps"] == len(out["losses"]) == 6 * 6
    assert after["loss"] < 0.8 * before["loss"]
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), f"frozen parameter {name} changed"


def test_training_is_deterministic(tiny_dir):
    records = _toy_records()[:16]
    losses = []
    for _ in range(2):
        model, tokenizer = load_classifier(tiny_dir, num_labels=2, lora=LoraSettings(), seed=1)
        out = finetune_classifier(
            model, tokenizer, records, TrainSettings(epochs=1, batch_size=4), progress=False
        )
        losses.append(out["losses"])
    assert losses[0] == losses[1]


def test_adapter_round_trip_and_mismatch(tiny_dir, tmp_path):
    records = _toy_records()
    model, tokenizer = load_classifier(tiny_dir, num_labels=2, lora=LoraSettings(), seed=0)
    finetune_classifier(
        model, tokenizer, records, TrainSettings(epochs=1, learning_rate=1e-2, batch_size=8), progress=False
    )
    adapter = save_adapter(model, tmp_path / "adapter")
    batch = encode(tokenizer, records[:6], 32)
    batch.pop("labels")
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    loaded, _ = load_adapter(tiny_dir, adapter, num_labels=2)
    with torch.no_grad():
        got = loaded(**batch).logits
    # the reloaded adapter holds the same float32 weights (safetensors is exact), so the logits differ by
    # kernel rounding at most (tests/reference.py, FLOAT32_TOL); a head or LoRA matrix not restored is O(1)
    assert_close_to(got, expected, tol=FLOAT32_TOL, what="logits after reload")
    fresh, _ = load_classifier(tiny_dir, num_labels=2, lora=LoraSettings(), seed=0)
    with torch.no_grad():
        assert not torch.allclose(fresh.eval()(**batch).logits, expected)  # training changed the logits

    with pytest.raises(DataInfError, match="does not fit"):
        load_adapter(tiny_dir, adapter, num_labels=3)  # head of another shape
    wider = _tiny_bert(tmp_path / "wider", hidden=48)
    with pytest.raises(DataInfError, match="does not fit"):
        load_adapter(wider, adapter, num_labels=2)  # LoRA matrices of another shape
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["target_modules"] = ["no_such_module"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(DataInfError, match="does not fit"):
        load_adapter(tiny_dir, adapter, num_labels=2)
    with pytest.raises(DataInfError, match="adapter_config.json"):
        load_adapter(tiny_dir, tmp_path / "nothing", num_labels=2)


def test_bad_settings_and_inputs(tiny_dir, tmp_path):
    with pytest.raises(DataInfError, match="rank"):
        LoraSettings(rank=0)
    with pytest.raises(DataInfError, match="dropout"):
        LoraSettings(dropout=1.0)
    with pytest.raises(DataInfError, match="learning_rate"):
        TrainSettings(learning_rate=0.0)
    with pytest.raises(DataInfError, match="batch_size"):
        TrainSettings(batch_size=0)
    with pytest.raises(DataInfError, match="warmup_ratio"):
        TrainSettings(warmup_ratio=1.5)
    with pytest.raises(DataInfError, match="no_such_module"):
        load_classifier(tiny_dir, 2, LoraSettings(target_modules=("no_such_module",)))
    with pytest.raises(DataInfError, match="config.json"):
        load_classifier(tmp_path, 2, LoraSettings())
    model, tokenizer = load_classifier(tiny_dir, 2, LoraSettings())
    with pytest.raises(DataInfError, match="record 1 has label 5"):
        finetune_classifier(
            model, tokenizer, [{"text": "a", "label": 0}, {"text": "b", "label": 5}], progress=False
        )


def test_cli_checkpoints_hold_the_weights_of_their_step(tiny_dir, tmp_path):
    """`datainf finetune --checkpoints 3` (classifier): OUT/checkpoint-STEP holds the adapter as it was after
    that optimizer step (checkpoint-0: before the first), checked against the same fine-tune run again here
    with its weights copied at each step; the final adapter is OUT itself."""
    from datainf.cli import main

    records = _toy_records()[:24]  # 24 examples, batch 8, 2 epochs: 6 steps; checkpoints at 2, 4 and 6
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "adapter"
    with pytest.raises(SystemExit) as e:
        main(["--quiet", "finetune", "--model", str(tiny_dir), "--train", str(data), "--out", str(out), "--epochs", "2",
              "--batch-size", "8", "--lr", "1e-2", "--checkpoints", "3", "--device", "cpu"])
    assert e.value.code == 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-0", "checkpoint-2", "checkpoint-4"]  # checkpoint-0: the weights before the first step
    model, tokenizer = load_classifier(tiny_dir, num_labels=2, lora=LoraSettings(rank=4, target_modules=("value",)),
                                       seed=0)
    seen = {0: {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}}
    finetune_classifier(model, tokenizer, records, TrainSettings(epochs=2, batch_size=8, learning_rate=1e-2, seed=0),
                        progress=False, on_step=lambda step, lr: seen.update(
                            {step: {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}}))
    for folder, step in ((out / "checkpoint-0", 0), (out / "checkpoint-2", 2), (out / "checkpoint-4", 4), (out, 6)):
        assert json.loads((folder / "datainf_checkpoint.json").read_text())["step"] == step
        loaded, _ = load_adapter(tiny_dir, folder, num_labels=2)
        weights = dict(loaded.named_parameters())
        for name, value in seen[step].items():
            assert torch.equal(weights[name].detach(), value), (step, name)
