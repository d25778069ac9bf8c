"""`datainf experiment ...` commands of datainf.experiments.lds (still defined there, for now)."""

from datainf.experiments.lds import cli_commands as commands

__all__ = ["commands"]
