"""Distributed extraction and scoring under a real ``torchrun`` with 2 CPU processes (gloo).

The references are computed in this (single) process: ``Attributor.fit`` and ``datainf.influence`` on the
store's blocks. This file is also the worker script that ``torchrun`` starts (see ``_worker``).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import contextlib  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from reference import FLOAT32_TOL, assert_close_to  # noqa: E402

N_TRAIN, CHUNK, BATCH = 24, 4, 3  # 6 chunks; batches of 3 inside chunks of 4 (uneven on purpose)
METHODS = ("datainf", "exact", "identity", "lissa")
HERE = Path(__file__).resolve().parent


def _records(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 9, (1,), generator=g))
        ids = [2] + torch.randint(5, 100, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "label": int(torch.randint(0, 2, (1,), generator=g))})
    return out


class CountingCollate:
    """The default collation of pre-tokenized records, counting examples; can kill its own process."""

    def __init__(self, kill_after_calls: int | None = None):
        from datainf.data.collate import TextCollator

        self.inner = TextCollator(task="classification")
        self.kill_after_calls = kill_after_calls
        self.calls = 0
        self.examples = 0

    def __call__(self, records):
        self.calls += 1
        if self.kill_after_calls is not None and self.calls > self.kill_after_calls:
            os.kill(os.getpid(), signal.SIGKILL)  # dies mid-chunk, like an OOM kill or a lost node
        self.examples += len(records)
        return self.inner(records)


def _attributor(store: Path, collate: CountingCollate):
    from datainf.attributor import Attributor
    from tiny_models import tiny_bert_classifier

    model = tiny_bert_classifier(lora_targets=("query", "value"), rank=2, seed=0)
    return Attributor(model, "classification", store=store, collate=collate, batch_size=BATCH,
                      chunk_size=CHUNK, progress=False)


def _worker(mode: str, store: str, out: str) -> None:
    """Run by torchrun: fit the store with every rank; 'full' also scores and saves the results (rank 0)."""
    from datainf.distributed import init_distributed

    torch.set_num_threads(1)
    rank, world = init_distributed(backend="gloo", timeout_s=60)
    kill = 3 if (mode == "kill" and rank == 1) else None  # rank 1 dies in its 2nd chunk (after 1 written)
    attributor = _attributor(Path(store), CountingCollate(kill_after_calls=kill))
    attributor.fit(_records(N_TRAIN, seed=1))
    if mode != "full":
        return
    queries = attributor.gradients(_records(3, seed=2))
    result = {"world": torch.tensor(world)}
    for method in METHODS:
        opts = {"iterations": 10} if method == "lissa" else {}
        scored = attributor.score(queries, method=method, save=False, **opts)
        result[method] = scored.scores
        result[f"{method}-damping"] = torch.tensor(list(scored.damping.values()), dtype=torch.float64)
        assert scored.world_size == world
    result["self-datainf"] = attributor.self_influence("datainf", save=False)
    if rank == 0:
        torch.save(result, out)
    from datainf.distributed import shutdown_distributed

    shutdown_distributed()


#: what libstdc++ prints when a rank's gloo threads are torn down unjoined at exit (SIGABRT, exit code -6)
GLOO_TEARDOWN_ABORT = "terminate called without an active exception"


def _torchrun(mode: str, store: Path, out: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "--max-restarts=0", str(HERE / "test_distributed.py"), mode, str(store), str(out)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def _chunk_arrays(store_path: Path, index: int) -> dict[str, np.ndarray]:
    folder = store_path / "chunks" / f"{index:05d}"
    return {p.name: np.load(p) for p in sorted(folder.glob("*.npy"))}


@contextlib.contextmanager
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The store and the scores of one plain process."""
    from datainf.estimators import influence, self_influence

    path = tmp_path_factory.mktemp("ref") / "store"
    attributor = _attributor(path, CountingCollate())
    with _one_thread():  # as each rank: bit-identical values need the same kernels (thread count)
        store = attributor.fit(_records(N_TRAIN, seed=1))
    queries = attributor.gradients(_records(3, seed=2))
    scores = {}
    for method in METHODS:
        opts = {"iterations": 10} if method == "lissa" else {}
        scores[method] = influence(store.blocks(), queries, method=method, **opts)
    scores["self-datainf"] = self_influence(store.blocks(), "datainf")
    return path, store, scores


def test_two_ranks_write_the_same_store_and_scores(tmp_path, reference):
    ref_path, ref_store, ref_scores = reference
    store_path, out = tmp_path / "store", tmp_path / "scores.pt"
    proc = _torchrun("full", store_path, out)
    if proc.returncode != 0 and GLOO_TEARDOWN_ABORT in proc.stderr:
        # once in about 10-20 CI runs a rank aborts inside gloo's teardown after all its work (not reproduced
        # in 12 runs alone); that one signature gets one fresh try, any other failure (or a second abort) fails
        store_path, out = tmp_path / "store-again", tmp_path / "scores-again.pt"
        proc = _torchrun("full", store_path, out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # the store: same manifest (settings, fingerprints), same chunks, byte for byte
    manifest = json.loads((store_path / "manifest.json").read_text())
    assert manifest == ref_store.manifest and manifest["complete"]
    assert not (store_path / "lock").exists()
    for c in range(ref_store.num_chunks):
        got, want = _chunk_arrays(store_path, c), _chunk_arrays(ref_path, c)
        assert got.keys() == want.keys()
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"chunk {c} {name}")
    # the scores: gathered over 2 ranks = one process (blocks summed in another order: float rounding)
    result = torch.load(out)
    assert int(result["world"]) == 2
    # float32 scores, each block's part computed by the same kernels (one thread) and summed over blocks in
    # another order: float32 rounding only (tests/reference.py, FLOAT32_TOL); a block left out or counted on
    # two ranks is an O(1/len(SHAPES)) error
    for key, want in ref_scores.items():
        assert_close_to(result[key], want, tol=FLOAT32_TOL, what=key)


def test_a_killed_rank_leaves_a_resumable_store(tmp_path, reference):
    ref_path, ref_store, _ = reference
    store_path = tmp_path / "store"
    proc = _torchrun("kill", store_path, tmp_path / "unused.pt")
    assert proc.returncode != 0  # torchrun reports the dead rank and stops the other one
    manifest = json.loads((store_path / "manifest.json").read_text())
    assert manifest["complete"] is False
    written = sorted(int(p.name) for p in (store_path / "chunks").iterdir() if not p.name.startswith("."))
    assert 1 in written and 3 not in written  # rank 1 wrote chunk 1, died computing chunk 3
    for c in written:  # what survived is whole and right
        got, want = _chunk_arrays(store_path, c), _chunk_arrays(ref_path, c)
        assert got.keys() == want.keys()
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
    # resume with another number of processes (one): only the missing chunks are computed
    collate = CountingCollate()
    attributor = _attributor(store_path, collate)
    block_probe = 1  # fit() collates one example first to learn the block shapes
    with _one_thread():
        store = attributor.fit(_records(N_TRAIN, seed=1))
    missing = [c for c in range(ref_store.num_chunks) if c not in written]
    assert collate.examples - block_probe == sum(len(ref_store.chunk_rows(c)) for c in missing)
    assert store.complete and not list((store_path / "chunks").glob(".*.tmp-*"))
    for name in ref_store.block_names:
        torch.testing.assert_close(store.load(name), ref_store.load(name), rtol=0, atol=0)


def test_join_needs_the_lock_token_and_a_second_job_is_refused(tmp_path):
    from datainf.errors import DataInfError
    from datainf.store import GradientStore

    spec = dict(blocks={"a": (3,)}, n_examples=4, fingerprints={"model": "m"}, chunk_size=2)
    store = GradientStore.create(tmp_path / "s", **spec)
    with pytest.raises(DataInfError, match="lock is not held by this job"):
        GradientStore.join(tmp_path / "s", "not-the-token")
    with pytest.raises(DataInfError, match="being written by process"):
        GradientStore.create(tmp_path / "s", **spec)
    other = GradientStore.join(tmp_path / "s", store.lock_token)  # a rank of the same job
    other.write_chunk(1, {"a": torch.ones(2, 3)})
    store.write_chunk(0, {"a": torch.zeros(2, 3)})
    other.close()
    assert (tmp_path / "s" / "lock").exists()  # a joined rank never releases the job's lock
    store.finalize()
    store.close()
    assert not (tmp_path / "s" / "lock").exists()
    torch.testing.assert_close(GradientStore.open(tmp_path / "s").load("a")[2:], torch.ones(2, 3))


def test_assign_blocks_balances_and_covers_every_block():
    from datainf.distributed import assign_blocks

    sizes = [10, 1, 7, 3, 3, 8]
    share = assign_blocks(sizes, 3)
    assert sorted(i for s in share for i in s) == list(range(len(sizes)))
    loads = sorted(sum(sizes[i] for i in s) for s in share)
    assert loads == [10, 11, 11]  # the best split of total 32 into 3
    assert assign_blocks([5], 3) == [[0], [], []]


def test_single_process_fallback_is_plain_influence():
    from datainf.distributed import distributed_influence, distributed_self_influence, is_distributed
    from datainf.estimators import influence, self_influence

    assert not is_distributed()
    g = torch.Generator().manual_seed(0)
    f64 = torch.float64
    train = {"a": torch.randn(12, 5, generator=g, dtype=f64), "b": torch.randn(12, 2, 3, generator=g, dtype=f64)}
    query = {"a": torch.randn(2, 5, generator=g, dtype=f64), "b": torch.randn(2, 2, 3, generator=g, dtype=f64)}
    assert_close_to(distributed_influence(train, query, "exact"), influence(train, query, "exact"), what="exact")
    assert_close_to(distributed_self_influence(train, "datainf"), self_influence(train, "datainf"), what="self")


if __name__ == "__main__":  # started by torchrun in the tests above
    _worker(*sys.argv[1:4])
