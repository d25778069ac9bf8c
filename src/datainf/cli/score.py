"""`datainf score`: a thin wrapper over :func:`datainf.scoring.score_store`, one scores file out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from datainf.cli.common import rank_device, setup
from datainf.cli.options import Scoring, device_option, option, overwrite_option, scoring_options
from datainf.errors import DataInfError
from datainf.outputs import check_output


@click.command("score")
@option("--store", required=True,
        help="Gradient store of the training set; or the folder of run stores `datainf grads --run` made: the scores "
             "are then summed over the run's checkpoints, each weighted by its learning rate (--queries then the "
             "queries' run stores, made with `grads --run` on the same run).")
@option("--queries")
@click.option("--self", "self_inf", is_flag=True, help="Self-influence of each training example instead.")
@click.option("--mean-query", is_flag=True,
              help="Score against the mean query gradient: influence on the average query loss.")
@scoring_options(method_help="Methods, comma-separated or repeated; default by the store's task and the question, "
                             "the most accurate measured (datainf.estimators.defaults.DEFAULTS, docs/results.md): "
                             "ekfac for a causal LM; for a classifier identity:normalize per query, "
                             "datainf:remove_top=1 with --mean-query, datainf with --self.")
@click.option("--debias", "debias", default=None, metavar="BASE_STORE[,BASE_QUERIES]",
              help="DDA's debias: subtract the scores of these stores, made at the model before fine-tuning (step 0: "
                   "`grads --initial`, or checkpoint-0's), from the scores (training store, then query store).")
@option("--weighting")
@option("--allow-mismatch")
@option("--index", help="A top-k index of --store (`datainf index build`): write the --top K most helpful and "
                        "harmful examples of every query from it, without a pass over the store (--out: .jsonl or "
                        ".csv, the rows `datainf top` writes).")
@click.option("--top", "top_k", type=click.IntRange(min=1), default=None, help="With --index: examples per list.")
@option("--out", "out_path", required=True,
        help="Scores file (.safetensors: one tensor per method, settings and store fingerprints inside); an existing "
             "file is replaced only if it is a scores file (or with --overwrite).")
@overwrite_option
@device_option
@click.pass_context
def command(ctx: click.Context, store_dir: str, query_dir: str | None, self_inf: bool, mean_query: bool,
            scoring: Scoring, debias: str | None, weighting: str, allow_mismatch: bool, index_dir: str | None,
            top_k: int | None, out_path: str, overwrite: bool, device: str | None) -> None:
    """Scores of training examples against queries (n_train x n_query), or self-influence (n_train)."""
    if index_dir is not None or top_k is not None:
        return score_from_index(store_dir, query_dir, index_dir, top_k, scoring, self_inf or mean_query or
                                debias is not None or allow_mismatch, out_path, overwrite)
    from datainf.combine import combine, debias_terms, is_run_stores, read_run_stores, run_terms
    from datainf.distributed import init_distributed, is_main_process
    from datainf.estimators.defaults import default_spec, task_kind
    from datainf.scoring import save_scores, score_store
    from datainf.store import GradientStore
    from datainf.tasks import token_level

    if self_inf == (query_dir is not None):
        raise DataInfError("give exactly one of --queries STORE or --self")
    if Path(out_path).suffix != ".safetensors":
        raise DataInfError(f"--out {out_path}: scores are written as .safetensors; name it "
                           f"{Path(out_path).with_suffix('.safetensors')}")
    check_output(out_path, inputs={"training store": store_dir, "query store": query_dir}, kind="scores",
                 overwrite=overwrite)
    _, device = setup(ctx, device)
    device = rank_device(device, init_distributed())
    run = is_run_stores(store_dir)
    if weighting != "weights" and not run:
        raise DataInfError(f"--weighting {weighting} sums a run's checkpoints: give --store the run stores of "
                           "`datainf grads --run` (or drop --weighting)")
    if run:  # a run: one term per checkpoint, the first checkpoint's stores stand for the run in the file's meta
        if query_dir is not None and not is_run_stores(query_dir):
            raise DataInfError(f"--store {store_dir} holds a run's stores, --queries {query_dir} one store; make the "
                               "queries' stores with `datainf grads --run` on the same run folder")
        first = read_run_stores(store_dir)[-1]
        train = GradientStore.open(first.path)
        queries = None if query_dir is None else GradientStore.open(read_run_stores(query_dir)[-1].path)
    else:
        if query_dir is not None and is_run_stores(query_dir):
            raise DataInfError(f"--queries {query_dir} holds a run's stores, --store {store_dir} one store; give "
                               "--store the training set's run stores (`datainf grads --run`)")
        train = GradientStore.open(store_dir)
        queries = GradientStore.open(query_dir) if query_dir is not None else None
    base = None if debias is None else debias_stores(debias, queries is None, run)
    if not scoring.methods:  # the default of the store's kind (docs/results.md, "The defaults and what they measured")
        level = token_level(train.metadata.task)
        question = "self" if self_inf else "mean_query" if mean_query else "per_query"
        scoring = scoring.or_default(level, question)
        click.echo(f"method: {default_spec(level, question)} (the default for {task_kind(level)} stores, "
                   f"{question.replace('_', ' ')}; docs/results.md; choose with --method)")
    results = {}
    for method in scoring.methods:
        arguments = scoring.arguments(method, device=device, mean_query=mean_query)
        if base is not None:
            result = combine(debias_terms(train, queries, base[0], base[1], arguments), allow_mismatch=allow_mismatch)
        elif run:
            result = combine(run_terms(store_dir, query_dir, arguments), allow_mismatch=allow_mismatch,
                             weighting=weighting)
        else:
            result = score_store(train, queries, arguments, allow_mismatch=allow_mismatch)
        results[method] = result
        if is_main_process():
            fit = f" (curvature fit {result.curvature_seconds:.2f} s)" if result.curvature_seconds else ""
            summed = f", summed over {len(result.terms)} checkpoints" if run else ""
            summed += f" ({weighting})" if run and weighting != "weights" else ""
            summed += ", minus the scores before fine-tuning (DDA's debias)" if base is not None else ""
            click.echo(f"{method}: {tuple(result.scores.shape)} scores in {result.seconds:.2f} s{fit}{summed}")
            if "mismatch" in result.diagnostics:
                click.echo(f"warning: scored across stores that differ in {'; '.join(result.diagnostics['mismatch'])}",
                           err=True)
    if is_main_process():
        save_scores(out_path, results, train_store=train, query_store=queries,
                    extra={"allow_mismatch": allow_mismatch, **({"run_stores": str(store_dir)} if run else {})})
        click.echo(f"wrote {out_path}")


def score_from_index(store_dir: str, query_dir: str | None, index_dir: str | None, k: int | None, scoring: Scoring,
                     full_pass_only: bool, out_path: str, overwrite: bool) -> None:
    """`score --index INDEX --top K`: the top K of every query from the index (datainf.index.index_for), as
    the rows `datainf top` writes."""
    from datainf.cli.top import write_rows
    from datainf.index import check_queries_store, index_for, index_rows
    from datainf.store import GradientStore

    if index_dir is None or k is None:
        raise DataInfError("--index INDEX and --top K go together: the top K of every query from the index")
    if query_dir is None or full_pass_only:
        raise DataInfError("--index answers --queries only; --self, --mean-query, --debias and --allow-mismatch "
                           "need the full pass: leave out --index and --top")
    if len(scoring.methods) != 1:
        raise DataInfError(f"--index gives one method's scores; give one --method, not {', '.join(scoring.methods)}")
    out_format = Path(out_path).suffix.lstrip(".")
    if out_format not in ("jsonl", "csv"):
        raise DataInfError(f"--out {out_path}: with --index the top-k rows are written as .jsonl or .csv; name it "
                           f"{Path(out_path).with_suffix('.jsonl')}")
    check_output(out_path, inputs={"training store": store_dir, "query store": query_dir, "index": index_dir},
                 kind="top", overwrite=overwrite)
    if not Path(index_dir).is_dir():
        raise DataInfError(f"--index {index_dir} does not exist; build it with `datainf index build {store_dir} "
                           f"--out {index_dir}`")
    train, queries = GradientStore.open(store_dir), GradientStore.open(query_dir)
    check_queries_store(train, queries)
    method = scoring.methods[0]
    top = index_for(index_dir, train, scoring.arguments(method))
    found = top.search(queries, k)
    write_rows(index_rows(found, method=method, train_records=train.records(), query_records=queries.records()),
               out_format, out_path)
    click.echo(f"{method}: top {k} of {queries.n_examples} queries from {top.kind} index {index_dir}")


def debias_stores(value: str, self_influence: bool, run: bool) -> tuple[Any, Any]:
    """The stores of --debias: BASE_STORE (self-influence) or BASE_STORE,BASE_QUERIES (influence)."""
    from datainf.store import GradientStore

    if run:
        raise DataInfError("--debias applies to one training store, not to a run's stores (step 0 is already a term "
                           "of the run's sum)")
    parts = [p for p in value.split(",") if p]
    if len(parts) != (1 if self_influence else 2):
        raise DataInfError(f"--debias {value}: give {'BASE_STORE' if self_influence else 'BASE_STORE,BASE_QUERIES'} "
                           "(the stores made at the model before fine-tuning)")
    for p in parts:
        if not Path(p).is_dir():
            raise DataInfError(f"--debias: store {p} does not exist; make it with `datainf grads --initial`")
    return GradientStore.open(parts[0]), None if self_influence else GradientStore.open(parts[1])
