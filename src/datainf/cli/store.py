"""`datainf store`: work on gradient stores themselves.

``datainf store verify STORE`` checks a store completely (every chunk's checksums and squared norms; exit 2
naming the bad chunks). ``datainf store precondition --method ekfac STORE OUT`` precomputes a method's
query-independent half once (:func:`datainf.scoring.precondition_store`): OUT holds ``lambda_l P_l g_k`` for
every training example, and every later ``datainf score`` / ``explain`` / Attributor call against OUT with that
method is one streaming matrix-vector pass over it. ``datainf store info STORE`` prints what a store holds.
"""

from __future__ import annotations

import click

from datainf.cli.common import setup
from datainf.cli.options import declared, device_option, method_option, option
from datainf.errors import DataInfError
from datainf.outputs import check_apart


@click.group("store")
def command() -> None:
    """Work on gradient stores: verify one, precondition one once for fast queries, or describe one."""


@command.command("verify")
@click.argument("store_dir", type=click.Path(file_okay=False))
def verify(store_dir: str) -> None:
    """Check every chunk of STORE: its chunk.json (index, rows), every file's size, shape, dtype and sha256,
    the squared norms against the stored gradients, and records.jsonl. Exits 2 naming the bad chunks."""
    from datainf.fitted import state_files, state_hint, state_problems
    from datainf.store import GradientStore

    store = GradientStore.open(store_dir, allow_incomplete=True)
    found = store.verify()
    problems, hints = [str(p) for p in found], []
    if found:
        recompute = all(p.chunk is not None for p in found)
        hints.append("rerun `datainf grads` with the same settings: it moves the bad chunks aside and recomputes "
                     "just them" if recompute else "rerun `datainf grads` with the same settings (it recomputes bad "
                     "chunks, finishes an unfinished store, rewrites records.jsonl); where manifest.json is wrong, "
                     "recompute in a new --store")
    caches = state_problems(store)  # every method's fitted-state cache inside the store (kfac.safetensors, ...)
    if caches:
        problems += caches
        hints.append(state_hint([c.split(" ", 1)[0] for c in caches]))
    if problems:
        shown = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
        raise DataInfError(f"store {store_dir}: {len(problems)} problem(s): {shown}; {'; '.join(hints)}")
    checks = "sha256 checksums" if store.has_checksums else "sizes and shapes only (an old store without checksums)"
    cached = [p.name for p in state_files(store)]
    if cached:
        checks += f" (and {', '.join(cached)}'s)"
    click.echo(f"store {store_dir}: ok ({store.n_examples} examples, {store.num_chunks} chunks, "
               f"{len(store.block_names)} blocks; {checks} and squared norms verified)")


@command.command("precondition")
@click.argument("store_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@method_option(declared("PRECONDITION_METHOD"), single=True, dest="method",
               help="A method whose inverse does not depend on the query (identity, exact, kfac, ekfac, datainf).")
@option("--damping")
@option("--dtype", help="Storage dtype of OUT; default the source store's.")
@option("--compute-dtype")
@device_option
@click.pass_context
def precondition(ctx: click.Context, store_dir: str, out_dir: str, method: str, damping: float | None,
                 dtype: str | None, compute_dtype: str | None, device: str | None) -> None:
    """Write OUT_DIR: the training gradients of STORE_DIR preconditioned once by METHOD."""
    from datainf.estimators import ScoreArguments
    from datainf.scoring import precondition_store
    from datainf.store import GradientStore, disk_full

    check_apart(out_dir, {"training store": store_dir}, option="OUT")
    progress, device = setup(ctx, device)
    store = GradientStore.open(store_dir)
    arguments = ScoreArguments(method=method, damping=damping, dtype=compute_dtype, device=device)
    try:
        out = precondition_store(store, out_dir, arguments, dtype=dtype, progress=progress)
    except OSError as e:
        if not disk_full(e):
            raise
        raise DataInfError(f"the disk is full: writing {out_dir} ({e}); free some space, then rerun the same "
                           "command: it resumes") from None
    info = out.metadata.preconditioned or {}
    click.echo(f"wrote {out_dir}: {out.n_examples} examples x {len(out.block_names)} blocks preconditioned by "
               f"{method} in {info['seconds']:.1f} s (curvature {info['curvature_seconds']:.1f} s); score it with "
               f"--method {method}")


@command.command("info")
@click.argument("store_dir", type=click.Path(exists=True, file_okay=False))
def info(store_dir: str) -> None:
    """What a store holds: examples, blocks, dtype, projection, preconditioning, size on disk."""
    import math
    from pathlib import Path

    from datainf.scoring import preconditioned
    from datainf.store import GradientStore, projection_label

    store = GradientStore.open(store_dir, allow_incomplete=True)
    size = sum(p.stat().st_size for p in (Path(store_dir) / "chunks").rglob("*.npy"))
    d = sum(math.prod(s) for s in store.block_shapes.values())
    pre = preconditioned(store)
    click.echo(f"{store_dir}: {store.n_examples} examples, {len(store.block_names)} blocks, {d:,} numbers per "
               f"example, {store.storage_dtype}, {size / 1e9:.2f} GB on disk, chunks of {store.chunk_size}, "
               f"{'complete' if store.complete else 'incomplete'}")
    click.echo(f"projection: {projection_label(store.manifest)}")
    if pre:
        click.echo(f"preconditioned for {pre['method']} from {pre['source']}")
