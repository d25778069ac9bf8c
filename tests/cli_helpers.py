"""Running the CLI inside the test process, and writing its input files (shared by the CLI test modules)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pytest

from datainf.cli import main


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``datainf --quiet ARGV`` in-process; return (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--quiet", *argv])
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def write_jsonl(path: Path, records: Iterable[dict]) -> Path:
    """One JSON object a line; returns ``path``."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
