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
    import datainf.store as store_module

    real_map = store_module._map_npy

    def spy(file, *args, **kwargs):  # every memory map the reads make (np.load is only the fallback)
        mapped = real_map(file, *args, **kwargs)
        calls.append((Path(file).parent.name, Path(file).name, "r" if mapped is not None else None))
        return mapped

    monkeypatch.setattr("datainf.store._map_npy", spy)
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
