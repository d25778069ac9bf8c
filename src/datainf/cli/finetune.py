"""`datainf finetune`: LoRA fine-tuning of a local model; writes a PEFT adapter folder."""

from __future__ import annotations

import json
from pathlib import Path

import click

from datainf.cli.common import check_output, device_option, setup
from datainf.errors import DataInfError

#: the file that marks an adapter folder as written by `datainf finetune`
MARKER = "datainf_finetune.json"


def check_adapter_out(out_dir: str, model_dir: str, overwrite: bool) -> bool:
    """Whether ``out_dir`` is to be replaced: it must be new, empty, or an adapter this command wrote (or
    ``--overwrite``); never the base model's folder or inside it."""
    check_output(out_dir, inputs={"model folder": model_dir})
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataInfError(f"--out {out_dir} is a file; give a folder for the adapter")
    if not out.exists() or not any(out.iterdir()):
        return out.exists()
    if (out / MARKER).is_file() or overwrite:
        return True
    raise DataInfError(f"--out {out_dir} exists and is not an adapter written by `datainf finetune`; choose a new "
                       "folder, or pass --overwrite to replace it")


@click.command("finetune")
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Local Hugging Face model folder (config.json, weights, tokenizer).")
@click.option("--train", "train_path", required=True, type=click.Path(),
              help="Training data: JSONL, CSV or a `datasets` save_to_disk folder.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for the LoRA adapter (save_pretrained); new, empty, or an adapter written by this command.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder that this command did not write.")
@click.option("--text-column", default="text")
@click.option("--label-column", default="label")
@click.option("--rank", type=int, default=4)
@click.option("--alpha", type=float, default=None, help="LoRA alpha; default = rank.")
@click.option("--target-modules", default="value", help="Comma-separated module names to adapt.")
@click.option("--epochs", type=int, default=3)
@click.option("--lr", type=float, default=1e-3)
@click.option("--batch-size", type=int, default=32)
@click.option("--max-length", type=int, default=128)
@click.option("--seed", type=int, default=0)
@device_option
@click.pass_context
def command(ctx: click.Context, model_dir: str, train_path: str, out_dir: str, overwrite: bool, text_column: str,
            label_column: str, rank: int, alpha: float | None, target_modules: str, epochs: int, lr: float,
            batch_size: int, max_length: int, seed: int, device: str | None) -> None:
    """LoRA fine-tuning of a local sequence classifier; writes the adapter with save_pretrained."""
    from datainf import atomic
    from datainf.data.text import load_records
    from datainf.models.finetune import (
        LoraSettings,
        TrainSettings,
        evaluate_classifier,
        finetune_classifier,
        load_classifier,
        save_adapter,
    )

    replace = check_adapter_out(out_dir, model_dir, overwrite)
    progress, device = setup(ctx, device)
    records = load_records(train_path, text_column=text_column, label_column=label_column)
    num_labels = max(r["label"] for r in records) + 1
    lora = LoraSettings(rank=rank, alpha=alpha,
                        target_modules=tuple(t.strip() for t in target_modules.split(",") if t.strip()))
    model, tokenizer = load_classifier(model_dir, max(num_labels, 2), lora, seed=seed)
    model.to(device)
    stats = finetune_classifier(model, tokenizer, records, TrainSettings(
        epochs=epochs, learning_rate=lr, batch_size=batch_size, max_length=max_length, seed=seed),
        progress=progress)
    acc = evaluate_classifier(model, tokenizer, records, max_length=max_length)["accuracy"]
    with atomic.new_directory(out_dir, replace=replace) as tmp:
        save_adapter(model, tmp)
        (tmp / MARKER).write_text(json.dumps({
            "num_labels": max(num_labels, 2), "train": str(train_path), "train_accuracy": acc,
            "seconds": stats.get("seconds")}, indent=2))
    click.echo(f"adapter written to {out_dir} (training accuracy {acc:.3f})")
