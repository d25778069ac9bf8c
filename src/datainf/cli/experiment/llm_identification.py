"""`datainf experiment ...` commands of datainf.experiments.llm_identification (still defined there, for now)."""

from datainf.experiments.llm_identification import cli_commands as commands

__all__ = ["commands"]
