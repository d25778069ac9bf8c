"""Running the CLI inside the test process, and writing its input files (shared by the CLI test modules)."""

from __future__ import annotations

import hashlib
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


def refused(argv: list[str], capsys: pytest.CaptureFixture[str], *words: str) -> str:
    """Assert the command exits 2 with exactly one `error:` line, no traceback, holding every one of
    ``words``; return that line."""
    code, _, err = run_cli(argv, capsys)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def hashes(*paths: Path, follow_links: bool = True) -> dict[str, str]:
    """sha256 of every file at or under the paths (a file hashes itself, an absent path to nothing; with
    ``follow_links=False`` symbolic links are skipped): what "unchanged" compares."""
    out = {}
    for path in map(Path, paths):
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        out |= {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files
                if follow_links or not p.is_symlink()}
    return out


def without_stamps(found: dict[str, str]) -> dict[str, str]:
    """``hashes`` without a store's verified stamps (``verified/``): the record of checks a successful read
    may add (once its files are older than STAMP_MARGIN_S, so whether one is written depends on timing), not
    a change to the store's data."""
    return {path: digest for path, digest in found.items() if "/verified/" not in path}
