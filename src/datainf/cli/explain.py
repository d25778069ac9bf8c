"""`datainf explain`: why did my model say this? One prompt (and response) against a training store.

Loads the model and adapter once, takes a prompt from the command line (and a response, or generates one),
tokenizes it as the training data was (the chat template when the store holds chat records: a conversation,
or a prompt and a completion of turns as TRL's conversational prompt-completion rows are), computes its
gradient, scores it against the store with each method and prints the most helpful and most harmful
training examples. ``--conversation FILE`` explains the last assistant turn of a whole conversation (or the
model's reply to it). ``--interactive`` keeps the model loaded and asks for the next prompt.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import click

from datainf.cli.common import model_dtype_option, parse_methods, setup
from datainf.cli.options import (
    current_scoring,
    device_option,
    method_option,
    option,
    overwrite_option,
    scoring_options,
)
from datainf.errors import DataInfError, parse_json
from datainf.outputs import EXPLAIN_FORMAT, check_output


def _cut(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: max(width - 1, 1)] + "…"


def _turns(prompt: str, system: str | None) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def read_conversation(path: str) -> tuple[list[dict[str, str]], str | None]:
    """A conversation file: a JSON list of {"role", "content"} turns, or an object with "messages" (one row of
    a chat JSONL). Returns (the turns before the reply to explain, that reply or None when the
    conversation ends on a user turn, for the model to answer)."""
    try:
        text = Path(path).read_bytes()
    except OSError as e:
        raise DataInfError(f"--conversation {path}: not a readable file ({e})") from None
    data = parse_json(text, f"--conversation {path}")
    turns = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(turns, list) or not turns:
        raise DataInfError(f"--conversation {path}: give a JSON list of {{\"role\", \"content\"}} turns, or an "
                           'object with "messages"')
    for i, turn in enumerate(turns):
        if not (isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)):
            raise DataInfError(f"--conversation {path}: turn {i} needs a 'role' and a 'content' string")
    turns = [{"role": t["role"], "content": t["content"]} for t in turns]
    if turns[-1]["role"] == "assistant":
        context, reply = turns[:-1], turns[-1]["content"]
    else:
        context, reply = turns, None
    if not any(t["role"] == "user" for t in context):
        raise DataInfError(f"--conversation {path}: no user turn before the reply to explain")
    return context, reply


def query_record(context: list[dict[str, str]] | str, response: str,
                 completion_turns: bool = False) -> dict[str, Any]:
    """The query as a record of the store's kind: the context turns (a system turn, a user turn, or a whole
    conversation) and an assistant turn for a chat store, as one conversation or, with ``completion_turns``
    (a store of TRL's conversational prompt-completion records), as a prompt of turns and a completion of
    one assistant turn; a prompt/response record (``context`` the prompt string) otherwise."""
    if isinstance(context, str):
        return {"prompt": context, "response": response}
    if completion_turns:
        return {"prompt": context, "response": [{"role": "assistant", "content": response}]}
    return {"messages": [*context, {"role": "assistant", "content": response}]}


def generate(model: Any, tokenizer: Any, context: list[dict[str, str]] | str, max_new_tokens: int) -> str:
    """The model's own greedy continuation: of the context turns through the chat template (a chat store),
    or of the prompt string."""
    import torch

    device = next(model.parameters()).device
    if not isinstance(context, str):
        ids = tokenizer.apply_chat_template(context, add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        inputs = {k: v.to(device) for k, v in ids.items()}
    else:
        inputs = {k: v.to(device) for k, v in tokenizer(context, return_tensors="pt").items()}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    new = out[0, inputs["input_ids"].shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True)


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
@method_option()
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
@click.pass_context
def command(ctx: click.Context, model_dir: str, adapter_dirs: tuple[str, ...], run_dir: str | None,
            store_dirs: tuple[str, ...], weights: str, prompt: str | None, response: str | None, system: str | None,
            conversation_path: str | None, methods: tuple[str, ...], k: int, json_path: str | None, overwrite: bool,
            interactive: bool, max_new_tokens: int, allow_mismatch: bool, model_dtype: str, device: str | None) -> None:
    """Which training examples made the model give this response to this prompt?"""
    from datainf.attributor import Attributor
    from datainf.cli.common import load_model
    from datainf.combine import Term, check_summable, combine
    from datainf.data.collate import TextCollator
    from datainf.gradients import ProjectionSettings
    from datainf.models.checkpoints import checkpoint_weights, load_adapter_weights
    from datainf.ranking import top_examples
    from datainf.scoring import check_preconditioned
    from datainf.store import GradientStore

    if json_path is not None:
        check_output(json_path, inputs={"model folder": model_dir, "adapter folder": adapter_dirs, "run folder": run_dir,
                                        "training store": store_dirs, "--conversation file": conversation_path},
                     kind="explain", overwrite=overwrite, option="--json")
    conversation: list[dict[str, str]] | None = None
    if conversation_path is not None:
        if prompt is not None or system is not None or interactive:
            raise DataInfError("--conversation holds the prompt and any system turn: leave out --prompt, --system "
                               "and --interactive")
        conversation, reply = read_conversation(conversation_path)
        if reply is not None and response is not None:
            raise DataInfError(f"--conversation {conversation_path} ends with the assistant's reply, which is the "
                               "response explained; leave out --response (or end the file on the user's turn)")
        response = response if reply is None else reply
        prompt = [t["content"] for t in conversation if t["role"] == "user"][-1]
    if prompt is None and not interactive:
        raise DataInfError("give --prompt TEXT (or --conversation FILE, or --interactive to type prompts)")
    names = parse_methods(methods)
    if run_dir is not None:
        adapter_dirs, store_dirs, pair_weights = run_pairs(run_dir, adapter_dirs, store_dirs, weights)
    elif not adapter_dirs:
        raise DataInfError("give --adapter (with its --store) or --run RUN (with --store, the folder `datainf grads "
                           "--run RUN` wrote)")
    if len(adapter_dirs) != len(store_dirs):
        raise DataInfError(f"{len(adapter_dirs)} --adapter for {len(store_dirs)} --store: give one training store "
                           "per adapter (each made by `datainf grads` with that adapter), in the same order")
    check_distinct_pairs(adapter_dirs, store_dirs)
    stores = [GradientStore.open(d) for d in store_dirs]
    if run_dir is None:
        pair_weights = checkpoint_weights(weights, adapter_dirs)
    store, store_dir = stores[0], store_dirs[0]
    meta = store.manifest.get("meta", {})
    task = meta.get("task")
    for other, other_dir in zip(stores, store_dirs):
        other_task = (other.manifest.get("meta") or {}).get("task")
        if other_task not in ("causal_lm", "causal_lm_mean"):
            raise DataInfError(f"store {other_dir} holds gradients of task {other_task!r}; explain answers for "
                               "causal LM stores (made by `datainf grads --task causal_lm`)")
    check_summable(stores, store_dirs)
    for method in names:  # a store preconditioned for another method is refused before the model is loaded
        for s in stores:
            check_preconditioned(s, _score_arguments(method))
    settings = dict(meta.get("collate") or {})
    records = store.records()
    completion_turns = bool(records) and isinstance(records[0].get("prompt"), list)  # conversational pairs
    chat = bool(settings.get("chat_template")) or bool(records and "messages" in records[0]) or completion_turns
    if not chat and (system is not None or conversation is not None):
        raise DataInfError(f"{'--system' if conversation is None else '--conversation'} applies to chat stores (made "
                           "from 'messages' records, prompt/completion turns, or with --chat-template); "
                           f"{store_dir} holds prompt/response or text records")
    _, device = setup(ctx, device)
    t0 = time.perf_counter()
    model, tokenizer = load_model(model_dir, adapter_dirs[0], task, None, device, model_dtype)
    load_seconds = time.perf_counter() - t0
    # every store was tokenized alike (check_summable): the first one's settings tokenize the query for all
    query_settings = {key: settings[key] for key in ("max_length", "append_eos") if key in settings}
    collate = TextCollator(tokenizer=tokenizer, task=task, assistant_turns="last", **query_settings)
    attributors = [Attributor(model, task=task, store=d, collate=collate, progress=False,
                              projection=ProjectionSettings.from_dict(s.projection))  # as the store was made
                   for d, s in zip(store_dirs, stores)]
    differences: list[str] = []
    for i, (adapter_dir, s, d) in enumerate(zip(adapter_dirs, stores, store_dirs)):
        if i:
            load_adapter_weights(model, adapter_dir)
        found = attributors[i].differences(s)
        if found and not allow_mismatch:
            raise DataInfError(f"store {d} was made with a different {found[0]}; explain with the model and adapter "
                               f"it was made with ({adapter_dir} is not it), or pass --allow-mismatch")
        differences += [f"{d}: {x}" for x in found]
    click.echo(f"loaded {model_dir} + {adapter_dirs[0]} in {load_seconds:.1f} s; store: {store.n_examples} training "
               f"examples, {len(store.block_names)} blocks{' (chat)' if chat else ''}")
    if len(adapter_dirs) > 1:
        click.echo(f"scores summed over {len(adapter_dirs)} checkpoints, weighted by "
                   f"{'lr' if run_dir is not None else weights}: " + ", ".join(
            f"{a} x {w:.3g}" for a, w in zip(adapter_dirs, pair_weights)))
    width = shutil.get_terminal_size((120, 24)).columns
    answers = []
    while True:
        if interactive and prompt is None:
            prompt = click.prompt("prompt (empty to stop)", default="", show_default=False)
            if not prompt.strip():
                break
        assert prompt is not None
        context = conversation if conversation is not None else _turns(prompt, system) if chat else prompt
        generated = response is None
        if len(adapter_dirs) > 1:
            load_adapter_weights(model, adapter_dirs[0])  # the model that answers
        if generated:
            response = generate(model, tokenizer, context, max_new_tokens)
        earlier = f" (after {len(conversation) - 1} earlier turns)" if conversation and len(conversation) > 1 else ""
        click.echo(f"\nprompt:   {_cut(prompt, width - 10)}{earlier}\nresponse: {_cut(response, width - 10)}"
                   f"{'   (generated by the model, greedy)' if generated else ''}")
        t0 = time.perf_counter()
        record = query_record(context, response, completion_turns)
        length = collate.token_counts([record])[0]
        if length > collate.max_length:
            click.echo(f"warning: this query is {length} tokens, more than the store's max_length of "
                       f"{collate.max_length}: its gradient is that of the last {collate.max_length} tokens, as "
                       "the training examples' were", err=True)
        queries = []
        for i, (adapter_dir, attributor) in enumerate(zip(adapter_dirs, attributors)):
            if i:
                load_adapter_weights(model, adapter_dir)
            queries.append(attributor.gradients([record], desc=None))
        summed: dict[str, Any] = {}
        timings: dict[str, float] = {}
        for method in names:  # one weighted sum of terms (datainf.combine), one term per checkpoint
            result = combine([Term(s, q, _score_arguments(method), w, label=a) for a, s, q, w in
                              zip(adapter_dirs, stores, queries, pair_weights)], allow_mismatch=allow_mismatch)
            timings[method] = sum(r.seconds for r in result.results)
            summed[method] = result.scores
        rows = []
        for method in names:
            rows += top_examples(summed[method], k, method=method, train_records=records, query_names=["query"])
        seconds = time.perf_counter() - t0
        for method in names:
            click.echo("\n" + render(rows, method, k, width, store.n_examples))
        click.echo(f"\n(gradient + scoring against {store.n_examples} examples"
                   f"{f' at {len(adapter_dirs)} checkpoints' if len(adapter_dirs) > 1 else ''}: {seconds:.2f} s)")
        answers.append({"system": system, "prompt": prompt, "response": response, "generated": generated,
                        **({"conversation": conversation} if conversation is not None else {}),
                        "seconds": timings, "rows": rows})
        if not interactive:
            break
        prompt, response = None, None
    if json_path is not None:
        from datainf import atomic

        checkpoints = [{"adapter": a, "store": d, "weight": w} for a, d, w in zip(adapter_dirs, store_dirs, pair_weights)]
        atomic.write_json(Path(json_path), {"format": EXPLAIN_FORMAT, "store": str(store_dir), "model": model_dir, "adapter": adapter_dirs[0],
                                            "k": k, "answers": answers, "mismatch": differences,
                                            **({"checkpoints": checkpoints} if len(adapter_dirs) > 1 else {}),
                                            **({"run": run_dir} if run_dir is not None else {})})
        click.echo(f"wrote {json_path}")


def _score_arguments(method: str) -> Any:
    """How explain scores with ``method``: under the scoring flags (``--damping``, ``--option``, ...)."""
    return current_scoring().arguments(method)


def check_distinct_pairs(adapter_dirs: tuple[str, ...] | list[str], store_dirs: tuple[str, ...] | list[str]) -> None:
    """Each checkpoint counts once in the sum: the same adapter folder or the same store folder (after
    resolving symbolic links and relative paths) given twice is refused, naming both pairs."""
    seen: dict[str, dict[Path, int]] = {"--adapter": {}, "--store": {}}
    for i, (adapter_dir, store_dir) in enumerate(zip(adapter_dirs, store_dirs), start=1):
        for flag, folder in (("--adapter", adapter_dir), ("--store", store_dir)):
            first = seen[flag].setdefault(Path(folder).resolve(), i)
            if first != i:
                raise DataInfError(
                    f"pair {i} (--adapter {adapter_dir} --store {store_dir}) repeats the {flag} of pair {first} "
                    f"(--adapter {adapter_dirs[first - 1]} --store {store_dirs[first - 1]}): each checkpoint "
                    "would count twice in the sum; give every (adapter, store) pair once")


def run_pairs(run_dir: str, adapter_dirs: tuple[str, ...], store_dirs: tuple[str, ...], weights: str
              ) -> tuple[list[str], list[str], list[float]]:
    """The (adapter, store, weight) of every checkpoint of ``run_dir`` from the run stores ``store_dirs[0]``
    (`datainf grads --run`), the final checkpoint first (the model that answers). Refused: --adapter or
    --weights beside --run, a --store that is not a folder of run stores, or one made from another run (other
    checkpoints or learning rates)."""
    from datainf.combine import is_run_stores, read_run_stores
    from datainf.models.checkpoints import run_checkpoints

    if adapter_dirs:
        raise DataInfError("--run gives the adapters (every checkpoint of the run): leave out --adapter")
    if weights != "lr":
        raise DataInfError("--run weighs each checkpoint by its learning rate: leave out --weights")
    if len(store_dirs) != 1 or not is_run_stores(store_dirs[0]):
        raise DataInfError(f"with --run, --store is the one folder `datainf grads --run {run_dir} --store FOLDER` "
                           f"wrote; {', '.join(store_dirs)} is not")
    stores = read_run_stores(store_dirs[0])
    found = {c.step: c for c in run_checkpoints(run_dir)}
    recorded = {r.step: r for r in stores}
    if set(found) != set(recorded) or any(abs(found[k].learning_rate - recorded[k].weight) >
                                          1e-12 * abs(found[k].learning_rate) for k in found):
        raise DataInfError(f"the run stores {store_dirs[0]} hold checkpoints at steps {sorted(recorded)}, the run "
                           f"{run_dir} at steps {sorted(found)} (or other learning rates); run `datainf grads --run "
                           f"{run_dir} --store {store_dirs[0]}` again to make the missing ones")
    order = sorted(found, reverse=True)
    return ([str(found[k].adapter) for k in order], [str(recorded[k].path) for k in order],
            [recorded[k].weight for k in order])
