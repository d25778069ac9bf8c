"""Issue 32, the warm one-query pass: a second pass in the same process reuses the memory maps of the chunk
files it verified (kept by their stamp: size, mtime, ctime, inode, device), and DataInf's fitted state is
trusted by its verified stamp instead of being hashed on every call. Neither may weaken integrity: a file
changed after it was mapped or stamped is checked again and refused (or, for a damaged state, set aside and
fitted again), and the scores stay equal to the float64 sums written out here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from datainf import fitted as fitted_module
from datainf.errors import DataInfError
from datainf.estimators import ScoreArguments
from datainf.scoring import score_store
from datainf.store import GradientStore
from datainf.store import gradient_store as gradient_store_module
from datainf.store import reader as reader_module
from datainf.store.files import file_stamp
from stores import flip_byte, write_store
from test_one_pass import CHUNK, SHAPES, N, datainf_reference, flat, gradients


@pytest.fixture()
def settled(monkeypatch):
    """Files written just now count as settled (no 2 s wait), maps are kept, and none from another test."""
    for module in (reader_module, gradient_store_module, fitted_module):
        monkeypatch.setattr(module, "STAMP_MARGIN_S", 0.0)
    monkeypatch.setattr(reader_module, "MAX_CACHED_MAPS", 1000)  # off by default (memory caps): on here
    reader_module.forget_maps()
    yield
    reader_module.forget_maps()


def identity_reference(grads: dict, queries: dict) -> torch.Tensor:
    return sum(-(flat(grads[k]) @ flat(queries[k]).T) for k in SHAPES)


def chunk_file(root: Path, chunk: int, block: int) -> Path:
    return root / "chunks" / f"{chunk:05d}" / f"b{block:04d}.npy"


def test_a_second_pass_reuses_the_maps_and_refuses_a_file_changed_since(tmp_path, settled, monkeypatch):
    grads, queries = gradients(), gradients(2, seed=1)
    write_store(tmp_path / "s", grads, chunk_size=CHUNK, dtype="float64")
    arguments = ScoreArguments(method="identity")
    first = score_store(GradientStore.open(tmp_path / "s"), queries, arguments)
    torch.testing.assert_close(first.scores, identity_reference(grads, queries), rtol=1e-12, atol=1e-12)
    block_files = {str(chunk_file(tmp_path / "s", c, b)) for c in range(-(-N // CHUNK)) for b in range(len(SHAPES))}
    assert block_files <= set(reader_module._MAPS)  # every block file kept by its stamp

    maps: list[str] = []  # a second pass in this process maps no file again
    real = gradient_store_module.map_npy
    monkeypatch.setattr(gradient_store_module, "map_npy", lambda path, *a, **k: maps.append(path) or real(path, *a, **k))
    again = score_store(GradientStore.open(tmp_path / "s"), queries, arguments)
    assert maps == []
    torch.testing.assert_close(again.scores, first.scores, rtol=0, atol=0)

    target = chunk_file(tmp_path / "s", 2, 0)  # change one entry in place: same size, same inode
    data = bytearray(target.read_bytes())
    data[-3] ^= 0x40
    target.write_bytes(bytes(data))
    with pytest.raises(DataInfError, match=r"chunk 2 .*b0000\.npy does not match its sha256"):
        score_store(GradientStore.open(tmp_path / "s"), queries, arguments)
    # the map kept under the old stamp is never served for the changed file (and is dropped on the lookup)
    assert reader_module.cached_map(str(target), file_stamp(os.stat(target))) is None
    assert str(target) not in reader_module._MAPS


def test_the_fitted_state_is_trusted_by_its_stamp_until_it_changes(tmp_path, settled, monkeypatch):
    grads, queries = gradients(), gradients(2, seed=1)
    write_store(tmp_path / "s", grads, chunk_size=CHUNK, dtype="float64")
    arguments = ScoreArguments(method="datainf")
    state = tmp_path / "s" / "fitted-datainf.safetensors"
    record = tmp_path / "s" / "verified" / f"{state.name}.json"
    score_store(GradientStore.open(tmp_path / "s"), queries, arguments)  # fits and caches the state
    assert state.is_file() and not record.exists()  # a state just fitted is not read back, so not stamped

    hashed: list[int] = []
    real = fitted_module.state_digest
    monkeypatch.setattr(fitted_module, "state_digest", lambda *a: hashed.append(1) or real(*a))
    second = score_store(GradientStore.open(tmp_path / "s"), queries, arguments)
    assert second.diagnostics["curvature_fit"]["cached"] and len(hashed) == 1 and record.is_file()
    third = score_store(GradientStore.open(tmp_path / "s"), queries, arguments)
    assert third.diagnostics["curvature_fit"]["cached"] and len(hashed) == 1  # trusted by its stamp: not hashed

    expected = sum(datainf_reference(flat(grads[k]), flat(queries[k]), third.damping[k]) for k in SHAPES)
    for result in (second, third):
        torch.testing.assert_close(result.scores, expected, rtol=1e-10, atol=1e-12 * float(expected.abs().max()))

    data = bytearray(state.read_bytes())  # damage one byte of the tensors: the stamp no longer matches
    data[-5] ^= 0x10
    state.write_bytes(bytes(data))
    fourth = score_store(GradientStore.open(tmp_path / "s"), queries, arguments)
    assert len(hashed) == 3  # hashed again (found damaged), then once more to save the state fitted again
    assert not fourth.diagnostics["curvature_fit"]["cached"]  # set aside and fitted again
    assert list((tmp_path / "s").glob(f".{state.name}.corrupt-*"))
    torch.testing.assert_close(fourth.scores, expected, rtol=1e-10, atol=1e-12 * float(expected.abs().max()))


@pytest.mark.parametrize("dtype", ["float64", "float16"])
def test_a_pass_shared_out_among_threads_scores_as_one_thread_and_refuses_a_damaged_file(tmp_path, monkeypatch,
                                                                                         dtype):
    """With more than one torch thread the spans of a pass go to worker threads that read their rows with
    pread (not memory maps): the scores equal the float64 sums (float64 store) or one thread's scores of the
    same store bit for bit (float16: each span's sums are in the same order), every block file is read that
    way, a file damaged in the last chunk is refused by name, a refusal raised inside a worker reaches the
    caller, and the caller's torch thread count is as it was."""
    from datainf.estimators import blocks as blocks_module

    grads, queries = gradients(), gradients(2, seed=1)
    write_store(tmp_path / "s", grads, chunk_size=CHUNK, dtype=dtype)
    arguments = ScoreArguments(method="identity")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = score_store(GradientStore.open(tmp_path / "s"), queries, arguments).scores
        torch.set_num_threads(3)
        monkeypatch.setattr(blocks_module, "MAX_PASS_WORKERS", 3)
        reads: list[tuple[int, str]] = []
        real = GradientStore.read_rows
        monkeypatch.setattr(GradientStore, "read_rows",
                            lambda self, c, f, *a: reads.append((c, f)) or real(self, c, f, *a))
        shared = score_store(GradientStore.open(tmp_path / "s"), queries, arguments).scores
        assert torch.get_num_threads() == 3
        chunks = -(-N // CHUNK)
        assert chunks >= 3 and {(c, f"b{b:04d}.npy") for c in range(chunks) for b in range(len(SHAPES))} == set(reads)
        if dtype == "float64":
            torch.testing.assert_close(shared, identity_reference(grads, queries), rtol=1e-12, atol=1e-12)
        assert torch.equal(shared, alone)
        target = chunk_file(tmp_path / "s", chunks - 1, 1)
        data = bytearray(target.read_bytes())
        data[-2] ^= 0x10
        target.write_bytes(bytes(data))
        with pytest.raises(DataInfError, match=rf"chunk {chunks - 1} .*b0001\.npy does not match its sha256"):
            score_store(GradientStore.open(tmp_path / "s"), queries, arguments)
        assert torch.get_num_threads() == 3
        # a refusal raised inside a worker (here: the pread of the last chunk's first block) reaches the caller
        def refuse(self, c, f, *a):
            if c == chunks - 1:
                raise DataInfError(f"chunk {c} refused in a worker")
            return real(self, c, f, *a)

        monkeypatch.setattr(GradientStore, "read_rows", refuse)
        target.write_bytes(bytes(data[:-2] + bytes([data[-2] ^ 0x10]) + data[-1:]))  # the file as written
        with pytest.raises(DataInfError, match=rf"chunk {chunks - 1} refused in a worker"):
            score_store(GradientStore.open(tmp_path / "s"), queries, arguments)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_a_chunk_read_ahead_as_one_job_raises_each_files_problem_when_that_file_is_read(tmp_path):
    """prefetch_chunk (a pass's read-ahead of a whole chunk folder, one background job): a damaged file's
    refusal is raised by the read of that file, by name, and not by the reads of the chunk's other files."""
    grads = gradients()
    write_store(tmp_path / "s", grads, chunk_size=CHUNK, dtype="float32")
    damaged = chunk_file(tmp_path / "s", 1, 0)
    flip_byte(damaged, -1)
    store = GradientStore.open(tmp_path / "s")
    files = [store.block_file(name) for name in SHAPES]
    store.prefetch_chunk(1, files)
    for name, f in zip(SHAPES, files):
        if f != damaged.name:
            got = torch.from_numpy(store.mapped(1, f).astype("float64"))
            torch.testing.assert_close(got, flat(grads[name])[CHUNK : 2 * CHUNK].float().double(), rtol=0, atol=0)
    with pytest.raises(DataInfError, match=rf"chunk 1 .*{damaged.name} does not match its sha256"):
        store.mapped(1, damaged.name)


def test_a_first_read_hashes_each_file_within_the_pass_not_in_a_pass_before_it(tmp_path, monkeypatch):
    """With no verified stamps (a store just written), each chunk file is hashed once, by the read-ahead of the
    pass: when the first rows are read, at most the chunk folders read ahead (3 of 5 on one thread) have been
    hashed, not every file (the stored norms used before the pass no longer hash the rows' files first). The
    scores equal the float64 sums; Hessian-free self-influence, answered from the norms alone, still checks
    the rows (a damaged block is refused)."""
    from datainf.store.blocks import StoredBlock
    from test_one_pass import counting_digests

    seen = counting_digests(monkeypatch)
    grads = gradients()
    write_store(tmp_path / "s", grads, chunk_size=CHUNK, dtype="float32")
    queries = gradients(1, seed=1)
    hashed_at_first_read: list[int] = []
    real_read = StoredBlock.read_into

    def read_into(self, rows, out, staging=None):
        if not hashed_at_first_read:
            hashed_at_first_read.append(len({p.parent for p in seen if p.name != "sq_norms.npy"}))
        return real_read(self, rows, out, staging=staging)

    monkeypatch.setattr(StoredBlock, "read_into", read_into)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got = score_store(GradientStore.open(tmp_path / "s"), queries, ScoreArguments(method="identity")).scores
    finally:
        torch.set_num_threads(before)
    files = sorted((tmp_path / "s" / "chunks").rglob("*.npy"))
    assert sorted(seen) == files  # every file hashed, each once
    assert hashed_at_first_read and hashed_at_first_read[0] <= 3, hashed_at_first_read
    expected = identity_reference({k: v.float().double() for k, v in grads.items()}, queries)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))

    damaged = chunk_file(tmp_path / "s", 2, 1)
    flip_byte(damaged, -1)
    with pytest.raises(DataInfError, match=rf"chunk 2 .*{damaged.name} does not match its sha256"):
        score_store(GradientStore.open(tmp_path / "s"), None, ScoreArguments(method="identity"))


def test_the_read_ahead_skips_a_chunk_in_memory_whose_checks_need_no_hash(tmp_path, monkeypatch):
    """prefetch_chunk starts no background job for a chunk folder whose files are in the page cache and whose
    checks need no sha256 pass (verified stamps recorded); it still does when a file would need hashing or
    is not in memory."""
    monkeypatch.setattr(reader_module, "STAMP_MARGIN_S", 0.0)
    write_store(tmp_path / "s", gradients(), chunk_size=CHUNK, dtype="float32")
    queries = gradients(1, seed=1)
    score_store(GradientStore.open(tmp_path / "s"), queries, ScoreArguments(method="identity"))  # records stamps
    files = [GradientStore.open(tmp_path / "s").block_file(name) for name in SHAPES]

    def asks(resident: bool, stamps: bool = True) -> bool:
        monkeypatch.setattr(reader_module.StoreReader, "_in_page_cache", lambda self, index, names: resident)
        store = GradientStore.open(tmp_path / "s")
        if not stamps:
            store._stamps[1] = {}  # as if chunk 1 had never been verified
        store.prefetch_chunk(1, files)
        return bool(store._fetching)

    assert not asks(resident=True)
    assert asks(resident=False)
    assert asks(resident=True, stamps=False)


def test_the_page_cache_probe_sees_an_evicted_file(tmp_path):
    """_in_page_cache: True for files just read, False once their pages are dropped (where the file system
    honours POSIX_FADV_DONTNEED and RWF_NOWAIT; skipped elsewhere)."""
    write_store(tmp_path / "s", gradients(), chunk_size=CHUNK, dtype="float32")
    store = GradientStore.open(tmp_path / "s")
    files = [store.block_file(name) for name in SHAPES]
    paths = [tmp_path / "s" / "chunks" / "00001" / f for f in files]
    for p in paths:
        p.read_bytes()
    if not store._in_page_cache(1, files):
        pytest.skip("this file system does not answer RWF_NOWAIT reads")
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    if any(_resident(p) for p in paths):
        pytest.skip("this file system keeps the pages after POSIX_FADV_DONTNEED")
    assert not store._in_page_cache(1, files)
    for p in paths:
        p.read_bytes()
    assert all(_resident(p) for p in paths) and store._in_page_cache(1, files)  # read again: both see them


def _resident(path: Path) -> bool:
    """Whether any page of ``path`` is in the page cache, asked with ``mincore`` on a private map of it (an
    independent probe that reads nothing: a non-blocking read of an absent byte starts the kernel's read-ahead,
    which brought the pages back before the probe under test looked, and made this test flaky)."""
    import ctypes
    import mmap

    size = path.stat().st_size
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    try:
        anchor = ctypes.c_char.from_buffer(mm)
        vec = (ctypes.c_ubyte * ((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE))()
        failed = libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vec) != 0
        del anchor  # the map cannot close while a ctypes object holds its buffer
        if failed:
            raise OSError(ctypes.get_errno(), "mincore failed")
        return any(v & 1 for v in vec)
    finally:
        mm.close()


def test_pass_workers_hash_the_bytes_they_read_on_a_first_read(tmp_path, monkeypatch):
    """Two pass workers, no verified stamps: each block file is hashed once, from the bytes the worker read
    into its staging buffer (no file_digest, i.e. no second read of the file); the scores equal the float64
    sums; a file damaged before the first read is refused by name, and nothing is returned."""
    seen_files: list[Path] = []
    real_digest = reader_module.file_digest
    monkeypatch.setattr(reader_module, "file_digest", lambda p: (seen_files.append(Path(p)), real_digest(p))[1])
    monkeypatch.setattr(reader_module, "MAX_CACHED_MAPS", 0)
    hashed: list[str] = []
    real_verify = reader_module.StoreReader._verify

    def verify(self, index, file, path, before=None, digest=None):
        if digest is not None:
            own = digest

            def digest() -> str:
                hashed.append(f"{index}/{file}")
                return own()
        return real_verify(self, index, file, path, before, digest)

    monkeypatch.setattr(reader_module.StoreReader, "_verify", verify)
    grads = gradients()
    write_store(tmp_path / "s", grads, chunk_size=CHUNK, dtype="float32")
    queries = gradients(1, seed=1)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = score_store(GradientStore.open(tmp_path / "s"), queries, ScoreArguments(method="identity")).scores
        store = GradientStore.open(tmp_path / "s")
        block_files = {f"{c}/{store.block_file(n)}" for c in range(store.num_chunks) for n in SHAPES}
        assert sorted(hashed) == sorted(block_files)  # each block file once, by the worker that read it
        assert all(p.name == "sq_norms.npy" for p in seen_files)  # only the norms' files read a second way
        expected = identity_reference({k: v.float().double() for k, v in grads.items()}, queries)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))

        write_store(tmp_path / "t", grads, chunk_size=CHUNK, dtype="float32")
        damaged = chunk_file(tmp_path / "t", 3, 2)
        flip_byte(damaged, -3)
        with pytest.raises(DataInfError, match=rf"chunk 3 .*{damaged.name} does not match its sha256"):
            score_store(GradientStore.open(tmp_path / "t"), queries, ScoreArguments(method="identity"))
    finally:
        torch.set_num_threads(before)


def test_pass_workers_trust_the_header_of_a_file_whose_stamp_matches_and_read_it_otherwise(tmp_path, settled,
                                                                                          monkeypatch):
    """A file whose bytes matched their recorded sha256 (here: by its verified stamp, in a fresh store object) has
    the header this store wrote, so the workers take its rows at ``size - rows x row bytes`` without reading the
    header: the scores still equal the float64 sums. With checksums off nothing vouches for the header, and it is
    read for every block file."""
    monkeypatch.setattr(reader_module, "MAX_CACHED_MAPS", 0)
    headers: list[int] = []
    real = gradient_store_module.npy_data_offset
    monkeypatch.setattr(gradient_store_module, "npy_data_offset", lambda fd, *a: headers.append(fd) or real(fd, *a))
    grads, queries = gradients(), gradients(2, seed=1)
    write_store(tmp_path / "s", grads, chunk_size=CHUNK, dtype="float64")
    expected = identity_reference(grads, queries)
    arguments = ScoreArguments(method="identity")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first = score_store(GradientStore.open(tmp_path / "s"), queries, arguments).scores  # hashes, stamps
        assert GradientStore.open(tmp_path / "s")._recorded(0)  # the stamps this test relies on were recorded
        headers.clear()
        stamped = score_store(GradientStore.open(tmp_path / "s"), queries, arguments).scores
        assert headers == []
        unchecked = score_store(GradientStore.open(tmp_path / "s", checksums=False), queries, arguments).scores
        chunks = -(-N // CHUNK)
        assert len(headers) == chunks * len(SHAPES)
    finally:
        torch.set_num_threads(before)
    for got in (first, stamped, unchecked):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
