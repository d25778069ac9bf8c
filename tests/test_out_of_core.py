"""Scoring a gradient store twice as large as the memory the process may use: streaming, same scores.

The cap is an address-space limit (RLIMIT_AS) set inside a child process right after it imported torch and
datainf: cap = that baseline + CAP_MB (120). torch's import alone maps several hundred MB of address space, so a
fixed cap would measure the import, not the scoring. The store holds 2 * CAP_MB of float32 gradients. A
control child that tries to read the whole store into memory under the same cap must fail, which shows
the cap really is smaller than the store. Memory maps count towards RLIMIT_AS, so this also checks that
the store's reads map one chunk file at a time.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from capped_child import PRELUDE, run_capped
from reference import FLOAT32_TOL, assert_close_to

CAP_MB = 120
N, CHUNK = 640, 32  # 20 chunks of 32 examples
SHAPES = {"lora_A": (200, 250), "lora_B": (250, 200)}  # 2 blocks of 50,000 values: 640 * 100,000 * 4 B = 256 MB
N_QUERY = 4

CHILD = PRELUDE + textwrap.dedent(
    """
    import datainf
    from datainf.store import GradientStore

    mode, store_path, query_path, out_path, cap_mb = sys.argv[1:6]
    queries = torch.load(query_path)
    store = GradientStore.open(store_path)
    base = cap_address_space(cap_mb)
    if mode == "load":  # the control: the store does not fit under the cap
        try:
            whole = {name: store.load(name) for name in store.block_names}
            print(json.dumps({"loaded": True}))
        except (MemoryError, RuntimeError) as e:
            print(json.dumps({"loaded": False, "error": type(e).__name__}))
        sys.exit(0)
    scores = datainf.influence(store.blocks(), queries, method=mode, chunk_size=int(sys.argv[6]))
    torch.save(scores, out_path)
    print(json.dumps({"baseline_mb": base / 2**20, "peak_above_baseline_mb": (vm_bytes("VmPeak") - base) / 2**20}))
    """
)


def _run_child(*args: str) -> dict:
    return run_capped(CHILD, *args, timeout=120)


@pytest.fixture(scope="module")
def big_store(tmp_path_factory):
    """A 256 MB float32 store written chunk by chunk, plus the same gradients in memory and the queries."""
    from datainf.store import GradientStore

    folder = tmp_path_factory.mktemp("ooc")
    g = torch.Generator().manual_seed(0)
    grads = {name: torch.empty(N, *shape) for name, shape in SHAPES.items()}
    with GradientStore.create(folder / "store", blocks=SHAPES, n_examples=N, fingerprints={"model": "synthetic"},
                              chunk_size=CHUNK) as store:
        for c in range(store.num_chunks):
            rows = store.chunk_rows(c)
            chunk = {}
            for k, (name, shape) in enumerate(SHAPES.items()):
                scale = 0.01 * (k + 1) * (1 + torch.rand(len(rows), 1, 1, generator=g))  # uneven norms
                chunk[name] = torch.randn(len(rows), *shape, generator=g) * scale
                grads[name][rows.start : rows.stop] = chunk[name]
            store.write_chunk(c, chunk)
        store.finalize()
    queries = {name: torch.randn(N_QUERY, *shape, generator=g) * 0.01 for name, shape in SHAPES.items()}
    torch.save(queries, folder / "queries.pt")
    size = sum(p.stat().st_size for p in (folder / "store").rglob("*.npy"))
    assert size >= 2 * CAP_MB * 2**20
    return folder, grads, queries


def _datainf_dense(grads: dict, queries: dict) -> torch.Tensor:
    """DataInf from its definition, in float64, with the paper's damping per block."""
    total = torch.zeros(N, N_QUERY, dtype=torch.float64)
    for name in SHAPES:
        G = grads[name].reshape(N, -1).double()
        V = queries[name].reshape(N_QUERY, -1).double()
        sq = (G * G).sum(dim=1)
        lam = 0.1 * float(sq.mean()) / G.shape[1]
        # (1/n) sum_i (g_i g_i^T + lam I)^{-1} v = (1/(n lam)) sum_i (v - g_i (g_i . v) / (lam + ||g_i||^2))
        R = (V - ((G @ V.T) / (lam + sq)[:, None]).T @ G / N) / lam
        total -= G @ R.T
    return total


def test_the_cap_is_smaller_than_the_store(big_store):
    folder, _, _ = big_store
    result = _run_child("load", str(folder / "store"), str(folder / "queries.pt"), "-", str(CAP_MB))
    assert result == {"loaded": False, "error": result.get("error")}


def test_streaming_scores_under_the_cap_match_in_memory(big_store):
    from datainf.estimators import influence

    folder, grads, queries = big_store
    out = folder / "scores.pt"
    info = _run_child("datainf", str(folder / "store"), str(folder / "queries.pt"), str(out), str(CAP_MB), str(CHUNK))
    assert info["peak_above_baseline_mb"] <= CAP_MB
    streamed = torch.load(out)
    in_memory = influence(grads, queries, method="datainf", chunk_size=CHUNK)
    # float32 (the store must be float32 to be twice the cap): streamed and in-memory evaluate one formula on
    # the same float32 values, and both are within float32 rounding of the float64 dense formula
    # (tests/reference.py, FLOAT32_TOL); a skipped or repeated chunk is an O(1/20) error
    assert_close_to(streamed, in_memory, tol=FLOAT32_TOL, what="streamed vs in memory")
    assert_close_to(streamed, _datainf_dense(grads, queries), tol=FLOAT32_TOL, what="streamed vs dense float64")
