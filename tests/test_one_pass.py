"""Issue 32, the one-query pass at the disk's speed: the scores of every block that is scored ``-G R^T`` come
from one sweep over the store, chunk folder after chunk folder (the order its files lie on disk), with the next
chunks' files read ahead in a background thread; each chunk file's sha256 is checked once and recorded as a
verified stamp (size, mtime, ctime, inode, device) that any change to the file voids.

Each result is compared with an independent computation (float64 sums written out here, the read order a
recording row source saw, the number of sha256 computations), and each refusal is asserted as the CLI gives it
(exit 2, one `error:` line naming the chunk and file, the inputs unchanged, nothing written)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from cli_helpers import hashes, refused
from cli_helpers import run_cli as run
from datainf.errors import DataInfError
from datainf.estimators import BlockRows, ScoreArguments
from datainf.estimators.kfac import curvature_from_state
from datainf.fitted import fitted_state
from datainf.scoring import load_scores, score_store
from datainf.store import GradientStore
from datainf.store import reader as reader_module
from stores import flip_byte, write_store

SHAPES = {"w": (4, 5), "b": (3,), "v": (2, 6)}
N, CHUNK = 37, 8  # five chunk folders, the last one short


def gradients(n: int = N, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(n, *s, generator=g, dtype=torch.float64) * (0.5 + i)
            for i, (k, s) in enumerate(SHAPES.items())}


def flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def datainf_reference(G: torch.Tensor, V: torch.Tensor, lam: float) -> torch.Tensor:
    """One block's DataInf scores in float64, from its closed form: (1/lam)(I - (1/n) sum_i g_i g_i^T /
    (lam + ||g_i||^2)), applied to the queries, dotted with every training row, negated."""
    n, d = G.shape
    M = torch.eye(d, dtype=torch.float64)
    for g in G:
        M -= torch.outer(g, g) / (n * (lam + float(g @ g)))
    return -(G @ (M / lam) @ V.T)


@pytest.mark.parametrize("method", ["identity", "datainf", "ekfac"])
def test_the_one_sweep_scores_as_a_float64_reference(tmp_path, method):
    """identity, DataInf with its cached d x d state and EK-FAC with its cached curvature: the store's one
    sweep (float64 store, so float64 throughout) equals the per-block sum written out here."""
    grads = gradients()
    store = write_store(tmp_path / "s", grads, chunk_size=CHUNK, dtype="float64")
    queries = gradients(2, seed=1)
    arguments = ScoreArguments(method=method)
    score_store(store, queries, arguments)  # fits and caches the state
    result = score_store(GradientStore.open(tmp_path / "s"), queries, arguments)
    if method != "identity":
        assert result.diagnostics["curvature_fit"]["cached"]
    expected = torch.zeros(N, 2, dtype=torch.float64)
    for name in SHAPES:
        G, V = flat(grads[name]), flat(queries[name])
        lam = result.damping.get(name)
        if method == "identity":
            expected += -(G @ V.T)
        elif method == "datainf":
            assert lam == pytest.approx(0.1 * float((G * G).sum(dim=1).mean()) / G.shape[1], rel=1e-12)
            expected += datainf_reference(G, V, lam)
        else:
            curvature = curvature_from_state(fitted_state(GradientStore.open(tmp_path / "s"), arguments))
            expected += -(G @ curvature.inverse_hvp(name, V, "ekfac", damping=lam).T)
    assert result.scores.dtype == torch.float64
    torch.testing.assert_close(result.scores, expected, rtol=1e-10, atol=1e-12 * float(expected.abs().max()))


class Recording:
    """A row source over a tensor that records every read and every prefetch, in order."""

    def __init__(self, name: str, t: torch.Tensor, log: list, chunk_rows: int):
        self.name, self.t, self.log, self.chunk_rows = name, t, log, chunk_rows
        self.shape, self.dtype = tuple(t.shape), t.dtype

    def __getitem__(self, rows: slice) -> torch.Tensor:
        self.log.append(("read", self.name, rows.start, rows.stop))
        return self.t[rows]

    def prefetch(self, rows: slice) -> None:
        self.log.append(("prefetch", self.name, rows.start, rows.stop))


def test_the_sweep_reads_chunk_after_chunk_and_prefetches_ahead():
    """stream_dots reads every block's rows of one span (the sources' chunk_rows) before the next span,
    asks for the next two spans ahead of each read, and sums to the float64 products."""
    from datainf.estimators.blocks import stream_dots

    grads, log = gradients(), []
    parts, expected = [], torch.zeros(N, 3, dtype=torch.float64)
    for name, g in grads.items():
        G = flat(g)
        R = torch.randn(3, G.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(len(name)))
        parts.append((BlockRows(name, Recording(name, G, log, CHUNK), torch.float64, torch.device("cpu"), 4096), R))
        expected += G @ R.T
    out = stream_dots(parts)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    reads = [(e[2], e[1]) for e in log if e[0] == "read"]
    spans = [(s, min(s + CHUNK, N)) for s in range(0, N, CHUNK)]
    assert reads == [(s, name) for s, _ in spans for name in SHAPES]  # chunk by chunk, every block in turn
    for i, (start, _) in enumerate(spans):  # when chunk i is read, chunks i+1 and i+2 were asked for already
        first_read = log.index(("read", "w", start, min(start + CHUNK, N)))
        asked = {e[2] for e in log[:first_read] if e[0] == "prefetch"}
        assert {s for s, _ in spans[i : i + 3]} <= asked, (i, asked)


def counting_digests(monkeypatch) -> list[Path]:
    """Record every sha256 computation of a chunk file: each check that hashed the file's bytes (the reader's
    file_digest, or a pass worker hashing the bytes it read, both through StoreReader._verify, which says
    whether it hashed)."""
    seen: list[Path] = []
    real_digest, real_verify = reader_module.file_digest, reader_module.StoreReader._verify

    def file_digest(path: Path) -> str:
        seen.append(Path(path))
        return real_digest(path)

    def verify(self, index, file, path, before=None, digest=None):
        if digest is not None:
            own = digest

            def digest() -> str:
                seen.append(Path(path))
                return own()
        return real_verify(self, index, file, path, before, digest)

    monkeypatch.setattr(reader_module, "file_digest", file_digest)
    monkeypatch.setattr(reader_module.StoreReader, "_verify", verify)
    monkeypatch.setattr(reader_module, "STAMP_MARGIN_S", 0.0, raising=False)  # files written just now count as settled
    return seen


def test_a_verified_stamp_skips_the_hash_until_the_file_changes(tmp_path, monkeypatch):
    """The first pass hashes every chunk file once and records stamps; a fresh open then hashes none and
    scores the same; a byte changed in place (its mtime set back) voids the stamp: refused, file named."""
    seen = counting_digests(monkeypatch)
    grads = gradients()
    write_store(tmp_path / "s", grads, chunk_size=CHUNK, dtype="float32")
    queries = gradients(1, seed=1)
    arguments = ScoreArguments(method="identity")
    first = score_store(GradientStore.open(tmp_path / "s"), queries, arguments).scores
    files = sorted((tmp_path / "s" / "chunks").rglob("*.npy"))
    assert sorted(seen) == files  # each once: the pass and the stored norms' check share it
    records = sorted((tmp_path / "s" / "verified").glob("*.json"))
    assert [p.name for p in records] == [f"{c:05d}.json" for c in range(5)]
    seen.clear()
    again = score_store(GradientStore.open(tmp_path / "s"), queries, arguments).scores
    assert seen == [] and torch.equal(again, first)
    expected = -sum(flat(grads[k]).float().double() @ flat(queries[k]).T for k in SHAPES)
    torch.testing.assert_close(again.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))

    target = tmp_path / "s" / "chunks" / "00003" / "b0001.npy"
    st = os.stat(target)
    flip_byte(target, -2)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: only ctime tells
    assert os.stat(target).st_mtime_ns == st.st_mtime_ns and os.stat(target).st_size == st.st_size
    with pytest.raises(DataInfError, match=r"chunk 3 .*b0001.npy does not match its sha256 checksum"):
        score_store(GradientStore.open(tmp_path / "s"), queries, arguments)
    assert seen == [target]


def query_store(path: Path) -> GradientStore:
    return write_store(path, gradients(2, seed=1), chunk_size=CHUNK, dtype="float32")


@pytest.mark.parametrize("method", ["identity", "datainf"])
def test_a_file_changed_after_its_stamp_is_refused_by_score(tmp_path, capsys, monkeypatch, method):
    """`datainf score` after a verified pass, with a file of chunk 2 changed in place and its mtime set back:
    exit 2, one error line naming the chunk and file, no scores written, the stores unchanged (a refused call
    records no stamp); a correct score afterwards on a sound store still records them."""
    counting_digests(monkeypatch)
    write_store(tmp_path / "s", gradients(), chunk_size=CHUNK, dtype="float32")
    query_store(tmp_path / "q")
    argv = ["score", "--store", str(tmp_path / "s"), "--queries", str(tmp_path / "q"), "--method", method]
    code, _, err = run([*argv, "--out", str(tmp_path / "first.safetensors")], capsys)
    assert code == 0, err
    assert len(list((tmp_path / "s" / "verified").glob("*.json"))) == 5
    target = tmp_path / "s" / "chunks" / "00002" / "b0000.npy"
    st = os.stat(target)
    data = bytearray(target.read_bytes())
    data[-1] ^= 0x40
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    before = hashes(tmp_path / "s", tmp_path / "q")
    out = tmp_path / "second.safetensors"
    refused([*argv, "--out", str(out)], capsys, "chunk 2", "b0000.npy", "sha256")
    assert not out.exists() and hashes(tmp_path / "s", tmp_path / "q") == before
    stamp = json.loads((tmp_path / "s" / "verified" / "00002.json").read_text())
    assert stamp["files"]["b0000.npy"][2] != os.stat(target).st_ctime_ns  # the stale stamp was kept, not renewed
    data[-1] ^= 0x40  # the bytes restored: the file is sound again, and scored as before
    target.write_bytes(bytes(data))
    code, _, err = run([*argv, "--out", str(out)], capsys)
    assert code == 0, err
    first = load_scores(tmp_path / "first.safetensors").scores[method]
    assert torch.equal(load_scores(out).scores[method], first)
