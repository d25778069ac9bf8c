"""`datainf index`: a top-k index over a gradient store (faiss, optional), and searching it.

``datainf index build STORE --out INDEX`` writes the index of a store's (preconditioned) rows
(:mod:`datainf.index`); ``--check QUERIES`` also measures its recall@k against the exhaustive scores
(:func:`datainf.scoring.score_store`). ``datainf index search INDEX --queries QUERIES --k K`` writes the top k
helpful and harmful training examples per query in the rows ``datainf top`` writes, without a pass over the
store.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from datainf.cli.options import method_option, option, overwrite_option
from datainf.errors import DataInfError
from datainf.outputs import check_output, check_output_folder

if TYPE_CHECKING:
    from datainf.index import TopIndex
    from datainf.store import GradientStore


@click.group("index")
def command() -> None:
    """A top-k index of a store (needs faiss: pip install 'datainf[index]'): build it, search it."""


def _default_out(store_dir: str) -> str:
    store = Path(store_dir)
    return str(store.parent / f"{store.name}.index")


@command.command("build")
@click.argument("store_dir", type=click.Path(exists=True, file_okay=False))
@method_option(None, single=True, dest="method",
               help="The method whose scores the index reproduces: the one the store is preconditioned for "
                   "(`datainf store precondition`), identity for a plain store (the default).")
@option("--normalize", help="Cosine similarity (identity only): rows and queries of norm 1.")
@click.option("--kind", type=click.Choice(["flat", "ivf", "compact"]), default="flat", show_default=True,
              help="flat: exact top-k; ivf: approximate, for clustered rows (search with --nprobe); compact: each "
                   "example reduced to --dim numbers by a basis learned from the rows, candidates re-ranked by "
                   "their exact scores read from the store (fast and small for low-rank gradients; --check "
                   "measures its recall).")
@click.option("--nlist", type=click.IntRange(min=1), default=None, help="IVF lists; default about sqrt(n).")
@click.option("--dim", type=click.IntRange(min=1), default=None,
              help="compact: numbers per example (the basis' directions over all blocks); default 768.")
@option("--candidates", help="compact: rows re-ranked by their exact scores per list, times k; default 2.")
@option("--out", "out_dir", type=click.Path(file_okay=True), default=None,
        help="Index folder; default STORE.index beside the store. An existing folder is replaced only if it "
                   "is an index (or with --overwrite), and never when it holds other files.")
@click.option("--check", "check_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="A query store: measure the index's recall@k against the exhaustive scores and print it.")
@option("--k", default=50, show_default=True, help="k of --check's recall@k.")
@option("--nprobe", help="IVF lists --check searches.")
@overwrite_option
def build(store_dir: str, method: str | None, normalize: bool, kind: str, nlist: int | None, dim: int | None,
          candidates: int | None, out_dir: str | None, check_dir: str | None, k: int, nprobe: int | None,
          overwrite: bool) -> None:
    """Write the top-k index of STORE_DIR (with --check, its recall@k too)."""
    from datainf.index import INDEX_FILES, build_store_index, check_queries_store, is_index_folder, save_index
    from datainf.store import GradientStore

    out_dir = out_dir or _default_out(store_dir)
    check_output_folder(out_dir, inputs={"training store": store_dir, "query store": check_dir},
                        files=INDEX_FILES, recognise=is_index_folder,
                        what="an index written by `datainf index build`", overwrite=overwrite)
    store = GradientStore.open(store_dir)
    queries = None
    if check_dir is not None:
        queries = GradientStore.open(check_dir)
        check_queries_store(store, queries)
    top = build_store_index(store, method=method, normalize=normalize, kind=kind, nlist=nlist, dim=dim,
                            candidates=candidates)
    if queries is not None:
        top.manifest["check"] = _check(store, queries, top, k, nprobe)
    save_index(top, out_dir)
    seconds = top.manifest["seconds"]
    numbers = top.manifest["dim"] if kind == "compact" else top.manifest["store"]["dim"]
    kept = (f" (of {top.manifest['store']['dim']}: {100 * top.manifest['energy_kept']:.1f}% of a sample's energy)"
            if kind == "compact" else "")
    click.echo(f"wrote {out_dir}: {kind} index of {store.n_examples} examples x {numbers} numbers{kept} "
               f"({top.settings.method}{', normalized' if normalize else ''}) in "
               f"{seconds['build']:.1f} s; search it with `datainf index search {out_dir} "
               "--queries QUERIES --k K`")


def _check(store: GradientStore, queries: GradientStore, top: TopIndex, k: int, nprobe: int | None
           ) -> dict[str, Any]:
    """recall@k of ``top`` against the exhaustive scores of ``queries``, printed and returned."""
    from datainf.estimators import ScoreArguments
    from datainf.index import exhaustive_top, recall_at_k
    from datainf.scoring import score_store

    t0 = time.perf_counter()
    exact = score_store(store, queries, ScoreArguments(method=top.settings.method, normalize=top.settings.normalize))
    exhaustive_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    found = top.search(queries, k, nprobe)
    search_s = time.perf_counter() - t0
    recall = recall_at_k(found, exhaustive_top(exact.scores, k))
    m = queries.n_examples
    click.echo(f"recall@{k} against the exhaustive {top.settings.method} scores: {recall:.4f} ({m} queries, helpful "
               f"and harmful lists; search {1000 * search_s / m:.1f} ms per query, exhaustive pass "
               f"{exhaustive_s:.2f} s)")
    return {"k": k, "nprobe": nprobe, "queries": str(queries.path), "recall": recall,
            "search_ms_per_query": 1000 * search_s / m, "exhaustive_s": exhaustive_s}


@command.command("search")
@click.argument("index_dir", type=click.Path(file_okay=False))
@click.option("--queries", "query_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Gradient store of the queries.")
@option("--store", default=None,
        help="The training store the index was built from (default: the path it recorded).")
@option("--k", show_default=True)
@click.option("--nprobe", type=click.IntRange(min=1), default=None,
              help="IVF lists searched (more: higher recall, slower); default 1.")
@option("--candidates", help="compact: rows re-ranked by their exact scores per list, times k (more: higher "
                             "recall, slower); default: the index's.")
@click.option("--format", "out_format", type=click.Choice(["jsonl", "csv"]), default="jsonl")
@option("--out", "out_path", default=None,
        help="Output file (the rows `datainf top` writes); default stdout.")
@overwrite_option
def search(index_dir: str, query_dir: str, store_dir: str | None, k: int, nprobe: int | None,
           candidates: int | None, out_format: str, out_path: str | None, overwrite: bool) -> None:
    """The top k helpful and harmful training examples of every query, from the index."""
    from datainf.cli.top import write_rows
    from datainf.index import check_queries_store, index_rows, load_index, read_manifest
    from datainf.store import GradientStore

    manifest = read_manifest(index_dir)
    store_dir = store_dir or manifest["store"]["path"]
    inputs = {"index": index_dir, "training store": store_dir, "query store": query_dir}
    if out_path is not None:
        check_output(out_path, inputs=inputs, kind="top", overwrite=overwrite)
    if not Path(store_dir).is_dir():
        raise DataInfError(f"the training store {store_dir} that index {index_dir} was built from is gone; pass "
                           "--store with where it lies now")
    store = GradientStore.open(store_dir)
    queries = GradientStore.open(query_dir)
    check_queries_store(store, queries)
    top = load_index(index_dir, store)
    t0 = time.perf_counter()
    found = top.search(queries, k, nprobe, candidates)
    seconds = time.perf_counter() - t0
    rows = index_rows(found, method=top.settings.method, train_records=store.records(),
                      query_records=queries.records())
    click.echo(f"searched {queries.n_examples} queries in {1000 * seconds:.1f} ms ({manifest['kind']} index of "
               f"{manifest['store']['n_examples']} examples)", err=True)
    write_rows(rows, out_format, out_path)
