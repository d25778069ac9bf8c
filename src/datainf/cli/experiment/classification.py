"""`datainf experiment ...` commands of datainf.experiments.classification (still defined there, for now)."""

from datainf.experiments.classification import cli_commands as commands

__all__ = ["commands"]
