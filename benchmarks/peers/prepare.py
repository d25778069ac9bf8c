"""Fine-tune the demo's LoRA MiniLM once on the demo's noisy data; save the adapter and the data for the
other scripts. Same settings and seed as ``run_mislabeled`` (datainf.experiments.mislabeled).

    .venv/bin/python benchmarks/peers/prepare.py
"""

from __future__ import annotations

import json

import torch
from common import SETTINGS, WORK

from datainf.data.assets import minilm_dir
from datainf.data.noise import flip_labels
from datainf.data.text import load_text_dataset, sample_split
from datainf.models.finetune import (
    LoraSettings,
    TrainSettings,
    evaluate_classifier,
    finetune_classifier,
    load_classifier,
    save_adapter,
)


def main() -> None:
    s = SETTINGS
    torch.manual_seed(s.seed)
    train, val = sample_split(load_text_dataset(s.dataset), s.n_train, s.n_val, seed=s.seed)
    num_labels = max(int(r["label"]) for r in list(train) + list(val)) + 1
    noisy, flipped = flip_labels([int(r["label"]) for r in train], s.noise_fraction, num_labels, seed=s.seed)
    train = [{"text": r["text"], "label": int(y)} for r, y in zip(train, noisy)]
    val = [{"text": r["text"], "label": int(r["label"])} for r in val]
    model, tokenizer = load_classifier(str(minilm_dir()), num_labels, LoraSettings(
        rank=s.rank, alpha=s.alpha, target_modules=tuple(s.target_modules)), seed=s.seed)
    finetune_classifier(model, tokenizer, train, TrainSettings(
        epochs=s.epochs, learning_rate=s.learning_rate, batch_size=s.batch_size, max_length=s.max_length,
        seed=s.seed), progress=False)
    metrics = evaluate_classifier(model, tokenizer, val, max_length=s.max_length)
    WORK.mkdir(parents=True, exist_ok=True)
    save_adapter(model, WORK / "adapter")
    (WORK / "data.json").write_text(json.dumps({"train": train, "val": val, "flipped": [bool(f) for f in flipped],
                                                "num_labels": num_labels, "val_accuracy": metrics["accuracy"]}))
    print(f"saved {WORK}: validation accuracy {metrics['accuracy']:.3f}, {sum(flipped)} flipped labels")


if __name__ == "__main__":
    main()
