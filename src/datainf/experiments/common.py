"""What the experiments share: settings as JSON, method checks and options, and the files every run writes."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Any

from datainf import atomic
from datainf.errors import DataInfError
from datainf.estimators import ScoreResult, accepted_options, method_names

#: how results.json shows the damping when none was given
PAPER_DAMPING = "paper rule per block"


def settings_dict(settings: Any) -> dict[str, Any]:
    """A settings dataclass as JSON-able values (tuples become lists), as saved in results files."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()}


def check_methods(methods: tuple[str, ...]) -> None:
    """Every name must be a registered method."""
    for m in methods:
        if m not in method_names():
            raise DataInfError(f"unknown method '{m}'; choose from {', '.join(method_names())}")


def method_options(method: str, lissa_iterations: int) -> dict[str, Any]:
    """The method's own scoring options: the iteration count, for a method that has one (LiSSA)."""
    return accepted_options(method, iterations=lissa_iterations)


def damping_label(damping: float | None) -> float | str:
    return PAPER_DAMPING if damping is None else damping


def max_relative_residual(result: ScoreResult) -> float | None:
    """The worst relative residual over the blocks of a method that reports one (LiSSA); None otherwise."""
    found = [v["relative_residual"] for v in result.diagnostics.values()
             if isinstance(v, dict) and "relative_residual" in v]
    return max(found) if found else None


def present(obj: Any, *names: str) -> dict[str, Any]:
    """The named attributes of ``obj`` that are set (not None), in the order named."""
    return {n: getattr(obj, n) for n in names if getattr(obj, n) is not None}


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def write_results(path: str | os.PathLike, results: dict[str, Any]) -> None:
    """results.json: indented, objects JSON cannot encode written with str."""
    atomic.write_text(path, json.dumps(results, indent=2, default=str))


__all__ = ["PAPER_DAMPING", "check_methods", "damping_label", "max_relative_residual", "method_options", "present",
           "settings_dict", "write_jsonl", "write_results"]
