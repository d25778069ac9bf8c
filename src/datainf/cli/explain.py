"""`datainf explain`: why did my model say this? Prompts (and responses) against a training store.

A thin wrapper of :mod:`datainf.explaining` (``datainf.explain``). Loads the model and adapter once, takes a
prompt from the command line, or a file of them (``--queries FILE``), (and a response, or generates one),
tokenizes it as the training data was (the chat template when the store holds chat records: a conversation,
or a prompt and a completion of turns as TRL's conversational prompt-completion rows are), computes its
gradient, scores it against the store with each method and prints the most helpful and most harmful
training examples. ``--conversation FILE`` explains the last assistant turn of a whole conversation (or the
model's reply to it). ``--interactive`` keeps the model loaded and asks for the next prompt. ``--json`` and
``--csv`` write the answers.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import click

from datainf.cli.common import model_dtype_option, setup
from datainf.cli.options import (
    current_scoring,
    device_option,
    method_option,
    option,
    overwrite_option,
    scoring_options,
)
from datainf.errors import DataInfError
from datainf.explaining import read_conversation
from datainf.outputs import check_output


def _cut(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: max(width - 1, 1)] + "…"


def method_line(methods: tuple[str, ...], defaulted: bool, checkpoints: int) -> str:
    """What answers: the methods, and for the default what it measured (and, from one checkpoint, that the
    run measured better)."""
    from datainf.estimators.defaults import DEFAULT_EVIDENCE

    line = f"method: {', '.join(methods)}"
    if defaulted:
        line += f" (the default; --method datainf for the paper's method). Measured: {DEFAULT_EVIDENCE['causal_lm']}"
        if checkpoints == 1:
            line += (". One checkpoint here: give --run RUN (the run's checkpoints, step 0 included), or --initial "
                     "with step 0's store (`datainf grads --initial`), for the measured accuracy")
    return line


def render(rows: list[dict[str, Any]], method: str, k: int, width: int, n_train: int | None = None) -> str:
    """The terminal table of one method's helpful and harmful examples; a list shorter than ``k`` (fewer of
    the ``n_train`` examples have its sign) says so."""
    from datainf.ranking import sign_note

    lines = []
    for kind, meaning in (("helpful", "score < 0: up-weighting it makes this response more likely"),
                          ("harmful", "score > 0: up-weighting it makes this response less likely")):
        picked = [r for r in rows if r["method"] == method and r["kind"] == kind]
        lines.append(f"{method}: the {len(picked)} most {kind} training examples ({meaning})")
        if n_train is not None and len(picked) < min(k, n_train):
            lines.append(f"  ({sign_note(kind, len(picked), n_train)})")
        lines.append(f"  {'rank':>4}  {'score':>10}  {'#':>6}  example")
        text_width = max(width - 28, 20)
        for r in picked:
            if "train_prompt" in r:
                text = f"{r['train_prompt']} -> {r['train_response']}"
            else:
                text = str(r.get("train_text", "(no text kept in the store)"))
                if "train_label" in r:
                    text = f"[{r.get('train_label_name', r['train_label'])}] {text}"
            lines.append(f"  {r['rank']:>4}  {r['score']:>+10.3e}  {r['train_index']:>6}  {_cut(text, text_width)}")
    return "\n".join(lines)


@click.command("explain")
@option("--model", required=True)
@option("--adapter", "adapter_dirs", multiple=True,
        help="The LoRA adapter the training store was made with. Repeated with --store: checkpoints of the same "
             "fine-tune, each with the store made with it; the scores are summed over them (the first pair is the "
             "model that answers). Or give --run.")
@option("--run", help="A fine-tuning run folder (`datainf finetune --checkpoints K`'s --out, or a Trainer / TRL "
                      "output_dir with checkpoint-N folders) instead of --adapter: every checkpoint, weighted by its "
                      "learning rate, with --store the folder of run stores `datainf grads --run` made from it; the "
                      "final checkpoint answers.")
@option("--store", "store_dirs", required=True, multiple=True, type=click.Path(exists=True, file_okay=False),
        help="The training set's gradient store (from `datainf grads` with that --adapter; with --run, the folder "
             "`datainf grads --run` wrote). Several stores must be made from the same data with the same grads "
             "options (tokenization, projection).")
@click.option("--weights", default="lr", show_default=True,
              help="With several --adapter/--store pairs, each one's weight in the sum: 'lr' (the learning rate "
                   "the checkpoint was saved at, from datainf_checkpoint.json or the Trainer's trainer_state.json: "
                   "TracIn's sum), 'equal', or comma-separated numbers; each must be a finite number > 0.")
@click.option("--prompt", default=None, help="The prompt to explain (asked for with --interactive).")
@click.option("--response", default=None, help="The response to explain; default: the model's own (generated).")
@click.option("--system", default=None, help="A system turn before the prompt (chat stores), as in training.")
@click.option("--conversation", "conversation_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Explain the last assistant turn of this conversation (a JSON list of turns, or an object with "
                   "'messages'), the earlier turns its context; one ending on a user turn is answered by the model. "
                   "Chat stores; instead of --prompt and --system.")
@method_option(None, help="Methods, comma-separated or repeated; default EK-FAC, the most accurate measured on LoRA "
                          "causal LMs (docs/results.md); datainf is the paper's method.")
@option("--k", default=10, help="Examples shown per list.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the rows (and settings) as JSON to this file; an existing file is replaced only if "
                   "it is one explain wrote (or with --overwrite).")
@overwrite_option
@click.option("--interactive", is_flag=True, help="Keep the model loaded and ask for the next prompt.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, help="Length of a generated response.")
@option("--allow-mismatch", help="Explain with a model or adapter other than the store's (a cross-checkpoint "
                                 "comparison).")
@model_dtype_option
@device_option
@scoring_options(methods=(), into=None, with_method=False)
@click.option("--queries", "queries_path", type=click.Path(exists=True), default=None,
              help="Explain every row of this file (JSONL, JSON, CSV/TSV, parquet) at once, instead of --prompt: "
                   "chat 'messages' (the last assistant turn, or the model's reply to a final user turn), 'prompt' "
                   "with an optional 'response' (or 'completion') and 'system', or 'text' (a prompt); a row without "
                   "a response is answered by the model (generated).")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), default=None,
              help="Also write one CSV row per query x training example shown; an existing file is replaced only "
                   "if it is one explain wrote (or with --overwrite).")
@click.option("--tokens", is_flag=True,
              help="Also explain the response token by token: each token's own loss gradient scored against the "
                   "store (datainf.tokens); prints each token's most helpful and harmful example, and with --json "
                   "writes every token's top --k lists under the answer's 'tokens' (for `datainf report --tokens`).")
@option("--index", type=click.Path(exists=True, file_okay=False))
@option("--weighting")
@click.option("--initial", is_flag=True,
              help="Explain from step 0 of the --adapter's fine-tune (its final adapter alone): the response is the "
                   "adapter's, the query's gradient is taken at the LoRA training started from (B = 0, A from the "
                   "seed finetune recorded), as `datainf grads --initial` made --store. What a converged model's "
                   "final gradients have lost (docs/results.md, issue 29).")
@click.option("--seed", "initial_seed", type=click.IntRange(min=0), default=None,
              help="With --initial, for an adapter that records no seed: the seed A was drawn with (as given to "
                   "`datainf grads --initial --seed`).")
@click.pass_context
def command(ctx: click.Context, model_dir: str, adapter_dirs: tuple[str, ...], run_dir: str | None,
            store_dirs: tuple[str, ...], weights: str, prompt: str | None, response: str | None, system: str | None,
            conversation_path: str | None, methods: tuple[str, ...], k: int, json_path: str | None, overwrite: bool,
            interactive: bool, max_new_tokens: int, allow_mismatch: bool, model_dtype: str, device: str | None,
            queries_path: str | None, csv_path: str | None, tokens: bool, index_dir: str | None, weighting: str,
            initial: bool, initial_seed: int | None) -> None:
    """Which training examples made the model give this response to this prompt (or these, --queries)?"""
    from datainf.explaining import Explainer, Query, conversation_query, read_queries

    inputs = {"model folder": model_dir, "adapter folder": adapter_dirs, "run folder": run_dir,
              "training store": store_dirs, "--conversation file": conversation_path, "--queries file": queries_path,
              "index": index_dir}
    for path, kind, flag in ((json_path, "explain", "--json"), (csv_path, "explain-csv", "--csv")):
        if path is not None:
            check_output(path, inputs=inputs, kind=kind, overwrite=overwrite, option=flag)
    if json_path is not None and csv_path is not None and Path(json_path).resolve() == Path(csv_path).resolve():
        raise DataInfError(f"--json and --csv name the same file {json_path}; give two file names")
    queries: list[Query] = []
    if queries_path is not None:
        if prompt is not None or response is not None or system is not None or conversation_path or interactive:
            raise DataInfError("--queries holds the prompts (and responses): leave out --prompt, --response, "
                               "--system, --conversation and --interactive")
        queries = read_queries(queries_path)
    elif conversation_path is not None:
        if prompt is not None or system is not None or interactive:
            raise DataInfError("--conversation holds the prompt and any system turn: leave out --prompt, --system "
                               "and --interactive")
        context, reply = read_conversation(conversation_path)
        where = f"--conversation {conversation_path}"
        queries = [conversation_query(context + ([{"role": "assistant", "content": reply}] if reply else []),
                                      where, response)]
    elif prompt is not None:
        queries = [Query(prompt, response, system, source="--system" if system is not None else "--prompt")]
    elif not interactive:
        raise DataInfError("give --prompt TEXT (or --queries FILE, --conversation FILE, or --interactive to type "
                           "prompts)")
    # the --method names (parsed and checked by the option) and the scoring flags; no --method: the default
    scoring = current_scoring()
    defaulted, scoring = not scoring.methods, scoring.or_default(token_level=True)  # explain: causal LM stores
    explainer = Explainer(model_dir, store=store_dirs, adapter=adapter_dirs, run=run_dir, weights=weights,
                          arguments=[scoring.arguments(m) for m in scoring.methods], k=k,
                          max_new_tokens=max_new_tokens, allow_mismatch=allow_mismatch, model_dtype=model_dtype,
                          device=setup(ctx, device)[1], tokens=tokens, index=index_dir, initial=initial,
                          initial_seed=initial_seed, weighting=weighting)
    if queries:
        explainer.check(queries)  # refused before the model is loaded
    elif system is not None:
        explainer.check([Query("", system=system, source="--system")])
    seconds = explainer.load()
    first = explainer.checkpoints[0]
    click.echo(f"loaded {model_dir} + {first.adapter} in {seconds:.1f} s; store: {explainer.n_train} training "
               f"examples, {len(explainer.stores[0].block_names)} blocks{' (chat)' if explainer.chat else ''}")
    if explainer.initial_note:
        click.echo(f"gradients at {explainer.initial_note}")
    for note in explainer.notes():
        click.echo(f"note: {note}")
    click.echo(method_line(scoring.methods, defaulted, 2 if initial else len(explainer.checkpoints)))
    if len(explainer.checkpoints) > 1:
        click.echo(f"scores summed over {len(explainer.checkpoints)} checkpoints, weighted by "
                   f"{'lr' if run_dir is not None else weights}"
                   f"{'' if weighting == 'weights' else f' ({weighting})'}: " + ", ".join(
                       f"{c.adapter} x {c.weight:.3g}" for c in explainer.checkpoints))
    width = shutil.get_terminal_size((120, 24)).columns
    answers = []
    while True:
        if interactive and not queries:
            typed = click.prompt("prompt (empty to stop)", default="", show_default=False)
            if not typed.strip():
                break
            queries = [Query(typed, system=system)]
        found = explainer.explain(queries)
        for answer in found:
            _show(answer, explainer, width)
        answers += found
        if not interactive:
            break
        queries = []
    explanation = explainer.explanation(answers)
    if json_path is not None:
        from datainf import atomic

        atomic.write_json(Path(json_path), explanation.to_json())
        click.echo(f"wrote {json_path}")
    if csv_path is not None:
        _write_csv(Path(csv_path), explanation.csv_rows())
        click.echo(f"wrote {csv_path}")


def _show(answer: Any, explainer: Any, width: int) -> None:
    """One answer on the terminal: the prompt, the response, a warning for a query cut to the store's length,
    and each method's table."""
    conversation = answer.conversation
    earlier = f" (after {len(conversation) - 1} earlier turns)" if conversation and len(conversation) > 1 else ""
    click.echo(f"\nprompt:   {_cut(answer.prompt, width - 10)}{earlier}\nresponse: {_cut(answer.response, width - 10)}"
               f"{'   (generated by the model, greedy)' if answer.generated else ''}")
    limit = explainer.collate.max_length
    if answer.tokens > limit:  # a query is a prompt/response or chat record: only keep_start keeps its start
        side = "first" if explainer.collate.truncation == "keep_start" else "last"
        click.echo(f"warning: this query is {answer.tokens} tokens, more than the store's max_length of {limit}: its "
                   f"gradient is that of the {side} {limit} tokens, as the training examples' were", err=True)
    if answer.by_token is not None:  # --tokens: each method's token table (datainf.tokens)
        for method in answer.by_token.scores:
            click.echo("\n" + answer.by_token.render(method, width))
        click.echo(f"\n(token gradients + scoring of {len(answer.by_token.tokens)} response tokens: "
                   f"{answer.by_token.seconds:.2f} s)")
    for method in explainer.arguments:
        click.echo("\n" + render(answer.rows, method, explainer.k, width, explainer.n_train))
    checkpoints = len(explainer.checkpoints)
    click.echo(f"\n(scoring against {explainer.n_train} examples{f' at {checkpoints} checkpoints' if checkpoints > 1 else ''}: "
               + ", ".join(f"{m} {s:.2f} s" for m, s in answer.seconds.items()) + ")")


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """The rows as CSV (the columns of datainf.explaining.CSV_COLUMNS that any row has), written atomically."""
    import csv
    import io

    from datainf import atomic
    from datainf.explaining import CSV_COLUMNS

    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=[c for c in CSV_COLUMNS if c in ("query_index", "prompt", "response",
                                                                                 "generated", "method", "kind", "rank",
                                                                                 "train_index", "score")
                                                or any(c in r for r in rows)]
                            + [k for k in dict.fromkeys(k for r in rows for k in r) if k not in CSV_COLUMNS],
                            extrasaction="ignore")  # then the training records' data columns (train_skill ...)
    writer.writeheader()
    writer.writerows(rows)
    atomic.write_text(path, buffer.getvalue())

