"""Issue 33, store integrity: an interrupted `store precondition` resumes (defect 6), a full disk is one
`error:` line and a resumable store (10a), 16-bit stores refuse what underflows and `verify` agrees with the
writer (8), the curvature cache inside a store is checksummed (9), and gradients far outside float32's
range are scored exactly (rescaled by powers of two) or refused with the true cause (13).

Each test reproduces the defect's input and asserts the refusal (exit 2, one `error:` line, the key words,
the inputs unchanged) or, where the defect was a wrong success, the right result against an independent
computation (an uninterrupted run, a float64 solve)."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from cli_helpers import (  # noqa: E402
    hashes,
    refused,
    write_jsonl,  # noqa: E402
)
from cli_helpers import run_cli as run  # noqa: E402
from datainf.errors import DataInfError  # noqa: E402
from datainf.estimators import ScoreArguments, method_names  # noqa: E402
from datainf.scoring import CURVATURE_FILE, precondition_store, score_store  # noqa: E402
from datainf.store import GradientStore  # noqa: E402
from datainf.store import gradient_store as gradient_store_module  # noqa: E402
from reference import FLOAT32_TOL, assert_close_to  # noqa: E402
from stores import write_store  # noqa: E402

SHAPES = {"w": (6, 10), "b": (6,)}


def make_store(path: Path, n: int = 40, *, scale: float = 1.0, dtype: str = "float32", seed: int = 0,
               chunk_size: int = 8, grads: dict | None = None) -> tuple[GradientStore, dict[str, torch.Tensor]]:
    """A finished store of seeded random gradients (float64 values times ``scale``, stored as ``dtype``)."""
    if grads is None:
        g = torch.Generator().manual_seed(seed)
        grads = {k: torch.randn(n, *s, generator=g, dtype=torch.float64) * (0.1 + i) * scale
                 for i, (k, s) in enumerate(SHAPES.items())}
    return write_store(path, grads, chunk_size=chunk_size, dtype=dtype), grads


def same_store(a: Path, b: Path) -> None:
    """Two finished stores hold the same gradients (bit for bit), records and preconditioning."""
    sa, sb = GradientStore.open(a), GradientStore.open(b)
    assert sa.block_names == sb.block_names and sa.complete and sb.complete
    for name in sa.block_names:
        assert torch.equal(sa.load(name), sb.load(name)), name
    assert sa.records() == sb.records()
    pa, pb = sa.manifest["meta"]["preconditioned"], sb.manifest["meta"]["preconditioned"]
    assert (pa["method"], pa["damping"], pa["scale"]) == (pb["method"], pb["damping"], pb["scale"])


def staging_of(out: Path) -> list[Path]:
    return list(out.parent.glob(f".{out.name}.staging-*"))


# --------------------------------------------------------------------------------------------------
# defect 6: an interrupted `store precondition` resumes from the same command
# --------------------------------------------------------------------------------------------------

_KILLED = """
import sys, time
import datainf.scoring as scoring
from datainf.store import GradientStore
from datainf.cli import main
where = sys.argv[3]
if where == "staging":
    real = scoring._stage_encode
    calls = []
    def stage(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # two chunks of the first block staged
            print("hanging", flush=True)
            time.sleep(600)
        return real(*args, **kwargs)
    scoring._stage_encode = stage
else:
    real = GradientStore.write_chunk
    def write(self, index, grads):
        if index == 2:  # chunks 0 and 1 of OUT written
            print("hanging", flush=True)
            time.sleep(600)
        return real(self, index, grads)
    GradientStore.write_chunk = write
main(["--quiet", "store", "precondition", "--method", "ekfac", sys.argv[1], sys.argv[2]])
"""


def _kill_mid_run(source: Path, out: Path, where: str) -> int:
    proc = subprocess.Popen([sys.executable, "-c", _KILLED, str(source), str(out), where], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert proc.stdout.readline().strip() == "hanging"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    return proc.pid


@pytest.mark.parametrize("where", ["staging", "writing"])
def test_a_killed_precondition_is_finished_by_the_same_command(tmp_path, capsys, where):
    torch.set_num_threads(1)
    make_store(tmp_path / "s")
    reference = tmp_path / "reference"
    code, _, err = run(["store", "precondition", "--method", "ekfac", str(tmp_path / "s"), str(reference)], capsys)
    assert code == 0, err
    out = tmp_path / "pre"
    pid = _kill_mid_run(tmp_path / "s", out, where)
    left = staging_of(out)
    assert [p.name for p in left] == [f".pre.staging-{pid}"]  # what the kill leaves: the staged rows
    if where == "writing":
        assert sorted(p.name for p in (out / "chunks").iterdir() if not p.name.startswith(".")) == ["00000", "00001"]
        before = {c: (out / "chunks" / c / "b0000.npy").stat().st_ino for c in ("00000", "00001")}
    source = hashes(tmp_path / "s")
    code, _, err = run(["store", "precondition", "--method", "ekfac", str(tmp_path / "s"), str(out)], capsys)
    assert code == 0, err
    assert staging_of(out) == [] and not (out / "lock").exists()
    same_store(out, reference)
    if where == "writing":  # resumed: the chunks the killed run wrote are kept, not rewritten
        assert {c: (out / "chunks" / c / "b0000.npy").stat().st_ino for c in ("00000", "00001")} == before
    assert hashes(tmp_path / "s") == source


def test_a_live_run_staging_there_and_foreign_folders_are_left_alone(tmp_path, capsys):
    make_store(tmp_path / "s")
    out = tmp_path / "pre"
    # a staging folder of a live process (this one's parent) and one that is not recognisably ours
    live = tmp_path / f".pre.staging-{os.getppid()}"
    (live / "b0000").mkdir(parents=True)
    (live / "b0000" / "00000.npy").write_bytes(b"x")
    refused(["store", "precondition", "--method", "identity", str(tmp_path / "s"), str(out)], capsys,
            f"being preconditioned by process {os.getppid()}")
    shutil.rmtree(live)
    foreign = tmp_path / ".pre.staging-999999999"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    code, _, err = run(["store", "precondition", "--method", "identity", str(tmp_path / "s"), str(out)], capsys)
    assert code == 0, err
    assert (foreign / "notes.txt").read_text() == "mine"


def test_an_out_folder_that_is_not_ours_is_refused_with_a_command_that_works(tmp_path, capsys):
    make_store(tmp_path / "s")
    out = tmp_path / "pre"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    before = hashes(out, tmp_path / "s")
    line = refused(["store", "precondition", "--method", "ekfac", str(tmp_path / "s"), str(out)], capsys,
                   "not a preconditioned store")
    assert f"datainf store precondition --method ekfac {tmp_path / 's'} NEW_FOLDER" in line
    assert hashes(out, tmp_path / "s") == before
    # an unfinished store of another method: the message names the command that finishes it
    code, _, _ = run(["store", "precondition", "--method", "datainf", str(tmp_path / "s"), str(tmp_path / "d")],
                     capsys)
    assert code == 0
    manifest = GradientStore.open(tmp_path / "d").manifest
    shutil.rmtree(tmp_path / "d" / "chunks" / "00003")
    gradient_store_module.atomic.write_json(tmp_path / "d" / "manifest.json", {**manifest, "complete": False})
    before = hashes(tmp_path / "d")
    line = refused(["store", "precondition", "--method", "ekfac", str(tmp_path / "s"), str(tmp_path / "d")], capsys,
                   "unfinished store preconditioned for datainf")
    assert f"datainf store precondition --method datainf --dtype float32 {tmp_path / 's'} {tmp_path / 'd'}" in line
    assert hashes(tmp_path / "d") == before
    code, _, err = run(["store", "precondition", "--method", "datainf", str(tmp_path / "s"), str(tmp_path / "d")],
                       capsys)
    assert code == 0, err
    assert GradientStore.open(tmp_path / "d").complete


def test_free_space_is_measured_on_the_disk_out_will_be_on(tmp_path, monkeypatch):
    store, _ = make_store(tmp_path / "s")
    asked = []
    real = shutil.disk_usage

    def usage(path):
        asked.append(Path(path))
        return real(path)._replace(free=10)

    monkeypatch.setattr(gradient_store_module.shutil, "disk_usage", usage)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = tmp_path / "new" / "deeper" / "pre"
    with pytest.raises(DataInfError, match="and the disk has 10 bytes free"):
        precondition_store(store, out, ScoreArguments(method="identity"))
    assert asked == [tmp_path]  # the nearest existing ancestor of OUT, not the current directory
    assert not (tmp_path / "new").exists()


# --------------------------------------------------------------------------------------------------
# defect 10a: a full disk during `grads` and `store precondition`
# --------------------------------------------------------------------------------------------------


def _fill_disk_at_chunk(monkeypatch, chunk: int) -> None:
    """Make the store's file writer fail with ENOSPC from the first file of chunk ``chunk`` on."""
    real = gradient_store_module.save_npy

    def save(path, array):
        if int(Path(path).parent.name.split(".")[1]) >= chunk:  # chunks/.NNNNN.tmp-PID/file.npy
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, array)

    monkeypatch.setattr(gradient_store_module, "save_npy", save)


def test_a_full_disk_during_precondition_is_one_line_and_resumable(tmp_path, capsys, monkeypatch):
    make_store(tmp_path / "s")
    argv = ["store", "precondition", "--method", "exact", str(tmp_path / "s")]
    code, _, err = run([*argv, str(tmp_path / "reference")], capsys)
    assert code == 0, err
    source = hashes(tmp_path / "s")
    with monkeypatch.context() as m:
        _fill_disk_at_chunk(m, 2)  # chunks 0 and 1 written, then a full disk
        refused([*argv, str(tmp_path / "pre")], capsys, "the disk is full", str(tmp_path / "pre"),
                "rerun the same command")
    assert staging_of(tmp_path / "pre") == []
    assert sorted(p.name for p in (tmp_path / "pre" / "chunks").iterdir()) == ["00000", "00001"]
    with monkeypatch.context() as m:  # the disk fills while staging: nothing staged is left behind
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        m.setattr("numpy.save", full)
        refused([*argv, str(tmp_path / "pre")], capsys, "the disk is full", "staging")
    assert staging_of(tmp_path / "pre") == []
    code, _, err = run([*argv, str(tmp_path / "pre")], capsys)
    assert code == 0, err
    same_store(tmp_path / "pre", tmp_path / "reference")
    assert hashes(tmp_path / "s") == source


def test_a_full_disk_during_grads_is_one_line_and_resumable(tmp_path, capsys, monkeypatch, tiny_bert_dir):
    from conftest import SENTENCES

    data = write_jsonl(tmp_path / "train.jsonl", [{"text": t, "label": y} for t, y in SENTENCES[:12]])
    adapter = tmp_path / "adapter"
    code, _, err = run(["finetune", "--model", str(tiny_bert_dir), "--train", str(data), "--out", str(adapter),
                        "--epochs", "1", "--batch-size", "4", "--device", "cpu"], capsys)
    assert code == 0, err
    argv = ["grads", "--model", str(tiny_bert_dir), "--adapter", str(adapter), "--data", str(data), "--chunk-size",
            "4", "--batch-size", "4"]
    inputs = hashes(tiny_bert_dir, adapter, data)
    with monkeypatch.context() as m:
        _fill_disk_at_chunk(m, 1)  # chunk 0 written, then a full disk
        line = refused([*argv, "--store", str(tmp_path / "store")], capsys, "the disk is full",
                       str(tmp_path / "store"), "rerun the same command")
    assert "Traceback" not in line
    chunks = tmp_path / "store" / "chunks"
    assert sorted(p.name for p in chunks.iterdir()) == ["00000"]  # kept; nothing half-written
    code, _, err = run([*argv, "--store", str(tmp_path / "store")], capsys)
    assert code == 0, err
    code, _, err = run([*argv, "--store", str(tmp_path / "reference")], capsys)
    assert code == 0, err
    a, b = GradientStore.open(tmp_path / "store"), GradientStore.open(tmp_path / "reference")
    for name in a.block_names:
        assert torch.equal(a.load(name), b.load(name)), name
    assert hashes(tiny_bert_dir, adapter, data) == inputs


# --------------------------------------------------------------------------------------------------
# defect 8: 16-bit stores refuse what underflows, and verify agrees with the writer
# --------------------------------------------------------------------------------------------------


def test_a_float16_store_of_tiny_gradients_is_refused_with_the_measured_loss(tmp_path):
    g = torch.Generator().manual_seed(0)
    grads = {"w": torch.randn(8, 6, 10, generator=g) * 3e-8, "b": torch.randn(8, 6, generator=g)}
    flat = grads["w"].reshape(8, -1)
    zeroed = float(((flat.half() == 0) & (flat != 0)).sum() / (flat != 0).sum())  # measured independently
    assert zeroed > 0.3
    with pytest.raises(DataInfError) as e:
        make_store(tmp_path / "s", dtype="float16", grads=grads)
    message = str(e.value)
    assert "block 'w'" in message and "underflows in float16" in message and f"{zeroed:.0%}" in message
    assert "--dtype float32" in message
    assert GradientStore.open(tmp_path / "s", allow_incomplete=True).missing_chunks() == [0]  # nothing written
    # the same gradients as float32 are stored and preconditioning them into float16 is refused too
    store, _ = make_store(tmp_path / "s32", grads=grads)
    with pytest.raises(DataInfError, match=r"block 'w', chunk 0: the preconditioned values underflow in float16.*--dtype float32"):
        precondition_store(store, tmp_path / "pre", ScoreArguments(method="identity"), dtype="float16")
    assert not (tmp_path / "pre").exists() and staging_of(tmp_path / "pre") == []


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_verify_accepts_every_16bit_store_the_writer_writes(tmp_path, capsys, dtype):
    """A normal store, and one with a few rows far smaller than the rest (their entries underflow, which
    costs the block nothing): the writer keeps both, and verify calls both ok."""
    g = torch.Generator().manual_seed(1)
    grads = {"w": torch.randn(16, 6, 10, generator=g), "b": torch.randn(16, 6, generator=g) * 1e-3}
    grads["w"][3] *= 1e-7
    grads["b"][5] *= 1e-6
    make_store(tmp_path / "s", dtype=dtype, grads=grads)
    code, out, err = run(["store", "verify", str(tmp_path / "s")], capsys)
    assert code == 0, err
    assert "ok" in out


# --------------------------------------------------------------------------------------------------
# defect 9: the curvature cache inside a store is checksummed
# --------------------------------------------------------------------------------------------------


def _tamper_eigenvalues(path: Path) -> None:
    """What the hostile test did: the corrected eigenvalues divided by 1e9, the file otherwise as written."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for k in tensors:
        if k.endswith("::corrected"):
            tensors[k] = tensors[k] * 1e-9
    save_file(tensors, str(path), metadata=meta)


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("tamper", [_tamper_eigenvalues, _flip_last_byte])
def test_a_tampered_curvature_cache_is_reported_and_never_used(tmp_path, capsys, tamper):
    store, grads = make_store(tmp_path / "s", dtype="float64")
    queries = {k: torch.randn(3, *v.shape[1:], dtype=torch.float64) for k, v in grads.items()}
    shutil.copytree(tmp_path / "s", tmp_path / "clean")
    first = score_store(store, queries, ScoreArguments(method="ekfac")).scores
    cache = tmp_path / "s" / CURVATURE_FILE
    assert cache.is_file()
    code, _, err = run(["store", "verify", str(tmp_path / "s")], capsys)
    assert code == 0, err
    tamper(cache)
    before = hashes(tmp_path / "s")
    refused(["store", "verify", str(tmp_path / "s")], capsys, CURVATURE_FILE, "checksum")
    assert hashes(tmp_path / "s") == before
    again = score_store(GradientStore.open(tmp_path / "s"), queries, ScoreArguments(method="ekfac"))
    fresh = score_store(GradientStore.open(tmp_path / "clean"), queries, ScoreArguments(method="ekfac")).scores
    assert_close_to(again.scores, fresh, what="ekfac after tampering")
    assert_close_to(again.scores, first, what="ekfac before tampering")
    assert not again.diagnostics["curvature_fit"]["cached"]
    aside = list((tmp_path / "s").glob(f".{CURVATURE_FILE}.corrupt-*"))  # moved aside, not deleted
    assert len(aside) == 1 and hashlib.sha256(aside[0].read_bytes()).hexdigest() == before[str(cache)]
    code, _, err = run(["store", "verify", str(tmp_path / "s")], capsys)  # the refitted cache is sound
    assert code == 0, err


# --------------------------------------------------------------------------------------------------
# defect 13: gradients outside float32's safe range
# --------------------------------------------------------------------------------------------------


def _dense_exact(grads: dict[str, torch.Tensor], queries: dict[str, torch.Tensor]) -> torch.Tensor:
    """float64 dense reference: -sum_l V_l (G_l^T G_l / n + lambda_l I)^{-1} G_l^T, lambda_l the paper's rule."""
    total = None
    for name, g in grads.items():
        G = g.reshape(g.shape[0], -1).double()
        V = queries[name].reshape(queries[name].shape[0], -1).double()
        n, d = G.shape
        lam = 0.1 * float((G * G).sum()) / (n * d)
        H = G.T @ G / n + lam * torch.eye(d, dtype=torch.float64)
        part = -(G @ torch.linalg.solve(H, V.T))
        total = part if total is None else total + part
    return total


@pytest.mark.parametrize("scale", [1e-22, 1e19, 1e-30])
@pytest.mark.parametrize("method", method_names())
def test_gradients_far_from_one_are_scored_exactly_or_refused_with_the_cause(tmp_path, method, scale):
    """Scores of every curvature method are unchanged when training and query gradients are both scaled by
    s (the paper's damping scales by s^2): float32 scoring at 1e-22, 1e19 and 1e-30 must equal the float64
    scores of the same gradients at scale 1. The gradient dot product itself is s^2 times its value at
    scale 1, beyond float32 at these scales: refused with that cause."""
    store, grads = make_store(tmp_path / "s", scale=scale, dtype="float32")
    unit, _ = make_store(tmp_path / "unit", dtype="float64")
    g = torch.Generator().manual_seed(7)
    queries = {k: torch.randn(3, *v.shape[1:], generator=g, dtype=torch.float64) for k, v in grads.items()}
    # LiSSA converged (at its default 100 steps float32 and float64 differ by 8e-4 even at scale 1)
    args = ScoreArguments(method=method, options={"iterations": 1000} if method == "lissa" else {})
    if method == "identity":
        with pytest.raises(DataInfError, match=r"scores are of order .* beyond torch.float32's range.*--compute-dtype float64"):
            score_store(store, {k: (v * scale).float() for k, v in queries.items()}, args)
        return
    got = score_store(store, {k: (v * scale).float() for k, v in queries.items()}, args)
    expected = score_store(unit, queries, args.replace(dtype="float64")).scores
    assert got.scores.dtype == torch.float32
    assert_close_to(got.scores.double(), expected, tol=FLOAT32_TOL, what=f"{method} at {scale:g}")
    for name, lam in got.damping.items():  # the damping reported is that of the gradients as they are
        assert lam == pytest.approx(score_store(unit, queries, args).damping[name] * scale**2, rel=1e-5)
    if method == "exact":
        dense = _dense_exact({k: store.load(k, dtype=torch.float64) / scale for k in grads}, queries)
        assert_close_to(got.scores.double(), dense, tol=FLOAT32_TOL, what="exact vs dense float64")


@pytest.mark.parametrize("scale", [1e-22, 1e19])
@pytest.mark.parametrize("method", ["datainf", "exact", "ekfac"])
def test_a_preconditioned_store_of_gradients_far_from_one(tmp_path, method, scale):
    store, grads = make_store(tmp_path / "s", scale=scale, dtype="float32")
    unit, _ = make_store(tmp_path / "unit", dtype="float64")
    queries = {k: torch.randn(3, *v.shape[1:], dtype=torch.float64) for k, v in grads.items()}
    args = ScoreArguments(method=method)
    pre = precondition_store(store, tmp_path / "pre", args)
    got = score_store(pre, {k: (v * scale).float() for k, v in queries.items()}, args).scores
    expected = score_store(unit, queries, args.replace(dtype="float64")).scores
    assert_close_to(got.double(), expected, tol=FLOAT32_TOL, what=f"preconditioned {method} at {scale:g}")
