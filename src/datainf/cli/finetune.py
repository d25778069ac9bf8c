"""`datainf finetune`: LoRA fine-tuning of a local classifier or causal LM; writes a PEFT adapter folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from datainf.cli.common import (
    FINETUNE_MARKER,
    data_options,
    make_collator,
    read_data,
    setup,
)
from datainf.cli.options import device_option, option
from datainf.outputs import check_output

#: the file that marks an adapter folder as written by `datainf finetune`
MARKER = FINETUNE_MARKER
#: how a checkpoint's learning_rate (its weight in a checkpoint sum) is chosen; see interval_rates
RATE_RULE = ("mean learning rate of the optimizer steps from this checkpoint to the next one (the final adapter: "
             "its own step's rate)")


@click.command("finetune")
@option("--model", required=True, help="Local Hugging Face model folder (config.json, weights, tokenizer).")
@click.option("--train", "train_path", required=True, type=click.Path(),
              help="Training data: JSONL, JSON, CSV/TSV, parquet or a `datasets` save_to_disk folder.")
@option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
        help="Folder for the LoRA adapter (save_pretrained); new, empty, or an adapter written by this command "
                   "(replaced whole: a folder holding any other file is refused, naming it).")
@option("--overwrite",
        help="Replace an existing --out adapter that this command did not write (peft's, the Trainer's); a "
                   "folder holding files an adapter does not have is refused all the same.")
@option("--task", type=click.Choice(["classification", "causal_lm"]), default="classification", metavar=None,
        help="classification: a sequence classifier (new head); causal_lm: a causal LM on chat, "
                   "prompt/response or text records.")
@data_options
@option("--num-labels",
        help="Classification: classes of the new head; default the number of label names, or of ids 0..K-1 "
                   "(ids with gaps, such as 0, 1, 7, are refused unless this asks for that head).")
@option("--rank", help="LoRA rank; default 4 (classification) or 8 (causal_lm).")
@option("--alpha", help="LoRA alpha; default = rank (classification) or 32.")
@option("--target-modules", help="Comma-separated module names to adapt; default value (classification) or "
                                  "q_proj,v_proj.")
@option("--epochs")
@option("--lr")
@option("--batch-size", default=None, help="Default 32 (classification) or 8 (causal_lm).")
@option("--max-length")
@option("--seed")
@option("--pooling", type=click.Choice(["pooler", "mean"]),
        help="Classification: what the head reads, the model's own pooler (as transformers' "
                   "ForSequenceClassification) or the mean token state (sentence-transformers encoders such as "
                   "MiniLM; BERT-family models). Recorded in the adapter; grads and explain read it back.")
@option("--head-lr", help="Classification: learning rate of the new head (default --lr).")
@option("--checkpoints",
        help="Also save the adapter at this many evenly spaced steps and before the first step (OUT/"
                   "checkpoint-STEP, checkpoint-0 included; the last is OUT itself), each with its weight in a sum "
                   "over the run: the mean learning rate of the steps from it to the next checkpoint. Then `grads "
                   "--run OUT`, `score --run-stores`, `explain --run OUT` use them all.")
@device_option
@click.pass_context
def command(ctx: click.Context, model_dir: str, train_path: str, out_dir: str, overwrite: bool, task: str,
            num_labels: int | None, rank: int | None, alpha: float | None, target_modules: str | None, epochs: int, lr: float,
            batch_size: int | None, max_length: int, seed: int, pooling: str, head_lr: float | None,
            checkpoints: int, device: str | None, **data: Any) -> None:
    """LoRA fine-tuning of a local model; writes the adapter (and, for a causal LM, its tokenizer)."""
    from safetensors.torch import save_file

    from datainf import atomic
    from datainf.models.checkpoints import CHECKPOINT_FILE, Snapshots, snapshot_steps
    from datainf.models.finetune import LoraSettings, SecondMoments, optimizer_steps, save_adapter
    from datainf.remedies import SECOND_MOMENTS_FILE

    replace = check_output(out_dir, inputs={"model folder": model_dir, "training data": train_path}, kind="adapter",
                           overwrite=overwrite)
    progress, device = setup(ctx, device)
    records = read_data(train_path, task, **data)
    lm = task == "causal_lm"
    targets = tuple(t.strip() for t in (target_modules or ("q_proj,v_proj" if lm else "value")).split(",")
                    if t.strip())
    rank = rank or (8 if lm else 4)
    lora = LoraSettings(rank=rank, alpha=alpha if alpha is not None else (32.0 if lm else None),
                        target_modules=targets, modules_to_save=() if lm else ("classifier",))
    batch_size = batch_size or (8 if lm else 32)
    total_steps = optimizer_steps(len(records), batch_size, epochs)
    if lm:
        from datainf.models.llm import finetune_causal_lm, load_causal_lm, response_loss

        model, tokenizer = load_causal_lm(model_dir, lora, device=device, seed=seed)
        collate = make_collator(tokenizer, "causal_lm", max_length, **data)
        snapshots = Snapshots(model, snapshot_steps(checkpoints, total_steps), initial=True)
        moments = SecondMoments(model, [*snapshot_steps(checkpoints, total_steps), total_steps], snapshots.on_step)
        stats = finetune_causal_lm(model, tokenizer, records, epochs=epochs, lr=lr, batch_size=batch_size,
                                   max_length=max_length, seed=seed, progress=progress, collate=collate,
                                   on_step=moments)
        summary = {"train_loss_per_token": response_loss(model, tokenizer, records, collate=collate),
                   "collate": collate.settings()}
        shown = f"the final adapter's loss on the training set: {summary['train_loss_per_token']:.3f} per token"
    else:
        from datainf.data.labels import describe, head_size
        from datainf.models.finetune import (
            TrainSettings,
            evaluate_classifier,
            finetune_classifier,
            load_classifier,
        )

        names = getattr(records, "label_names", None)
        num_labels = head_size([r["label"] for r in records], names, train_path, num_labels)
        model, tokenizer = load_classifier(model_dir, num_labels, lora, seed=seed, pooling=pooling)
        model.to(device)
        snapshots = Snapshots(model, snapshot_steps(checkpoints, total_steps), initial=True)
        moments = SecondMoments(model, [*snapshot_steps(checkpoints, total_steps), total_steps], snapshots.on_step)
        stats = finetune_classifier(model, tokenizer, records, TrainSettings(
            epochs=epochs, learning_rate=lr, batch_size=batch_size, max_length=max_length, seed=seed,
            head_learning_rate=head_lr), progress=progress, on_step=moments)
        acc = evaluate_classifier(model, tokenizer, records, max_length=max_length)["accuracy"]
        summary = {"num_labels": num_labels, "label_names": names, "train_accuracy": acc}
        shown = f"training accuracy {acc:.3f}; {num_labels} classes: {describe(names)}"
    # the loss log: each optimizer step's batch loss (mean per loss token for a causal LM), in step order
    summary["losses"] = [float(x) for x in stats.get("losses", [])]
    if summary["losses"]:
        shown += (f"; batch loss {summary['losses'][0]:.3f} at step 1, {summary['losses'][-1]:.3f} at step "
                  f"{len(summary['losses'])} (every step's in {Path(out_dir) / MARKER})")
    marker = json.dumps({"task": task, "train": str(train_path), "seconds": stats.get("seconds"), "seed": seed,
                         **summary}, indent=2)  # seed: drew the LoRA A matrices (grads --initial rebuilds step 0)
    final = snapshots.current()
    saved = snapshots.checkpoints()  # step 0, the K evenly spaced steps (the last is the final adapter)
    with atomic.new_directory(out_dir, replace=replace) as tmp:
        for step, weight, state in saved:
            folder = tmp if step == total_steps else tmp / f"checkpoint-{step}"
            if step != total_steps:
                snapshots.load(state)
                save_adapter(model, folder)
                if lm:
                    tokenizer.save_pretrained(str(folder))
                (folder / MARKER).write_text(marker)
            if step in moments.taken:  # Adam's second moments there (none at step 0): --adam-moments FOLDER
                save_file(moments.taken[step], str(folder / SECOND_MOMENTS_FILE))
            (folder / CHECKPOINT_FILE).write_text(json.dumps({
                "step": step, "learning_rate": weight, "steps": total_steps,
                "learning_rate_rule": RATE_RULE}) + "\n")
        snapshots.load(final)
        save_adapter(model, tmp)
        if total_steps in moments.taken:
            save_file(moments.taken[total_steps], str(tmp / SECOND_MOMENTS_FILE))
        if lm:
            tokenizer.save_pretrained(str(tmp))
        (tmp / MARKER).write_text(marker)
    shown_steps = ", ".join(str(step) for step, _, _ in saved if step != total_steps)
    listed = (f"; a run of {len(saved)} checkpoints: steps {shown_steps} in {out_dir}/checkpoint-STEP and step "
              f"{total_steps}, the final adapter, in {out_dir}" if saved else "")
    click.echo(f"adapter written to {out_dir} ({shown}){listed}")
