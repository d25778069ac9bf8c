"""The store's metadata typed, with one reader (issue 30): ``GradientStore.metadata`` / ``StoreMeta``.

The expected values are the mapping written into manifest.json by hand here, not the code's output; a bad
entry is one `error:` line naming the key, with the store's files unchanged.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from cli_helpers import hashes, refused
from datainf.errors import DataInfError
from datainf.store import GradientStore, StoreMeta

SRC = Path(__file__).resolve().parents[1] / "src" / "datainf"
META = {"task": "classification", "task_fingerprint": "f" * 16, "blocks_tracked": 1,
        "collate": {"max_length": 64}, "labels": {"names": ["neg", "pos"], "num_labels": 2},
        "nonfinite": {"dropped": [{"row": 3, "loss": "nan"}, {"row": 7, "loss": "inf"}]},
        "truncated": {"examples": 2, "max_length": 64, "longest": 80}, "note": "kept as it is"}


def write_store(path: Path, meta: dict) -> GradientStore:
    with GradientStore.create(path, blocks={"w": (3,)}, n_examples=4, chunk_size=4, dtype="float64",
                              fingerprints={"model": "m" * 16, "adapter": "a" * 16, "task": "t" * 16,
                                            "dataset": "d" * 16}, meta=meta) as store:
        store.write_chunk(0, {"w": torch.arange(12, dtype=torch.float64).reshape(4, 3)})
        store.finalize()
    return GradientStore.open(path)


def test_the_metadata_of_a_store_typed(tmp_path):
    meta = write_store(tmp_path / "s", META).metadata
    assert meta.task == "classification" and meta.collate == {"max_length": 64}
    assert meta.label_names == ["neg", "pos"] and meta.num_labels == 2
    assert meta.dropped_rows == [3, 7] and meta.truncated["longest"] == 80
    assert meta.preconditioned is None and meta.extra == {"note": "kept as it is"}
    assert meta.to_dict() == META  # one reader, one writer's form: nothing lost
    assert StoreMeta.read({}).to_dict() == {} and StoreMeta.read(None).dropped_rows == []


def test_a_bad_metadata_entry_is_one_line(tmp_path, capsys):
    write_store(tmp_path / "s", {**META, "labels": "neg,pos"})
    with pytest.raises(DataInfError, match="meta.labels is not a mapping"):
        _ = GradientStore.open(tmp_path / "s").metadata
    write_store(tmp_path / "q", META)
    before = hashes(tmp_path)
    refused(["score", "--store", str(tmp_path / "s"), "--queries", str(tmp_path / "q"), "--out",
             str(tmp_path / "x.safetensors")], capsys, "meta.labels", "recompute the store")
    assert hashes(tmp_path) == before


def test_no_raw_manifest_meta_read_outside_the_store_package():
    """The store manifest's ``meta`` is read through ``metadata`` / ``StoreMeta`` only."""
    raw = re.compile(r"""manifest\.get\(["']meta["']|manifest\[["']meta["']\]|resumed\[["']meta["']\]|old\.get\(["']meta["']\)""")
    found = [f"{p.relative_to(SRC)}:{i}" for p in SRC.rglob("*.py") if "store" not in p.relative_to(SRC).parts[:1]
             for i, line in enumerate(p.read_text().splitlines(), 1) if raw.search(line)]
    assert found == []
    assert json.dumps(StoreMeta().to_dict()) == "{}"
