"""`datainf experiment ...`: the paper's experiments, each a thin click wrapper over its experiment's ``run``.

One module here per module of :mod:`datainf.experiments`, each defining ``commands`` (name -> click command);
they are imported only when one of their commands runs (``datainf experiment --help`` imports no torch).
"""

from __future__ import annotations

from types import ModuleType

import click

from datainf.cli import LazyGroup

#: experiment name -> (module of datainf.cli.experiment defining it in ``commands``, one-line help)
EXPERIMENTS: dict[str, tuple[str, str]] = {
    "mislabeled": ("datainf.cli.experiment.classification", "Mislabeled-data detection over a grid of runs."),
    "approximation": ("datainf.cli.experiment.classification", "Correlation with exact over a grid of runs."),
    "selection": ("datainf.cli.experiment.classification", "Data selection: retrain on the least harmful share."),
    "scaling": ("datainf.cli.experiment.classification", "Time of each method as n_train and d grow."),
    "llm-identification": ("datainf.cli.experiment.llm_identification",
                           "Influential-data identification on a LoRA-tuned causal LM."),
    "diffusion-style": ("datainf.cli.experiment.diffusion", "Style attribution for a LoRA-tuned diffusion model."),
    "diffusion-subject": ("datainf.cli.experiment.diffusion", "Subject attribution (DreamBooth-style)."),
    "lds": ("datainf.cli.experiment.lds", "Linear datamodeling score and leave-one-out retraining."),
}


class ExperimentGroup(LazyGroup):
    """A lazy group whose modules may define several commands, in a ``commands`` dict."""

    def command_of(self, module: ModuleType, name: str) -> click.Command:
        return module.commands[name]


@click.group("experiment", cls=ExperimentGroup, lazy=EXPERIMENTS)
def command() -> None:
    """The paper's experiments, each writing machine-readable results (see docs/results.md)."""
