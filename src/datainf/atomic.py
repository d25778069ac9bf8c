"""Atomic writes: a file appears whole or not at all (written to a temporary name, then renamed), so an
interrupted run never leaves a half-written output that a later run would trust."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np


def _tmp(path: Path, suffix: str = "") -> Path:
    return path.with_name(f".{path.stem if suffix else path.name}.tmp-{os.getpid()}{suffix}")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """JSON (indented; objects it cannot encode are written with str) to ``path`` atomically."""
    write_text(path, json.dumps(data, indent=2, default=str))


def savez(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path, ".npz")
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def savefig(figure: Any, path: str | os.PathLike, dpi: int = 110) -> None:
    """Save a matplotlib figure as PNG to ``path`` atomically, then close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path, ".png")
    try:
        figure.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(figure)
