"""`datainf experiment mislabeled | approximation | selection | scaling` (datainf.experiments.classification)."""

from __future__ import annotations

from dataclasses import replace

import click

from datainf.data.text import DATASETS
from datainf.errors import DataInfError
from datainf.estimators import method_names
from datainf.experiments.classification import (
    GRID_SUMMARIES,
    load_dataset_records,
    run_grid,
    run_scaling,
    run_selection,
    write_grid_summary,
)
from datainf.experiments.mislabeled import MislabeledSettings


def ints(value: str) -> list[int]:
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise DataInfError(f"expected comma-separated integers, got '{value}'") from None


def grid_options(f):
    options = [
        click.option("--out", "out_dir", default="runs/classification", type=click.Path(file_okay=False)),
        click.option("--datasets", default="rotten_tomatoes,sms_spam,trec_coarse",
                     help="Comma-separated: built-in offline sets, local files/folders, or glue:TASK."),
        click.option("--model", "model_dir", default=None, type=click.Path(exists=True, file_okay=False),
                     help="Local HF encoder folder; default the offline all-MiniLM-L6-v2."),
        click.option("--ranks", default="1,2,4,8", help="LoRA ranks."),
        click.option("--seeds", default="0,1,2,3,4", help="Seeds (data sample, noise, training)."),
        click.option("--targets", default="value;query,value",
                     help="';'-separated LoRA target sets, each comma-separated module names."),
        click.option("--n-train", type=int, default=1000),
        click.option("--n-val", type=int, default=200),
        click.option("--epochs", type=int, default=4),
        click.option("--lr", type=float, default=3e-3),
        click.option("--methods", default=",".join(method_names())),
        click.option("--lissa-iterations", type=int, default=100),
        click.option("--clean-baseline/--no-clean-baseline", default=True,
                     help="Also fine-tune each run on the clean labels, to record what the set-up learns."),
        *head_options(),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def head_options() -> list:
    """The classifier recipe's options shared by the grid and the selection experiment."""
    return [
        click.option("--pooling", type=click.Choice(["mean", "pooler"]), default="mean", show_default=True,
                     help="What the head reads: the mean token state (how MiniLM was trained) or BERT's pooler."),
        click.option("--head-lr", type=float, default=1e-2, show_default=True,
                     help="Learning rate of the classifier head (the LoRA matrices use --lr)."),
        click.option("--length-buckets/--no-length-buckets", default=True, show_default=True,
                     help="Batches of similar token length (less padding)."),
    ]


def base_settings(model_dir, n_train, n_val, epochs, lr, methods, lissa_iterations,
                  clean_baseline: bool = False, pooling: str = "pooler", head_lr: float | None = None,
                  length_buckets: bool = False) -> MislabeledSettings:
    return MislabeledSettings(model_dir=model_dir, n_train=n_train, n_val=n_val, epochs=epochs, learning_rate=lr,
                              methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
                              lissa_iterations=lissa_iterations, clean_baseline=clean_baseline, pooling=pooling,
                              head_learning_rate=head_lr, length_buckets=length_buckets)


def grid_command(name: str) -> click.Command:
    """`approximation` or `mislabeled`: the grid of runs (cached, shared by both), then its summary."""

    @click.command(name=name)
    @grid_options
    @click.pass_context
    def command(ctx, out_dir, datasets, model_dir, ranks, seeds, targets, n_train, n_val, epochs, lr, methods,
                lissa_iterations, clean_baseline, pooling, head_lr, length_buckets):
        progress = not ctx.find_root().params.get("quiet")
        base = base_settings(model_dir, n_train, n_val, epochs, lr, methods, lissa_iterations, clean_baseline,
                             pooling, head_lr, length_buckets)
        target_sets = [tuple(t.strip() for t in ts.split(",") if t.strip()) for ts in targets.split(";") if ts]
        runs = run_grid(base, [d for d in datasets.split(",") if d], ints(ranks), ints(seeds), out_dir,
                        target_sets=target_sets, progress=progress)
        click.echo(write_grid_summary(runs, name, out_dir))

    command.__doc__ = GRID_SUMMARIES[name][0]
    return command


def _with_head_options(f):
    for option in reversed(head_options()):
        f = option(f)
    return f


@click.command(name="selection")
@click.option("--out", "out_dir", default="runs/selection", type=click.Path(file_okay=False))
@click.option("--dataset", default="rotten_tomatoes")
@click.option("--model", "model_dir", default=None, type=click.Path(exists=True, file_okay=False))
@click.option("--rank", type=int, default=4)
@click.option("--keep", type=float, default=0.7, help="Share of training data kept.")
@click.option("--n-train", type=int, default=1000)
@click.option("--n-val", type=int, default=200)
@click.option("--epochs", type=int, default=4)
@click.option("--lr", type=float, default=3e-3)
@click.option("--methods", default="datainf,identity,lissa,exact")
@click.option("--seed", type=int, default=0)
@_with_head_options
@click.pass_context
def selection_command(ctx, out_dir, dataset, model_dir, rank, keep, n_train, n_val, epochs, lr, methods, seed,
                      pooling, head_lr, length_buckets):
    """Data selection (appendix F): retrain on the least harmful share of the data per method."""
    if not 0 < keep <= 1:
        raise DataInfError(f"--keep must be in (0, 1], got {keep}")
    base = replace(base_settings(model_dir, n_train, n_val, epochs, lr, methods, 100, pooling=pooling,
                                 head_lr=head_lr, length_buckets=length_buckets),
                   dataset=dataset, rank=rank, seed=seed)
    records = None if dataset in DATASETS else load_dataset_records(dataset, n_train, n_val, seed)
    result = run_selection(base, out_dir, keep=keep, methods=base.methods,
                           progress=not ctx.find_root().params.get("quiet"), records=records)
    for name, r in result.selections.items():
        click.echo(f"{name:<10} n={r.n:5d} flipped kept={r.flipped_kept:4d} "
                   f"validation accuracy={r.validation_accuracy:.3f}")


@click.command(name="scaling")
@click.option("--out", "out_dir", default="runs/scaling", type=click.Path(file_okay=False))
@click.option("--n-values", default="250,500,1000,2000,4000")
@click.option("--d-values", default="256,1024,4096")
@click.option("--blocks", type=int, default=4)
@click.option("--methods", default=None, help="Comma-separated; default every method that needs no curvature.")
def scaling_command(out_dir, n_values, d_values, blocks, methods):
    """Time of each method as n_train and the block size grow, with fitted log-log exponents."""
    result = run_scaling(out_dir, n_values=tuple(ints(n_values)), d_values=tuple(ints(d_values)), blocks=blocks,
                         methods=tuple(m for m in methods.split(",") if m) if methods else None)
    for k, v in result.exponents.items():
        click.echo(f"{k:<16} exponent {v:.2f}")


commands = {
    "approximation": grid_command("approximation"),
    "mislabeled": grid_command("mislabeled"),
    "selection": selection_command,
    "scaling": scaling_command,
}
