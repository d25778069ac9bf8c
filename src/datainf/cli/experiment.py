"""`datainf experiment ...`: the paper's experiments, each a thin click wrapper over its ``run``."""

from __future__ import annotations

import click

from datainf.cli import LazyGroup

#: experiment name -> (module defining it in ``cli_commands``, one-line help)
EXPERIMENTS: dict[str, tuple[str, str]] = {
    "mislabeled": ("datainf.experiments.classification", "Mislabeled-data detection over a grid of runs."),
    "approximation": ("datainf.experiments.classification", "Correlation with exact over a grid of runs."),
    "selection": ("datainf.experiments.classification", "Data selection: retrain on the least harmful share."),
    "scaling": ("datainf.experiments.classification", "Time of each method as n_train and d grow."),
    "llm-identification": ("datainf.experiments.llm_identification",
                           "Influential-data identification on a LoRA-tuned causal LM."),
    "diffusion-style": ("datainf.experiments.diffusion", "Style attribution for a LoRA-tuned diffusion model."),
    "diffusion-subject": ("datainf.experiments.diffusion", "Subject attribution (DreamBooth-style)."),
    "lds": ("datainf.experiments.lds", "Linear datamodeling score and leave-one-out retraining."),
}


class _Experiments(LazyGroup):
    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        import importlib

        if name not in self.lazy:
            return None
        module = importlib.import_module(self.lazy[name][0])
        return module.cli_commands.get(name)


@click.group("experiment", cls=_Experiments, lazy=EXPERIMENTS)
def command() -> None:
    """The paper's experiments, each writing machine-readable results (see docs/results.md)."""
