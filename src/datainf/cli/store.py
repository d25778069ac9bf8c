"""`datainf store verify STORE`: check a gradient store completely (every chunk's checksums and norms)."""

from __future__ import annotations

import click

from datainf.errors import DataInfError


@click.group("store")
def command() -> None:
    """Inspect a gradient store."""


@command.command("verify")
@click.argument("store_dir", type=click.Path(file_okay=False))
def verify(store_dir: str) -> None:
    """Check every chunk of STORE: its chunk.json (index, rows), every file's size, shape, dtype and sha256,
    the squared norms against the stored gradients, and records.jsonl. Exits 2 naming the bad chunks."""
    from datainf.store import GradientStore

    store = GradientStore.open(store_dir, allow_incomplete=True)
    problems = store.verify()
    if problems:
        shown = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
        recompute = all(p.chunk is not None for p in problems)
        hint = ("rerun `datainf grads` with the same settings: it moves the bad chunks aside and recomputes just them"
                if recompute else "rerun `datainf grads` with the same settings (it recomputes bad chunks, finishes "
                "an unfinished store, rewrites records.jsonl); where manifest.json is wrong, recompute in a new --store")
        raise DataInfError(f"store {store_dir}: {len(problems)} problem(s): {shown}; {hint}")
    checks = "sha256 checksums" if store.has_checksums else "sizes and shapes only (an old store without checksums)"
    click.echo(f"store {store_dir}: ok ({store.n_examples} examples, {store.num_chunks} chunks, "
               f"{len(store.block_names)} blocks; {checks} and squared norms verified)")
