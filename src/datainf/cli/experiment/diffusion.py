"""`datainf experiment ...` commands of datainf.experiments.diffusion (still defined there, for now)."""

from datainf.experiments.diffusion import cli_commands as commands

__all__ = ["commands"]
