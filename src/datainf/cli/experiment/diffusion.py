"""`datainf experiment diffusion-style | diffusion-subject` (datainf.experiments.diffusion)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import diffusers  # noqa: F401 - the experiments' optional dependency: without it the command says so in one line

from datainf.cli.common import setup
from datainf.cli.options import declared, method_option, option
from datainf.errors import DataInfError
from datainf.experiments.diffusion import DiffusionSettings, format_table, run
from datainf.outputs import check_run_folder
from datainf.tasks import PAPER_TIMESTEPS


def parse_ints(value: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise DataInfError(f"--{name} must be comma-separated integers, got {value!r}") from None


def common_options(f):
    options = [
        option("--out", "out", required=True, type=click.Path(file_okay=False), help="Output folder."),
        click.option("--steps", default=160, show_default=True, help="LoRA fine-tuning steps."),
        option("--batch-size", show_default=True, help="Fine-tuning batch size."),
        option("--lr", "learning_rate", default=5e-3, show_default=True),
        option("--rank", default=4, show_default=True, help="LoRA rank (alpha = rank)."),
        click.option("--timesteps", default=",".join(map(str, PAPER_TIMESTEPS)), show_default=True,
                     help="Fixed timesteps of the attribution loss."),
        method_option(declared("DIFFUSION_METHODS"), "Comma-separated or repeated: datainf, identity, exact, lissa."),
        option("--damping"),
        option("--checkpoints",
               help="Also score at step 0 (the initial LoRA, B = 0; rows <method>+step0) and at this many evenly "
                    "spaced steps (the last the final model), and sum each method's scores over them, each weighted "
                    "by the mean learning rate of the steps from it to the next (rows <method>+run)."),
        click.option("--control/--no-control", default=False,
                     help="Also score the resemblance control (row 'resemblance'): minus the cosine of the images' "
                          "pixels, training image vs query."),
        click.option("--grad-batch-size", default=16, show_default=True, help="Examples per gradient pass."),
        option("--seed", show_default=True),
        click.option("--base", default=None, type=click.Path(file_okay=False),
                     help="Pre-trained base UNet folder; default the cached one (built if missing)."),
        click.option("--rebuild-base", is_flag=True, help="Pre-train the base again (a few minutes)."),
        option("--device"),
    ]
    for decorate in reversed(options):
        f = decorate(f)
    return f


def run_command(ctx: click.Context, experiment: str, out: str, methods: tuple[str, ...], timesteps: str, device: str | None,
                rebuild_base: bool, **kw: Any) -> None:
    check_run_folder(out, {"base UNet folder": kw.get("base")})
    progress, device = setup(ctx, device)
    settings = DiffusionSettings(experiment=experiment, methods=methods,
                                 timesteps=parse_ints(timesteps, "timesteps"), **kw)
    result = run(settings, out, device=device, progress=progress, rebuild_base=rebuild_base)
    click.echo(format_table(result))
    click.echo(f"wrote {Path(out) / 'results.json'} and {Path(out) / 'report.html'} "
               f"({result.wall_seconds:.0f} s)")


def experiment_command(name: str, experiment: str, doc: str, *options: Any) -> click.Command:
    """The click command ``name`` of one diffusion experiment: the common options, then its own."""

    def command(ctx: click.Context, **kw: Any) -> None:
        run_command(ctx, experiment, **kw)

    command.__doc__ = doc
    f = click.pass_context(command)
    for decorate in reversed(options):
        f = decorate(f)
    return click.command(name)(common_options(f))


style_command = experiment_command(
    "diffusion-style", "style",
    "Which training images of a LoRA-tuned diffusion model share a query image's style? (paper table 2)",
    click.option("--n-train-per-style", default=30, show_default=True, help="Training images per style."),
    click.option("--n-test-per-style", default=5, show_default=True, help="Held-out query images per style."))
subject_command = experiment_command(
    "diffusion-subject", "subject",
    "Which training images of a DreamBooth-style LoRA show a query's subject? (paper table 2)",
    click.option("--n-subjects", default=30, show_default=True, help="Subjects (each one MNIST image + augmentations)."),
    click.option("--views", default=3, show_default=True, help="Training images per subject."))


commands = {"diffusion-style": style_command, "diffusion-subject": subject_command}
