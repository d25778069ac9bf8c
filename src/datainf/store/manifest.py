"""manifest.json: create()'s arguments checked, a manifest read and validated, two manifests compared (before a
resume), and the one-line problems that name a bad chunk."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from datainf.errors import DataInfError, parse_json
from datainf.store.files import CHECKSUM, DTYPES, FINGERPRINT_KEYS, FORMAT_VERSION


def check_spec(
    path: Path,
    blocks: Mapping[str, tuple[int, ...]],
    n_examples: int,
    fingerprints: Mapping[str, str],
    chunk_size: int,
    dtype: str,
    meta: Mapping[str, Any] | None,
) -> dict[str, tuple[int, ...]]:
    """Validate create()'s arguments; returns the block shapes as tuples of ints."""
    if not isinstance(blocks, Mapping) or not blocks:
        raise DataInfError(f"store {path}: blocks must be a non-empty mapping name -> shape")
    shapes = {}
    for name, shape in blocks.items():
        if not isinstance(name, str) or not name:
            raise DataInfError(f"store {path}: block names must be non-empty strings, got {name!r}")
        dims = tuple(shape) if isinstance(shape, Iterable) else (shape,)
        if not all(isinstance(s, (int, np.integer)) and s >= 1 for s in dims):
            raise DataInfError(f"store {path}: block '{name}' has shape {shape!r}; use a tuple of positive ints")
        shapes[name] = tuple(int(s) for s in dims)
    if not isinstance(n_examples, (int, np.integer)) or n_examples < 1:
        raise DataInfError(f"store {path}: n_examples must be an int >= 1, got {n_examples!r}")
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise DataInfError(f"store {path}: chunk_size must be an int >= 1, got {chunk_size!r}")
    if dtype not in DTYPES:
        raise DataInfError(f"store {path}: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not isinstance(fingerprints, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in fingerprints.items()
    ):
        raise DataInfError(f"store {path}: fingerprints must map names (model, adapter, task, dataset) to strings")
    try:
        json.dumps(dict(meta or {}))
    except (TypeError, ValueError) as e:
        raise DataInfError(f"store {path}: meta must be JSON-serialisable ({e})") from None
    return shapes


class StoreProblem(str):
    """One line of :meth:`GradientStore.verify`; ``chunk`` is the bad chunk's index (None: the manifest,
    the records, or an unfinished store), which a rerun of `datainf grads` recomputes."""

    chunk: int | None

    def __new__(cls, text: str, chunk: int | None = None) -> StoreProblem:
        out = super().__new__(cls, text)
        out.chunk = chunk
        return out


class ChunkProblem(Exception):
    """A chunk that cannot be trusted (internal: becomes a DataInfError naming the chunk)."""


class ManifestProblem(Exception):
    """manifest.json disagrees with the chunks (internal)."""


def row_span(rows: Any) -> str:
    if isinstance(rows, list) and len(rows) == 2 and all(isinstance(r, int) for r in rows):
        return f"{rows[0]}..{rows[1] - 1}"
    return repr(rows)


def problem_line(index: int | None, text: str, path: Path | None = None) -> str:
    where = f"store {path}: " if path is not None else ""
    if index is None:
        return f"{where}{text}"
    return f"{where}chunk {index} (chunks/{index:05d}) {text}"


def problems_message(path: Path, problems: list[tuple[int | None, str]]) -> str:
    """One line for a store's problems: the first few, and what to do."""
    shown = "; ".join(problem_line(i, t) for i, t in problems[:3])
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    if all(i is not None for i, _ in problems):
        hint = ("rerun `datainf grads` with the same settings: it moves the bad chunks aside and recomputes just "
                "them (`datainf store verify` checks every checksum)")
    else:
        hint = "recompute the store in a new --store directory (`datainf grads`)"
    return f"store {path}: {shown}{more}; {hint}"


def validate_manifest(path: Path, manifest: Any) -> None:
    """Refuse a manifest whose fields cannot describe a store (edited or damaged), in one line."""
    def bad(what: str) -> DataInfError:
        return DataInfError(f"store {path}: manifest.json {what}; it was edited or damaged: recompute the store "
                            "in a new --store directory (`datainf grads`)")

    if not isinstance(manifest, dict):
        raise bad("is not a JSON object")

    def positive_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 1

    for key in ("n_examples", "chunk_size"):
        if not positive_int(manifest.get(key)):
            raise bad(f"has {key}={manifest.get(key)!r} (an integer >= 1 is needed)")
    blocks = manifest.get("blocks")
    if not isinstance(blocks, list) or not blocks:
        raise bad("has no list of blocks")
    names = set()
    for b in blocks:
        if not isinstance(b, dict) or not isinstance(b.get("name"), str) or not b["name"] or b["name"] in names:
            raise bad(f"has a bad block entry {str(b)[:80]}")
        names.add(b["name"])
        shape = b.get("shape")
        if not isinstance(shape, list) or not shape or not all(positive_int(x) for x in shape):
            raise bad(f"has block '{b['name']}' with shape {shape!r}")
    if manifest.get("dtype") not in DTYPES:
        raise bad(f"has dtype {manifest.get('dtype')!r}, not one of {', '.join(DTYPES)}")
    fps = manifest.get("fingerprints")
    if not isinstance(fps, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in fps.items()):
        raise bad("has no mapping of fingerprints")
    if not isinstance(manifest.get("meta", {}), dict) or not isinstance(manifest.get("complete", False), bool):
        raise bad("has a bad 'meta' or 'complete' entry")
    if manifest.get("integrity") not in (None, CHECKSUM):
        raise bad(f"names an unknown integrity check {manifest.get('integrity')!r}")


def read_manifest(path: Path) -> dict[str, Any]:
    file = path / "manifest.json"
    if not file.is_file():
        raise DataInfError(f"{path} is not a gradient store (no manifest.json); check the --store path")
    try:
        text = file.read_bytes()
    except OSError as e:
        raise DataInfError(f"store {path}: manifest.json is unreadable ({e}); delete the store and recompute") from None
    manifest = parse_json(text, f"store {path}: manifest.json", "delete the store and recompute")
    if not isinstance(manifest, dict):
        raise DataInfError(f"store {path}: manifest.json is not a JSON object; delete the store and recompute")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataInfError(
            f"store {path} has format version {manifest.get('format_version')!r}, this library reads "
            f"{FORMAT_VERSION}; recompute it in a new --store directory"
        )
    for key in ("blocks", "dtype", "n_examples", "chunk_size", "fingerprints"):
        if key not in manifest:
            raise DataInfError(f"store {path}: manifest.json lacks '{key}'; delete the store and recompute")
    validate_manifest(path, manifest)
    return manifest


def projection_label(manifest: Mapping[str, Any] | None) -> str:
    """A manifest's projection in words: "none" or "k=64, seed 0"."""
    p = (manifest or {}).get("projection")
    return "none" if not p else f"k={p.get('dim')}, seed {p.get('seed')}"


def compare_manifests(path: Path, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    """Refuse to resume a store made with different settings, naming the first item that differs."""
    hint = "use a new --store directory or delete it"
    if old.get("projection") != new.get("projection"):
        raise DataInfError(f"store {path} was made with a different projection ({projection_label(old)} != "
                           f"{projection_label(new)}); {hint}")
    old_names = [b["name"] for b in old["blocks"]]
    new_names = [b["name"] for b in new["blocks"]]
    if old_names != new_names:
        raise DataInfError(f"store {path} was made with different blocks ({old_names} != {new_names}); {hint}")
    for a, b in zip(old["blocks"], new["blocks"]):
        if list(a["shape"]) != list(b["shape"]):
            raise DataInfError(
                f"store {path} was made with a different shape of block '{a['name']}' "
                f"({tuple(a['shape'])} != {tuple(b['shape'])}); {hint}"
            )
    for key, what in (("dtype", "storage dtype"), ("n_examples", "number of examples"), ("chunk_size", "chunk_size")):
        if old[key] != new[key]:
            raise DataInfError(f"store {path} was made with a different {what} ({old[key]} != {new[key]}); {hint}")
    old_fp, new_fp = old["fingerprints"], new["fingerprints"]
    keys = [k for k in FINGERPRINT_KEYS if k in old_fp or k in new_fp]
    keys += sorted((set(old_fp) | set(new_fp)) - set(keys))
    for key in keys:
        if old_fp.get(key) != new_fp.get(key):
            raise DataInfError(
                f"store {path} was made with a different {key} (fingerprint {old_fp.get(key)} != "
                f"{new_fp.get(key)}); {hint}"
            )
