"""`datainf experiment mislabeled | approximation | selection | scaling` (datainf.experiments.classification)."""

from __future__ import annotations

from pathlib import Path

import click

from datainf.cli.options import method_option, option
from datainf.errors import DataInfError
from datainf.estimators import method_names
from datainf.experiments.classification import (
    GRID_SUMMARIES,
    run_grid,
    run_scaling,
    run_selection_grid,
    write_grid_summary,
    write_selection_summary,
)
from datainf.experiments.mislabeled import MislabeledSettings
from datainf.models.finetune import POOLINGS
from datainf.outputs import check_apart


def ints(value: str) -> list[int]:
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise DataInfError(f"expected comma-separated integers, got '{value}'") from None


def target_sets_of(value: str) -> list[tuple[str, ...]]:
    """"value;query,value" -> [("value",), ("query", "value")]."""
    return [tuple(t.strip() for t in ts.split(",") if t.strip()) for ts in value.split(";") if ts.strip()]


def grid_options(f):
    options = [
        option("--out", "out_dir", default="runs/classification", type=click.Path(file_okay=False), help="Output folder."),
        click.option("--datasets", default="rotten_tomatoes,sms_spam,trec_coarse",
                     help="Comma-separated: built-in offline sets, local files/folders, or glue:TASK."),
        option("--model", default=None, help="Local HF encoder folder; default the offline all-MiniLM-L6-v2."),
        click.option("--ranks", default="1,2,4,8", help="LoRA ranks."),
        click.option("--seeds", default="0,1,2,3,4", help="Seeds (data sample, noise, training)."),
        click.option("--targets", default="value;query,value",
                     help="';'-separated LoRA target sets, each comma-separated module names."),
        option("--n-train"),
        option("--n-val"),
        option("--epochs", default=4),
        option("--lr", default=3e-3),
        method_option(method_names()),
        option("--lissa-iterations", default=100, help="LiSSA's recursion steps."),
        click.option("--clean-baseline/--no-clean-baseline", default=True,
                     help="Also fine-tune each run on the clean labels, to record what the set-up learns."),
        option("--pooling", type=click.Choice(POOLINGS), default="mean",
               help="What the head reads: the mean token state (how MiniLM was trained) or BERT's pooler."),
        option("--head-lr", default=1e-2, show_default=True,
               help="Learning rate of the classifier head (the LoRA matrices use --lr)."),
        click.option("--length-buckets/--no-length-buckets", default=True, show_default=True,
                     help="Batches of similar token length (less padding)."),
    ]
    for decorate in reversed(options):
        f = decorate(f)
    return f


def grid_of(params: dict) -> tuple[MislabeledSettings, dict]:
    """(base settings, the grid's keyword arguments for run_grid / run_selection_grid) from grid_options'
    parameters; an empty --datasets, --ranks, --seeds or --targets is one error line."""
    check_apart(params["out_dir"], {"model folder": params["model_dir"],
                                    "data set": [d for d in params["datasets"].split(",") if d and Path(d).exists()]})
    grid = {"datasets": [d for d in params["datasets"].split(",") if d], "ranks": ints(params["ranks"]),
            "seeds": ints(params["seeds"]), "target_sets": target_sets_of(params["targets"])}
    for flag, values in zip(("--datasets", "--ranks", "--seeds", "--targets"), grid.values()):
        if not values:
            raise DataInfError(f"{flag} is empty: give at least one value")
    base = MislabeledSettings(
        model_dir=params["model_dir"], n_train=params["n_train"], n_val=params["n_val"], epochs=params["epochs"],
        learning_rate=params["lr"], methods=params["methods"],
        lissa_iterations=params["lissa_iterations"], clean_baseline=params["clean_baseline"],
        pooling=params["pooling"], head_learning_rate=params["head_lr"], length_buckets=params["length_buckets"])
    return base, {**grid, "out_dir": params["out_dir"]}


def grid_command(name: str) -> click.Command:
    """`approximation` or `mislabeled`: the grid of runs (cached, shared by both), then its summary."""

    @click.command(name=name)
    @grid_options
    @click.pass_context
    def command(ctx, **params):
        base, grid = grid_of(params)
        runs = run_grid(base, **grid, progress=not ctx.find_root().params.get("quiet"))
        click.echo(write_grid_summary(runs, name, params["out_dir"]))

    command.__doc__ = GRID_SUMMARIES[name][0]
    return command


@click.command(name="selection")
@grid_options
@click.option("--keep", type=float, default=0.7, show_default=True, help="Share of training data kept.")
@click.pass_context
def selection_command(ctx, keep, **params):
    """Data selection (appendix F) over the grid: retrain on the least harmful share per method and run."""
    base, grid = grid_of(params)
    results = run_selection_grid(base, **grid, keep=keep, progress=not ctx.find_root().params.get("quiet"))
    click.echo(write_selection_summary(results, params["out_dir"]))


@click.command(name="scaling")
@option("--out", "out_dir", default="runs/scaling", type=click.Path(file_okay=False), help="Output folder.")
@click.option("--n-values", default="250,500,1000,2000,4000")
@click.option("--d-values", default="256,1024,4096")
@click.option("--blocks", type=int, default=4)
@method_option(None, "Comma-separated or repeated; default every method that needs no curvature.")
def scaling_command(out_dir, n_values, d_values, blocks, methods):
    """Time of each method as n_train and the block size grow, with fitted log-log exponents."""
    result = run_scaling(out_dir, n_values=tuple(ints(n_values)), d_values=tuple(ints(d_values)), blocks=blocks,
                         methods=methods or None)
    for k, v in result.exponents.items():
        click.echo(f"{k:<16} exponent {v:.2f}")


commands = {
    "approximation": grid_command("approximation"),
    "mislabeled": grid_command("mislabeled"),
    "selection": selection_command,
    "scaling": scaling_command,
}
