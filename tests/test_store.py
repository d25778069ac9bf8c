"""Tests of the on-disk gradient store and the fingerprints (datainf.store)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json
import logging
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import datainf
from datainf.errors import DataInfError
from datainf.store import (
    GradientStore,
    StoredBlock,
    fingerprint_dataset,
    fingerprint_model,
    fingerprint_task,
)
from reference import assert_close_to

SHAPES = {"lora_A": (3, 8), "lora_B": (8, 2), "bias": (5,)}
FPS = {"model": "m" * 16, "adapter": "a" * 16, "task": "t" * 16, "dataset": "d" * 16}


def make_grads(n: int, seed: int = 0, shapes=SHAPES) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(n, *s, generator=gen) for k, s in shapes.items()}


def rows_of(grads, rows: range) -> dict[str, torch.Tensor]:
    return {k: v[rows.start : rows.stop] for k, v in grads.items()}


def fill(path, grads, *, chunk_size=4, dtype="float32", order=None, finalize=True) -> GradientStore:
    n = next(iter(grads.values())).shape[0]
    shapes = {k: tuple(v.shape[1:]) for k, v in grads.items()}
    with GradientStore.create(path, blocks=shapes, n_examples=n, fingerprints=FPS, chunk_size=chunk_size,
                              dtype=dtype) as store:
        for i in order if order is not None else store.missing_chunks():
            store.write_chunk(i, rows_of(grads, store.chunk_rows(i)))
        if finalize:
            store.finalize()
    return GradientStore.open(path, allow_incomplete=not finalize)


# --------------------------------------------------------------------------------------------------
# round trip
# --------------------------------------------------------------------------------------------------


def test_round_trip_random_order(tmp_path):
    grads = make_grads(23)
    order = list(np.random.default_rng(1).permutation(6))  # 23 rows / 4 per chunk -> 6 chunks
    store = fill(tmp_path / "s", grads, order=order)
    assert store.complete and store.num_chunks == 6 and store.block_names == list(SHAPES)
    assert store.chunk_rows(5) == range(20, 23)
    for name, g in grads.items():
        assert torch.equal(store.load(name), g)
        b = store.block(name)
        assert b.shape == (23, g[0].numel()) and b.dtype == torch.float32 and b.device.type == "cpu"
        flat = g.reshape(23, -1)
        for s in (slice(0, 23), slice(3, 9), slice(7, 8), slice(2, 21), slice(-5, None), slice(1, 20, 3)):
            assert torch.equal(b[s], flat[s]), s
        assert b[10:10].shape == (0, flat.shape[1])
        idx = torch.tensor([22, 0, 5, 5, 13, 4, 3, -1])
        assert torch.equal(b[idx], flat[idx])
        assert torch.equal(b[idx.numpy()], flat[idx])
        assert torch.equal(b[[1, 2]], flat[[1, 2]])
        assert torch.equal(b[7], flat[7])
    assert list(store.blocks()) == list(SHAPES)
    sq = store.sq_norms()
    for name, g in grads.items():
        expected = (g.reshape(23, -1).double() ** 2).sum(dim=1)
        assert sq[name].dtype == torch.float64
        torch.testing.assert_close(sq[name], expected, rtol=1e-12, atol=0)


def test_out_of_range_rows_are_refused(tmp_path):
    store = fill(tmp_path / "s", make_grads(10))
    with pytest.raises(DataInfError, match="lora_A"):
        store.block("lora_A")[torch.tensor([0, 10])]
    with pytest.raises(DataInfError, match="out of range"):
        store.block("lora_A")[10]
    with pytest.raises(DataInfError, match="no block 'nope'"):
        store.block("nope")


@pytest.mark.filterwarnings("ignore:lissa has not converged")
def test_streaming_influence_equals_in_memory(tmp_path):
    # float64 gradients in a float64 store: streaming and in-memory agree to float64 rounding
    # (tests/reference.py); a row read from the wrong chunk or a chunk border read twice is an O(1) error
    grads = {k: v.double() for k, v in make_grads(50, seed=3).items()}
    queries = {k: v.double() for k, v in make_grads(4, seed=4).items()}
    store = fill(tmp_path / "s", grads, chunk_size=7, dtype="float64")
    for method in ("datainf", "exact", "identity"):
        expected = datainf.influence(grads, queries, method=method)
        # a chunk_size that is not a multiple of the store's makes reads straddle chunk borders
        got = datainf.influence(store.blocks(), queries, method=method, chunk_size=10)
        assert got.dtype == torch.float64
        assert_close_to(got, expected, what=method)
    lissa = dict(method="lissa", iterations=5, batch_size=16)
    assert_close_to(datainf.influence(store.blocks(), queries, **lissa), datainf.influence(grads, queries, **lissa),
                    what="lissa with mini-batches")


# --------------------------------------------------------------------------------------------------
# 16-bit storage
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, torch_dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_16bit_storage_reads_the_rounded_values(tmp_path, dtype, torch_dtype):
    grads = make_grads(11)
    store = fill(tmp_path / "s", grads, dtype=dtype)
    for name, g in grads.items():
        assert torch.equal(store.load(name), g.to(torch_dtype).float())
        assert store.block(name, dtype=None)[0:3].dtype == torch_dtype
        assert store.load(name, dtype=torch.float64).dtype == torch.float64
    # the squared norms come from the float32 values, before the down-cast
    torch.testing.assert_close(store.sq_norms()["bias"], (grads["bias"].double() ** 2).sum(1), rtol=1e-12, atol=0)
    files = sorted((tmp_path / "s" / "chunks" / "00000").glob("b*.npy"))
    assert np.load(files[0]).dtype == (np.float16 if dtype == "float16" else np.uint16)


def test_16bit_accuracy_cost_on_influence_scores(tmp_path):
    shapes = {"A": (8, 16), "B": (16, 8)}
    grads, queries = make_grads(200, seed=5, shapes=shapes), make_grads(6, seed=6, shapes=shapes)
    ref = datainf.influence(fill(tmp_path / "f32", grads, chunk_size=64).blocks(), queries).flatten().numpy()
    corr = {}
    for dtype in ("float16", "bfloat16"):
        store = fill(tmp_path / dtype, grads, chunk_size=64, dtype=dtype)
        scores = datainf.influence(store.blocks(), queries).flatten().numpy()
        corr[dtype] = float(np.corrcoef(scores, ref)[0, 1])
    print(f"\ncorrelation of datainf scores with the float32 store: {corr}")
    assert corr["float16"] > 0.99
    assert corr["bfloat16"] > 0.95


def test_float16_overflow_is_refused(tmp_path):
    grads = make_grads(4)
    grads["bias"][2, 1] = 1e5
    with pytest.raises(DataInfError, match=r"block 'bias', example 2 .*float16"):
        fill(tmp_path / "s", grads, dtype="float16")


# --------------------------------------------------------------------------------------------------
# writing: validation, atomicity, resume
# --------------------------------------------------------------------------------------------------


def test_write_chunk_validation(tmp_path):
    grads = make_grads(10)
    with GradientStore.create(tmp_path / "s", blocks=SHAPES, n_examples=10, fingerprints=FPS, chunk_size=4) as s:
        with pytest.raises(DataInfError, match="chunk index 3"):
            s.write_chunk(3, rows_of(grads, range(0, 4)))
        with pytest.raises(DataInfError, match="expected blocks"):
            s.write_chunk(0, {"lora_A": grads["lora_A"][:4]})
        bad_shape = {**rows_of(grads, range(0, 4)), "lora_B": torch.zeros(4, 2, 8)}
        with pytest.raises(DataInfError, match="block 'lora_B' has shape"):
            s.write_chunk(0, bad_shape)
        with pytest.raises(DataInfError, match="expected \\(2, 3, 8\\)"):  # last chunk holds 2 rows
            s.write_chunk(2, rows_of(grads, range(4, 8)))
        nan = rows_of(grads, range(4, 8))
        nan["lora_B"] = nan["lora_B"].clone()
        nan["lora_B"][2, 0, 1] = float("nan")
        with pytest.raises(DataInfError, match="block 'lora_B', example 6"):
            s.write_chunk(1, nan)
        flat = {k: v.reshape(4, -1) for k, v in rows_of(grads, range(0, 4)).items()}
        s.write_chunk(0, flat)  # (rows, d) is accepted too
        with pytest.raises(DataInfError, match="already written"):
            s.write_chunk(0, rows_of(grads, range(0, 4)))
        assert s.missing_chunks() == [1, 2]
        assert not list((tmp_path / "s" / "chunks").glob(".*.tmp-*"))  # failed writes leave nothing behind
    with pytest.raises(DataInfError, match="not open for writing"):
        s.write_chunk(1, rows_of(grads, range(4, 8)))


def _chunk_ids(path: Path, chunks) -> dict:
    out = {}
    for i in chunks:
        for f in sorted((path / "chunks" / f"{i:05d}").iterdir()):
            st = f.stat()
            out[f"{i}/{f.name}"] = (st.st_ino, st.st_mtime_ns)
    return out


def test_resume_after_dropping_the_writer(tmp_path):
    path, grads = tmp_path / "s", make_grads(20)
    store = GradientStore.create(path, blocks=SHAPES, n_examples=20, fingerprints=FPS, chunk_size=4)
    for i in (0, 3):
        store.write_chunk(i, rows_of(grads, store.chunk_rows(i)))
    half = path / "chunks" / ".00001.tmp-99999"  # what a killed write leaves behind
    half.mkdir()
    (half / "b0000.npy").write_bytes(b"\x93NUMPY garbage")
    before = _chunk_ids(path, (0, 3))
    del store  # no close(): the lock is released when the object goes away
    store = GradientStore.create(path, blocks=SHAPES, n_examples=20, fingerprints=FPS, chunk_size=4)
    assert store.missing_chunks() == [1, 2, 4]
    assert not half.exists()
    for i in store.missing_chunks():
        store.write_chunk(i, rows_of(grads, store.chunk_rows(i)))
    store.finalize()
    store.close()
    assert _chunk_ids(path, (0, 3)) == before  # finished chunks were not rewritten
    for name, g in grads.items():
        assert torch.equal(GradientStore.open(path).load(name), g)


_KILLED_WRITER = """
import os, sys, time, torch
from datainf.store import GradientStore
path, shapes, fps = sys.argv[1], {shapes!r}, {fps!r}
gen = torch.Generator().manual_seed(0)
grads = {{k: torch.randn(20, *s, generator=gen) for k, s in shapes.items()}}
store = GradientStore.create(path, blocks=shapes, n_examples=20, fingerprints=fps, chunk_size=4)
for i in (0, 2):
    r = store.chunk_rows(i)
    store.write_chunk(i, {{k: v[r.start:r.stop] for k, v in grads.items()}})
real_fsync = os.fsync
def fsync_then_hang(fd):
    real_fsync(fd)
    print("writing", flush=True)
    time.sleep(600)
os.fsync = fsync_then_hang
r = store.chunk_rows(3)
store.write_chunk(3, {{k: v[r.start:r.stop] for k, v in grads.items()}})
"""


def test_resume_after_killing_a_writer_mid_chunk(tmp_path, caplog):
    path = tmp_path / "s"
    script = _KILLED_WRITER.format(shapes=SHAPES, fps=FPS)
    proc = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        tmp_dirs = list((path / "chunks").glob(".00003.tmp-*"))
        # chunk 3 is written but not yet renamed into place: invisible to readers
        assert len(tmp_dirs) == 1 and any(tmp_dirs[0].iterdir()) and not (path / "chunks" / "00003").exists()
        with pytest.raises(DataInfError, match=f"being written by process {proc.pid}"):
            GradientStore.create(path, blocks=SHAPES, n_examples=20, fingerprints=FPS, chunk_size=4)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    assert (path / "lock").exists() and not (path / "chunks" / "00003").exists()
    before = _chunk_ids(path, (0, 2))
    grads = make_grads(20, seed=0)
    with caplog.at_level(logging.WARNING, logger="datainf.store"):
        store = GradientStore.create(path, blocks=SHAPES, n_examples=20, fingerprints=FPS, chunk_size=4)
    assert "stale lock" in caplog.text and str(proc.pid) in caplog.text
    with store:
        assert store.missing_chunks() == [1, 3, 4]
        assert not list((path / "chunks").glob(".*.tmp-*"))
        for i in store.missing_chunks():
            store.write_chunk(i, rows_of(grads, store.chunk_rows(i)))
        store.finalize()
    assert _chunk_ids(path, (0, 2)) == before
    assert not (path / "lock").exists()
    for name, g in grads.items():
        assert torch.equal(GradientStore.open(path).load(name), g)


# --------------------------------------------------------------------------------------------------
# refusing to resume a different store
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["model", "adapter", "task", "dataset"])
def test_fingerprint_mismatch_is_refused(tmp_path, key):
    GradientStore.create(tmp_path / "s", blocks=SHAPES, n_examples=10, fingerprints=FPS).close()
    other = {**FPS, key: "0123456789abcdef"}
    with pytest.raises(DataInfError, match=f"different {key} \\(fingerprint {FPS[key]} != 0123456789abcdef\\)"):
        GradientStore.create(tmp_path / "s", blocks=SHAPES, n_examples=10, fingerprints=other)
    assert not (tmp_path / "s" / "lock").exists()  # a refused create does not keep the lock


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(blocks={**SHAPES, "bias": (6,)}), "shape of block 'bias'"),
        (dict(blocks={"lora_A": (3, 8), "lora_B": (8, 2)}), "different blocks"),
        (dict(n_examples=11), "number of examples"),
        (dict(chunk_size=5), "chunk_size"),
        (dict(dtype="float16"), "storage dtype"),
    ],
)
def test_settings_mismatch_is_refused(tmp_path, change, words):
    spec = dict(blocks=SHAPES, n_examples=10, fingerprints=FPS, chunk_size=4)
    GradientStore.create(tmp_path / "s", **spec).close()
    with pytest.raises(DataInfError, match=words):
        GradientStore.create(tmp_path / "s", **{**spec, **change})
    GradientStore.create(tmp_path / "s", **spec).close()  # the same settings reopen fine
    GradientStore.create(tmp_path / "s", **{**spec, "blocks": {"lora_A": [3, 8], "lora_B": (8, 2), "bias": 5}}).close()


def test_a_directory_that_is_not_a_store_is_refused(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(DataInfError, match="not a gradient store"):
        GradientStore.create(tmp_path / "x", blocks=SHAPES, n_examples=3, fingerprints=FPS)
    with pytest.raises(DataInfError, match="no manifest.json"):
        GradientStore.open(tmp_path / "x")


# --------------------------------------------------------------------------------------------------
# the lock
# --------------------------------------------------------------------------------------------------


def test_second_writer_is_refused_and_lock_released_on_exception(tmp_path):
    spec = dict(blocks=SHAPES, n_examples=10, fingerprints=FPS)
    path = tmp_path / "s"
    with pytest.raises(RuntimeError, match="boom"):
        with GradientStore.create(path, **spec):
            with pytest.raises(DataInfError) as err:
                GradientStore.create(path, **spec)
            assert f"process {os.getpid()} on host {socket.gethostname()}" in str(err.value)
            assert "remove" in str(err.value) and "lock" in str(err.value)
            raise RuntimeError("boom")
    assert not (path / "lock").exists()
    GradientStore.create(path, **spec).close()


def test_stale_lock_is_taken_over_but_foreign_host_is_not(tmp_path, caplog):
    spec = dict(blocks=SHAPES, n_examples=10, fingerprints=FPS)
    path = tmp_path / "s"
    GradientStore.create(path, **spec).close()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (path / "lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "token": "x"}))
    with caplog.at_level(logging.WARNING, logger="datainf.store"):
        store = GradientStore.create(path, **spec)
    assert "stale lock" in caplog.text
    assert json.loads((path / "lock").read_text())["pid"] == os.getpid()
    store.close()
    (path / "lock").write_text(json.dumps({"pid": dead.pid, "host": "elsewhere", "token": "x"}))
    with pytest.raises(DataInfError, match="on host elsewhere"):
        GradientStore.create(path, **spec)
    assert json.loads((path / "lock").read_text())["host"] == "elsewhere"  # not ours to remove


# --------------------------------------------------------------------------------------------------
# finalize / open
# --------------------------------------------------------------------------------------------------


def test_finalize_and_open_incomplete(tmp_path):
    path, grads = tmp_path / "s", make_grads(10)
    with GradientStore.create(path, blocks=SHAPES, n_examples=10, fingerprints=FPS, chunk_size=4,
                              meta={"note": "x"}) as store:
        store.write_chunk(1, rows_of(grads, store.chunk_rows(1)))
        with pytest.raises(DataInfError, match="2 of 3 chunks are missing \\(0, 2\\)"):
            store.finalize()
    assert json.loads((path / "manifest.json").read_text())["complete"] is False
    with pytest.raises(DataInfError, match="incomplete \\(1 of 3 chunks"):
        GradientStore.open(path)
    partial = GradientStore.open(path, allow_incomplete=True)
    assert not partial.complete and partial.missing_chunks() == [0, 2]
    assert torch.equal(partial.block("bias")[4:8], grads["bias"][4:8])
    with pytest.raises(DataInfError, match="chunk 0 \\(examples 0..3\\)"):
        partial.block("bias")[2:5]
    with pytest.raises(DataInfError, match="not open for writing"):
        partial.write_chunk(0, rows_of(grads, range(0, 4)))
    with GradientStore.create(path, blocks=SHAPES, n_examples=10, fingerprints=FPS, chunk_size=4) as store:
        for i in store.missing_chunks():
            store.write_chunk(i, rows_of(grads, store.chunk_rows(i)))
        store.finalize()
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["meta"] == {"note": "x"}
    assert manifest["fingerprints"] == FPS and manifest["library_version"] == datainf.__version__
    assert GradientStore.open(path).complete


# --------------------------------------------------------------------------------------------------
# memory-mapped reading
# --------------------------------------------------------------------------------------------------


def test_slices_read_only_the_chunks_they_need_through_memory_maps(tmp_path, monkeypatch):
    store = fill(tmp_path / "s", make_grads(40), chunk_size=8)
    calls = []
    import datainf.store.gradient_store as store_module

    real_map = store_module.map_npy

    def spy(file, *args, **kwargs):  # every memory map the reads make (np.load is only the fallback)
        mapped = real_map(file, *args, **kwargs)
        calls.append((Path(file).parent.name, Path(file).name, "r" if mapped is not None else None))
        return mapped

    monkeypatch.setattr("datainf.store.gradient_store.map_npy", spy)
    store.block("lora_B")[14:18]
    assert calls == [("00001", "b0001.npy", "r"), ("00002", "b0001.npy", "r")]
    calls.clear()
    store.block("bias")[torch.tensor([39, 1, 33])]
    assert sorted(calls) == [("00000", "b0002.npy", "r"), ("00004", "b0002.npy", "r")]


def test_a_slice_does_not_load_the_whole_block(tmp_path):
    n, d = 2048, 2048  # 16 MiB of float32
    gen = torch.Generator().manual_seed(0)
    with GradientStore.create(tmp_path / "s", blocks={"w": (d,)}, n_examples=n, fingerprints=FPS,
                              chunk_size=512) as store:
        for i in range(store.num_chunks):
            store.write_chunk(i, {"w": torch.randn(len(store.chunk_rows(i)), d, generator=gen)})
        store.finalize()
    block = GradientStore.open(tmp_path / "s").block("w")
    assert isinstance(block, StoredBlock)

    def peak(read) -> int:
        """Bytes copied out of the memory maps (the reads copy straight from the map into the result)."""
        copied = []
        real = StoredBlock._copy_rows

        def spy(self, out, array):
            copied.append(array.nbytes)
            real(self, out, array)

        StoredBlock._copy_rows = spy
        try:
            read()
            return sum(copied)
        finally:
            StoredBlock._copy_rows = real

    small = peak(lambda: block[500:520])  # crosses a chunk border
    whole = peak(lambda: block[:])
    print(f"\nread from the maps: 20-row slice {small / 2**20:.2f} MiB, whole block {whole / 2**20:.2f} MiB")
    assert whole > 2 * 2**20  # control: the spy does see the reads
    assert small < 1 * 2**20


# --------------------------------------------------------------------------------------------------
# fingerprints
# --------------------------------------------------------------------------------------------------


def _tiny_lora_model(seed: int):
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16)
    base = BertModel(config)
    return get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],
                                           init_lora_weights=False))


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_fingerprint_model_separates_base_and_adapter():
    a, b = _tiny_lora_model(0), _tiny_lora_model(0)
    fa = fingerprint_model(a)
    assert fa == fingerprint_model(b) and all(len(v) == 16 for v in fa.values())
    with torch.no_grad():  # change only an adapter weight
        next(p for n, p in b.named_parameters() if p.requires_grad).add_(1e-3)
    fb = fingerprint_model(b)
    assert fb["model"] == fa["model"] and fb["adapter"] != fa["adapter"]
    c = _tiny_lora_model(0)
    with torch.no_grad():  # change a frozen weight in its sampled head
        next(p for n, p in c.named_parameters() if "word_embeddings" in n).view(-1)[0] += 1.0
    fc = fingerprint_model(c)
    assert fc["model"] != fa["model"] and fc["adapter"] == fa["adapter"]
    d = _tiny_lora_model(0)
    with torch.no_grad():  # change a frozen weight in the middle: caught by the sum
        p = next(p for n, p in d.named_parameters() if "word_embeddings" in n)
        p.view(-1)[p.numel() // 2] += 1.0
    assert fingerprint_model(d)["model"] != fa["model"]
    assert fingerprint_model(_tiny_lora_model(1)) != fa


def test_fingerprint_dataset_and_task():
    recs = [{"text": "good film", "label": 1}, {"label": 0, "text": "bad"}]
    fp = fingerprint_dataset(recs)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fp == fingerprint_dataset([{"label": 1, "text": "good film"}, {"text": "bad", "label": 0}])
    assert fp != fingerprint_dataset(recs[::-1])
    assert fp != fingerprint_dataset(recs[:1])
    assert fp != fingerprint_dataset([{"text": "good film", "label": 0}, recs[1]])
    arrays = [{"x": np.arange(4)}, {"x": torch.ones(2, 2)}]
    assert fingerprint_dataset(arrays) == fingerprint_dataset([{"x": np.arange(4)}, {"x": torch.ones(2, 2)}])
    assert fingerprint_dataset(arrays) != fingerprint_dataset([{"x": np.arange(4)}, {"x": torch.zeros(2, 2)}])
    with pytest.raises(DataInfError, match="record 1"):
        fingerprint_dataset([{"a": 1}, {"a": object()}])
    t = fingerprint_task({"name": "sentiment", "template": "{text}"})
    assert len(t) == 16 and t == fingerprint_task({"template": "{text}", "name": "sentiment"})
    assert t != fingerprint_task({"name": "sentiment", "template": "Review: {text}"})
    assert fingerprint_task("sst2") != fingerprint_task("sst2 ")
    with pytest.raises(DataInfError, match="string or a dict"):
        fingerprint_task(3)


# --------------------------------------------------------------------------------------------------
# integrity: chunk manifests, checksums, setting bad chunks aside
# --------------------------------------------------------------------------------------------------


def folder_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative path -> digest): the "nothing changed" check."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _overwrite_values(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[-8:] = np.array([3.0, -7.0], dtype=np.float32).tobytes()  # same size, other values
    file.write_bytes(bytes(data))


def _swap(a: Path, b: Path) -> None:
    tmp = a.with_name("swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def _edit_manifest(path: Path, **changes) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, **changes}))


CORRUPTIONS = {
    # name: (how, found by open() cheaply?, words of the message)
    "overwritten values": (lambda p: _overwrite_values(p / "chunks/00001/b0000.npy"), False,
                           "chunk 1 (chunks/00001) b0000.npy does not match its sha256 checksum"),
    "swapped chunk folders": (lambda p: _swap(p / "chunks/00000", p / "chunks/00001"), True,
                              "chunk 0 (chunks/00000) holds chunk 1 (examples 4..7), not chunk 0"),
    "edited n_examples": (lambda p: _edit_manifest(p, n_examples=9), True,
                          "chunk 2 holds examples 8..9, but manifest.json (n_examples=9, chunk_size=4) puts "
                          "examples 8..8 in it"),
    "fewer n_examples": (lambda p: _edit_manifest(p, n_examples=4), True,
                         "chunk folder chunks/00001 lies beyond the 1 chunks"),
    "truncated shard": (lambda p: (p / "chunks/00002/b0001.npy").write_bytes(
        (p / "chunks/00002/b0001.npy").read_bytes()[:100]), True,
        "chunk 2 (chunks/00002) b0001.npy has 100 bytes"),
    "zero-byte shard": (lambda p: (p / "chunks/00000/b0002.npy").write_bytes(b""), True,
                        "chunk 0 (chunks/00000) b0002.npy has 0 bytes"),
    "bad sq_norms": (lambda p: _overwrite_values(p / "chunks/00001/sq_norms.npy"), False,
                     "chunk 1 (chunks/00001) sq_norms.npy does not match its sha256 checksum"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_every_corruption_is_caught_by_name(tmp_path, case):
    """Each way a store was found to be silently wrong (issue 17, defect 3) is refused, naming the chunk:
    by open() when a cheap check sees it, else on the first read (checksum) and by verify()."""
    corrupt, cheap, words = CORRUPTIONS[case]
    path = tmp_path / "s"
    fill(path, make_grads(10))
    corrupt(path)
    before = folder_hashes(path)
    if cheap:
        with pytest.raises(DataInfError) as err:
            GradientStore.open(path)
        message = str(err.value)
        assert "\n" not in message
    else:
        store = GradientStore.open(path)  # sizes agree: only the checksum can tell
        with pytest.raises(DataInfError) as err:
            for name in store.block_names:
                store.load(name)
            store.sq_norms()
        message = str(err.value)
        problems = store.verify()
        assert len(problems) == 1 and words in problems[0], problems
    assert words in message, message
    assert "rerun `datainf grads`" in message or "new --store directory" in message, message
    assert folder_hashes(path) == before  # looking never changes anything


def test_resume_sets_a_bad_chunk_aside_and_recomputes_just_it(tmp_path, caplog):
    path, grads = tmp_path / "s", make_grads(10)
    fill(path, grads)
    _overwrite_values(path / "chunks/00001/b0001.npy")
    bad_bytes = (path / "chunks/00001/b0001.npy").read_bytes()
    kept = _chunk_ids(path, (0, 2))
    with caplog.at_level(logging.WARNING, logger="datainf.store"):
        store = GradientStore.create(path, blocks=SHAPES, n_examples=10, fingerprints=FPS, chunk_size=4)
    assert "chunk 1 b0001.npy does not match its sha256 checksum" in caplog.text
    assert store.missing_chunks() == [1] and not store.complete
    aside = list((path / "chunks").glob(".corrupt-00001-*"))
    assert len(aside) == 1 and (aside[0] / "b0001.npy").read_bytes() == bad_bytes  # moved, not deleted
    with store:
        store.write_chunk(1, rows_of(grads, store.chunk_rows(1)))
        store.finalize()
    assert _chunk_ids(path, (0, 2)) == kept
    fresh = GradientStore.open(path)
    assert fresh.verify() == []
    for name, g in grads.items():
        assert torch.equal(fresh.load(name), g)


def test_swapped_chunks_are_both_recomputed_on_resume(tmp_path):
    path, grads = tmp_path / "s", make_grads(10)
    fill(path, grads)
    _swap(path / "chunks/00000", path / "chunks/00001")
    with GradientStore.create(path, blocks=SHAPES, n_examples=10, fingerprints=FPS, chunk_size=4) as store:
        assert store.missing_chunks() == [0, 1]
        for i in store.missing_chunks():
            store.write_chunk(i, rows_of(grads, store.chunk_rows(i)))
        store.finalize()
    assert torch.equal(GradientStore.open(path).load("lora_A"), grads["lora_A"])


def test_verify_recomputes_the_squared_norms(tmp_path):
    """A sq_norms.npy whose chunk.json was rewritten to match it is still caught: verify recomputes them."""
    import hashlib

    path = tmp_path / "s"
    fill(path, make_grads(10))
    sq_file = path / "chunks/00002/sq_norms.npy"
    doubled = np.load(sq_file) * 2.0
    with open(sq_file, "wb") as f:
        np.save(f, doubled)
    info = json.loads((path / "chunks/00002/chunk.json").read_text())
    info["files"]["sq_norms.npy"]["sha256"] = hashlib.sha256(sq_file.read_bytes()).hexdigest()
    (path / "chunks/00002/chunk.json").write_text(json.dumps(info))
    problems = GradientStore.open(path).verify()
    assert len(problems) == 1 and "chunk 2 (chunks/00002) sq_norms.npy disagrees with b0000.npy" in problems[0]


def test_an_old_store_without_chunk_manifests_is_read_with_a_warning(tmp_path, caplog):
    path, grads = tmp_path / "s", make_grads(10)
    fill(path, grads)
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["integrity"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    for f in (path / "chunks").glob("*/chunk.json"):
        f.unlink()
    with caplog.at_level(logging.WARNING, logger="datainf.store"):
        store = GradientStore.open(path)
    assert "without chunk checksums" in caplog.text
    assert torch.equal(store.load("bias"), grads["bias"]) and store.verify() == []
    (path / "chunks/00001/b0000.npy").write_bytes((path / "chunks/00001/b0000.npy").read_bytes()[:-4])
    with pytest.raises(DataInfError, match="chunk 1 \\(chunks/00001\\) b0000.npy has 508 bytes, expected 512"):
        GradientStore.open(path)


@pytest.mark.parametrize("edit, words", [
    (dict(chunk_size=0), "chunk_size=0"),
    (dict(n_examples="10"), "n_examples='10'"),
    (dict(blocks=[{"name": "lora_A", "shape": [3, 0]}]), "shape [3, 0]"),
    (dict(blocks="lora_A"), "no list of blocks"),
    (dict(dtype="int8"), "dtype 'int8'"),
    (dict(fingerprints=["m"]), "no mapping of fingerprints"),
])
def test_a_bad_manifest_is_one_clear_refusal(tmp_path, edit, words):
    path = tmp_path / "s"
    fill(path, make_grads(10))
    _edit_manifest(path, **edit)
    before = folder_hashes(path)
    with pytest.raises(DataInfError) as err:
        GradientStore.open(path)
    assert words in str(err.value) and "manifest.json" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataInfError):
        GradientStore.create(path, blocks=SHAPES, n_examples=10, fingerprints=FPS, chunk_size=4)
    assert folder_hashes(path) == before


def test_records_are_checked_against_their_checksum(tmp_path):
    path = tmp_path / "s"
    with GradientStore.create(path, blocks={"w": (2,)}, n_examples=2, fingerprints=FPS, chunk_size=2) as store:
        store.write_chunk(0, {"w": torch.ones(2, 2)})
        store.write_records([{"text": "a"}, {"text": "b"}])
        store.finalize()
    assert GradientStore.open(path).records() == [{"text": "a"}, {"text": "b"}]
    (path / "records.jsonl").write_text('{"text": "b"}\n{"text": "a"}\n')
    with pytest.raises(DataInfError, match="records.jsonl does not match its sha256 checksum"):
        GradientStore.open(path).records()


def test_a_refused_first_chunk_leaves_no_store_behind(tmp_path):
    path = tmp_path / "new"
    store = GradientStore.create(path, blocks={"w": (2,)}, n_examples=4, fingerprints=FPS, chunk_size=2)
    assert store.discard_if_unused() and not path.exists()
    existing = tmp_path / "old"
    fill(existing, make_grads(10))
    before = folder_hashes(existing)
    store = GradientStore.create(existing, blocks=SHAPES, n_examples=10, fingerprints=FPS, chunk_size=4)
    assert not store.discard_if_unused()  # not made by this run: kept
    store.close()
    assert folder_hashes(existing) == before


_TAKEOVER = """
import sys, time
from datainf import store as st
from datainf.store import locking
from datainf.errors import DataInfError
real = locking._pid_alive
def slow(pid):  # widen the window between seeing the stale lock and taking it
    time.sleep(0.05)
    return real(pid)
locking._pid_alive = slow
path, go = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, go - time.time()))
try:
    s = st.GradientStore.create(path, blocks={"w": (2,)}, n_examples=4, fingerprints={"model": "m"}, chunk_size=2)
except DataInfError as e:
    print("refused" if "being written by process" in str(e) else f"other: {e}", flush=True)
else:
    print("took", flush=True)
    time.sleep(1.5)  # hold it while the others try
    s.close()
"""


def test_two_writers_never_both_take_over_a_stale_lock(tmp_path):
    """Issue 17, defect 9: writers racing for a stale lock; exactly one wins every trial."""
    import time

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for trial in range(4):
        path = tmp_path / f"s{trial}"
        GradientStore.create(path, blocks={"w": (2,)}, n_examples=4, fingerprints={"model": "m"},
                             chunk_size=2).close()
        (path / "lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "token": "x"}))
        go = time.time() + 4.0  # every process is started and importing by then
        procs = [subprocess.Popen([sys.executable, "-c", _TAKEOVER, str(path), str(go)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env) for _ in range(3)]
        outcomes = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
        assert outcomes == ["refused", "refused", "took"], (trial, outcomes, [p.returncode for p in procs])
