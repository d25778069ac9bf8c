"""The `datainf` command line: thin wrappers over the library, one module per command.

Every command takes its settings from flags, or from one YAML/TOML file given with ``datainf --config FILE``
(flat keys apply to every command, a section named after a command to that command only); flags override it.
Bad input prints one line starting with "error:" and exits with status 2; nothing half-written is left.

Commands are imported only when run (``datainf --help`` imports neither torch nor transformers).
"""

from __future__ import annotations

import importlib
import logging
import sys
import warnings
from types import ModuleType
from typing import Any

import click

from datainf.errors import DataInfError

#: command name -> (module defining a click command of that name, one-line help shown by `datainf --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("datainf.cli.demo", "Find mislabeled training examples in a real LoRA-tuned model, offline."),
    "finetune": ("datainf.cli.finetune", "LoRA fine-tuning of a local classifier or causal LM."),
    "grads": ("datainf.cli.grads", "Per-example gradients of a dataset into a gradient store (resumes)."),
    "score": ("datainf.cli.score", "Scores of training examples against queries, or self-influence."),
    "explain": ("datainf.cli.explain", "Why did my model say this? Prompts (or a file of them) against a training store."),
    "top": ("datainf.cli.top", "The top-k helpful and harmful training examples per query, as JSONL or CSV."),
    "report": ("datainf.cli.report", "A self-contained HTML report from a scores file."),
    "store": ("datainf.cli.store",
              "Check a store (verify), precondition it for one-pass queries, or describe it (info)."),
    "index": ("datainf.cli.index", "A top-k index of a store (faiss): build it, search it without a full pass."),
    "experiment": ("datainf.cli.experiment", "The paper's experiments (see docs/results.md)."),
    "assets": ("datainf.cli.assets", "Print the folder of an offline model (converted once)."),
    "example-data": ("datainf.cli.assets", "Write a generated chat or prompt/response training set as JSONL."),
}


class LazyGroup(click.Group):
    """A group whose commands live in their own modules, imported when a command runs."""

    def __init__(self, *args: Any, lazy: dict[str, tuple[str, str]] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.lazy) + [c for c in super().list_commands(ctx) if c not in self.lazy]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.commands:
            return self.commands[name]
        if name not in self.lazy:
            return None
        module_name, _ = self.lazy[name]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and e.name.split(".")[0] == "datainf":
                raise
            raise DataInfError(f"`{ctx.command_path} {name}` needs the package {e.name!r}, which is not "
                               f"installed: pip install {e.name}") from None
        command = self.command_of(module, name)
        self.commands[name] = command
        return command

    def command_of(self, module: ModuleType, name: str) -> click.Command:
        """The command named ``name`` in its lazily imported module: a command object named after it
        (``example_data`` for "example-data", when a module defines several), else the module's ``command``."""
        command = getattr(module, name.replace("-", "_"), None)
        return command if isinstance(command, click.Command) else module.command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_) for name, (_, help_) in self.lazy.items()]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"],
                                                             "show_default": True})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="YAML or TOML file of settings; flags given on the command line override it.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or log lines.")
@click.option("--verbose", "-v", is_flag=True, help="Debug logging.")
@click.version_option(package_name="datainf")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, quiet: bool, verbose: bool) -> None:
    """datainf: which training examples made my fine-tuned model do this?

    Influence of training examples on a LoRA-tuned model's predictions, with DataInf (Kwon et al.,
    ICLR 2024), exact, LiSSA, Hessian-free and (E)K-FAC estimators. A score is the first-order change of a
    query's loss when a training example is up-weighted: positive = harmful, negative = helpful.

    \b
    Typical flow:
      datainf finetune --model BASE --train train.jsonl --out adapter/
      datainf grads --model BASE --adapter adapter/ --data train.jsonl --store runs/train
      datainf grads --model BASE --adapter adapter/ --data val.jsonl --store runs/val
      datainf score --store runs/train --queries runs/val --mean-query --out scores.safetensors
      datainf report --scores scores.safetensors --data train.jsonl --out report.html
    or everything at once on a real offline model and data set:
      datainf demo --out demo-out
    """
    # peft asks transformers a deprecated question on every load; it is not the user's to fix
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    warnings.formatwarning = _one_line_warning  # a library warning is one `warning:` line, not file:line + code
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(level=level, format="%(message)s")
    if quiet and ctx.invoked_subcommand is not None:  # no model-loading bars or transformers notices either
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    if config_path:
        from datainf.cli.common import default_map, load_config

        group = ctx.command
        assert isinstance(group, click.Group)
        commands = {name: group.get_command(ctx, name) for name in group.list_commands(ctx)}
        ctx.default_map = default_map(load_config(config_path), {k: v for k, v in commands.items() if v})


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      line: str | None = None) -> str:
    """How the command line shows a warning: ``warning: MESSAGE`` on one line (the message's own lines joined)."""
    return f"warning: {' '.join(str(message).split())}\n"


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the CLI and turns bad input into one line and exit status 2."""
    try:
        rv = cli.main(args=argv, prog_name="datainf", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.exceptions.NoArgsIsHelpError as e:
        e.show()  # the help text of a group called without a command
        sys.exit(e.exit_code)
    except click.ClickException as e:  # a bad option value, a missing option: one line too
        message = " ".join(e.format_message().split())
        if isinstance(e, click.UsageError) and e.ctx is not None:
            message += f" (see `{e.ctx.command_path} --help`)"
        click.echo(f"error: {message}", err=True)
        sys.exit(e.exit_code)
    except DataInfError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted; finished store shards are kept and a rerun resumes", err=True)
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)


__all__ = ["COMMANDS", "LazyGroup", "cli", "main"]
