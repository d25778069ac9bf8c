"""`datainf experiment lds` (datainf.experiments.lds)."""

from __future__ import annotations

from pathlib import Path

import click

from datainf.cli.options import FLAGS, method_option, option
from datainf.data.generation import TASKS
from datainf.data.text import DATASETS
from datainf.experiments.classification import load_dataset_records
from datainf.experiments.lds import LdsSettings, run
from datainf.outputs import check_apart


@click.command(name="lds")
@option("--out", "out_dir", default="runs/lds", type=click.Path(file_okay=False), help="Output folder.")
@option("--task", default="classification", show_default=True, type=click.Choice(["classification", *TASKS]), metavar=None,
        help="classification: a LoRA sequence classifier on --dataset; the others: a LoRA causal LM on "
                   "that generated task.")
@option("--dataset", show_default=True,
        help="Classification only: built-in offline set, a local file, or glue:TASK.")
@option("--model", default=None,
        help="Local HF model folder; default MiniLM (classification) or SmolLM2-135M-Instruct.")
@option("--n-train", default=200, show_default=True)
@click.option("--n-query", type=int, default=50, show_default=True)
@option("--noise", show_default=True, help="Classification only: flipped share.")
@option("--classes", show_default=True, help="Generation tasks only.")
@option("--rank", help="LoRA rank [default: 4 classifier, 8 causal LM].")
@option("--epochs", default=None, help="[default: 4 classifier, 2 causal LM]")
@option("--lr", default=None, help="[default: 3e-3 classifier, 1e-3 causal LM]")
@click.option("--subsets", type=int, default=50, show_default=True)
@click.option("--loo-examples", type=int, default=20, show_default=True, help="0: no leave-one-out.")
@click.option("--loo-seeds", type=int, default=3, show_default=True)
@method_option(None, "Comma-separated or repeated; default every registered method but kfac.")
@option("--checkpoints",
        help="Generation tasks: also score at step 0 (rows <method>+step0) and summed over step 0 and this many "
             "evenly spaced checkpoints of the full fine-tune, weighted as finetune --checkpoints records "
             "them (rows <method>+run).")
@click.option("--control/--no-control", default=False,
              help="Generation tasks: also score the resemblance control (row 'resemblance').")
@option("--variant", help=FLAGS["--variant"]["help"] + " Cached by name; the retrains are reused.")
@option("--device", help="Causal LM only: cpu or cuda [default: cuda when available].")
@option("--seed", show_default=True)
@click.pass_context
def lds_command(ctx, out_dir, task, dataset, model_dir, n_train, n_query, noise, classes, rank, epochs, lr, subsets,
                loo_examples, loo_seeds, methods, checkpoints, control, variants, device, seed):
    """Linear datamodeling score and leave-one-out correlation of each method (retrains; cached, resumable)."""
    check_apart(out_dir, {"model folder": model_dir, "data set": dataset if Path(dataset).exists() else None})
    chosen = {"methods": methods} if methods else {}
    settings = LdsSettings(task=task, dataset=dataset, model_dir=model_dir, n_train=n_train, n_query=n_query,
                           noise_fraction=noise, classes=classes, rank=rank, epochs=epochs, learning_rate=lr,
                           subsets=subsets, loo_examples=loo_examples, loo_seeds=loo_seeds, device=device,
                           seed=seed, checkpoints=checkpoints, control=control, variants=variants,
                           **chosen)
    records = None
    if task == "classification" and dataset not in DATASETS:
        records = load_dataset_records(dataset, n_train, n_query, seed)
    result = run(settings, out_dir, progress=not ctx.find_root().params.get("quiet"), records=records)
    width = max(10, *(len(m) for m in result.methods))

    def shown(x, w):
        return f"{x:{w}.3f}" if x is not None else f"{'-':>{w}}"

    click.echo(f"{'method':<{width}} {'LDS':>7} {'LOO pearson':>12} {'LOO spearman':>13}")
    for m, r in result.methods.items():
        click.echo(f"{m:<{width}} {r.lds:7.3f} {shown(r.loo_pearson, 12)} {shown(r.loo_spearman, 13)}")


commands = {"lds": lds_command}
