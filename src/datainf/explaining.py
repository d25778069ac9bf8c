"""Why did my model say this? Many prompts (and responses) explained against a training store at once.

:func:`explain` is what ``datainf explain`` runs, as a library call: it opens the training stores (one, the
(adapter, store) pairs of a fine-tune's checkpoints, or a run's stores from ``datainf grads --run``), loads
the model with the answering adapter once, generates a response for every query that has none (greedy, with
the answering adapter), computes every query's gradient at each checkpoint, scores all of them at once with
each method through :func:`datainf.combine.combine` (one term per checkpoint, weighted; a method's fitted
state comes from the store's cache, :mod:`datainf.fitted`, fitted at most once), and returns one typed
:class:`Answer` per query: the prompt, the response, and the most helpful and harmful training examples of
every method. :class:`Explainer` keeps the model loaded between calls (``datainf explain --interactive``).

Queries are :class:`Query` objects, or rows read from a file by :func:`read_queries`: chat ``messages`` (the
last assistant turn is explained, the turns before it are its context; a conversation ending on a user turn
is answered by the model), prompt/response (an empty or missing response is generated) or text (the text is
a prompt; the model's continuation is explained), from JSON Lines, JSON, CSV/TSV or parquet.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datainf.errors import DataInfError, parse_json

if TYPE_CHECKING:  # torch is imported on first use, so that `datainf explain --help` stays quick
    from torch import Tensor

    from datainf.estimators import ScoreArguments

Turns = list[dict[str, str]]
PathLike = str | os.PathLike


@dataclass(frozen=True)
class Query:
    """One thing to explain: a prompt and the response to explain (None: the model's own, generated).

    ``system``: a system turn before the prompt (chat stores). ``context``: the turns of a conversation
    before the reply explained (chat stores; then ``prompt`` is its last user turn, shown in the answer,
    and ``system`` is left out). ``source`` names where the query came from in messages ("FILE: row 3").
    ``columns``: the data columns of its row in a queries file (e.g. ``(("skill", "add"),)``), carried into
    the answer."""

    prompt: str
    response: str | None = None
    system: str | None = None
    context: tuple[dict[str, str], ...] | None = None
    source: str | None = None
    columns: tuple[tuple[str, Any], ...] = ()

    def where(self) -> str:
        return self.source or "the query"


@dataclass
class Answer:
    """The explanation of one query: its ``prompt`` and ``response`` (``generated`` when the model wrote it),
    ``rows`` (for every method, the most helpful and most harmful training examples, as
    :func:`datainf.ranking.top_examples` makes them: method, kind, rank, train_index, score and the training
    record's text), ``scores`` (method -> every training example's summed score, (n_train,); answered from
    an index: the scores of the rows it returned, NaN elsewhere), the query's
    length in tokens before truncation, and ``seconds`` (method -> seconds of the scoring call that answered
    it, shared by every query of that call); ``columns``: the query row's data columns (e.g. skill), also
    in every CSV row as ``query_COLUMN``."""

    prompt: str
    response: str
    generated: bool
    rows: list[dict[str, Any]]
    scores: dict[str, Tensor] = field(repr=False)
    tokens: int = 0
    system: str | None = None
    conversation: Turns | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    #: token by token (``tokens=True``): the :class:`datainf.tokens.TokenAttribution` of the response
    by_token: Any = field(default=None, repr=False)
    k: int = 10
    columns: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The answer as ``explain --json`` writes it (the scores vectors left out; with token scores, each
        token's top-k lists under ``tokens``, as `datainf report --tokens` reads them)."""
        return {"system": self.system, "prompt": self.prompt, "response": self.response, "generated": self.generated,
                **({"conversation": self.conversation} if self.conversation is not None else {}),
                **({"columns": dict(self.columns)} if self.columns else {}),
                "seconds": dict(self.seconds), "rows": list(self.rows),
                **({"tokens": {**self.by_token.to_json(self.k), "seconds": self.by_token.seconds}}
                   if self.by_token is not None else {})}


@dataclass(frozen=True)
class Checkpoint:
    """One term of the sum: the adapter, the training store made with it, and its weight."""

    adapter: str
    store: str
    weight: float


@dataclass
class Explanation:
    """What :func:`explain` returns: one :class:`Answer` per query, in order, and what answered them: the
    methods and the :class:`ScoreArguments` each was scored with, the checkpoints summed (the first one
    answers), the model folder, the run folder (``run``), ``k``, what differs between the stores and the
    model (with ``allow_mismatch``), and how the checkpoints' scores were summed (``weighting``)."""

    answers: list[Answer]
    arguments: dict[str, ScoreArguments]
    checkpoints: list[Checkpoint]
    model: str
    k: int
    n_train: int
    run: str | None = None
    mismatch: list[str] = field(default_factory=list)
    weighting: str = "weights"

    @property
    def methods(self) -> list[str]:
        return list(self.arguments)

    def to_json(self) -> dict[str, Any]:
        """The ``explain --json`` document: ``{"format", "store", "model", "adapter", "k", "methods", "answers":
        [{"prompt", "response", "rows", ...}, ...], "mismatch"}`` (and the checkpoints when several)."""
        from datainf.outputs import EXPLAIN_FORMAT

        first = self.checkpoints[0]
        return {"format": EXPLAIN_FORMAT, "store": first.store, "model": self.model, "adapter": first.adapter,
                "k": self.k, "methods": {m: a.to_dict() for m, a in self.arguments.items()},
                "answers": [a.to_json() for a in self.answers], "mismatch": list(self.mismatch),
                **({"checkpoints": [vars(c) for c in self.checkpoints], "weighting": self.weighting}
                   if len(self.checkpoints) > 1 else {}),
                **({"run": self.run} if self.run is not None else {})}

    def csv_rows(self) -> list[dict[str, Any]]:
        """One row per query x training example shown (see :data:`CSV_COLUMNS`)."""
        out = []
        for j, answer in enumerate(self.answers):
            for row in answer.rows:
                out.append({"query_index": j, "prompt": answer.prompt, "response": answer.response,
                            "generated": answer.generated, **{k: v for k, v in row.items() if k != "query"},
                            **{f"query_{k}": v for k, v in answer.columns.items() if f"query_{k}" not in row}})
        return out


#: the columns of ``explain --csv`` (those of the answer first, then the row's)
CSV_COLUMNS = ("query_index", "prompt", "response", "generated", "method", "kind", "rank", "train_index", "score",
               "train_prompt", "train_response", "train_text", "train_label", "train_label_name")


def score_arguments(methods: Sequence[str] | str | None = None, remedies: Mapping[str, Any] | None = None
                    ) -> list[ScoreArguments]:
    """How :func:`explain` scores: each method (names, or comma-separated text; None: the default method) with
    its defaults and the remedies asked for (ScoreArguments fields of :mod:`datainf.remedies`: ``remove_top``,
    ``adam_moments``, ``damping_scale``, ``damping_rule``). The default is the one measured best on causal LM
    stores (:func:`datainf.estimators.defaults.default_spec`: EK-FAC), the remedies asked for on top. An unknown
    method is refused by ScoreArguments."""
    from datainf.estimators import ScoreArguments, arguments_from_spec
    from datainf.estimators.defaults import default_spec

    if methods is None:
        return [arguments_from_spec(default_spec(token_level=True)).replace(**dict(remedies or {}))]
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    return [ScoreArguments(method=m, **dict(remedies or {})) for m in dict.fromkeys(methods)]


# --------------------------------------------------------------------------------------------------
# reading queries
# --------------------------------------------------------------------------------------------------


def split_conversation(turns: Any, where: str) -> tuple[Turns, str | None]:
    """A conversation (a list of {"role", "content"} turns) as (the turns before the reply to explain, that
    reply, or None when it ends on a user turn, for the model to answer); one error naming ``where``."""
    if not isinstance(turns, list) or not turns:
        raise DataInfError(f"{where}: give a non-empty list of {{\"role\", \"content\"}} turns")
    for i, turn in enumerate(turns):
        if not (isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)):
            raise DataInfError(f"{where}: turn {i} needs a 'role' and a 'content' string")
    turns = [{"role": t["role"], "content": t["content"]} for t in turns]
    context, reply = (turns[:-1], turns[-1]["content"]) if turns[-1]["role"] == "assistant" else (turns, None)
    if not any(t["role"] == "user" for t in context):
        raise DataInfError(f"{where}: no user turn before the reply to explain")
    return context, reply


def conversation_query(turns: Any, where: str, response: str | None = None) -> Query:
    """A :class:`Query` of a conversation's last assistant turn (or, ending on a user turn, of the model's
    reply to it, or of ``response``); refused when it ends with a reply and ``response`` is given too."""
    context, reply = split_conversation(turns, where)
    if reply is not None and response is not None:
        raise DataInfError(f"{where} ends with the assistant's reply, which is the response explained; leave out "
                           "the response (or end the conversation on the user's turn)")
    prompt = [t["content"] for t in context if t["role"] == "user"][-1]
    return Query(prompt, reply if reply is not None else response, context=tuple(context), source=where)


def read_conversation(path: str) -> tuple[Turns, str | None]:
    """A conversation file: a JSON list of {"role", "content"} turns, or an object with "messages" (one row of
    a chat JSONL). Returns (the turns before the reply to explain, that reply or None)."""
    try:
        text = Path(path).read_bytes()
    except OSError as e:
        raise DataInfError(f"--conversation {path}: not a readable file ({e})") from None
    data = parse_json(text, f"--conversation {path}")
    turns = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(turns, list) or not turns:
        raise DataInfError(f"--conversation {path}: give a JSON list of {{\"role\", \"content\"}} turns, or an "
                           'object with "messages"')
    return split_conversation(turns, f"--conversation {path}")


def _text_cell(value: Any, where: str, column: str, *, optional: bool) -> str | None:
    """A cell that must hold text (``optional``: or nothing: absent, null or empty, as a CSV's empty cell)."""
    if optional and (value is None or value == ""):
        return None
    if not isinstance(value, str) or not value.strip():
        raise DataInfError(f"{where}, column {column!r} must hold text{' (or be empty)' if optional else ''}, "
                           f"not {_shown(value)}; fill it in or drop the row")
    return value


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"


def _turn_list(value: Any, where: str, column: str) -> Any:
    """A cell of chat turns: a list, or its JSON text (a CSV cell)."""
    if isinstance(value, str):
        try:
            return parse_json(value, f"{where}, column {column!r}")
        except DataInfError:
            pass  # refused by split_conversation, by row and column
    return value


def read_queries(path: PathLike, *, messages_column: str = "messages", prompt_column: str = "prompt",
                 response_column: str = "response", text_column: str = "text", system_column: str = "system"
                 ) -> list[Query]:
    """The queries of a data file (JSONL, JSON, CSV/TSV, parquet, a save_to_disk folder), one per row, the
    format found from its columns as ``datainf grads`` finds it: ``messages`` (chat turns; the last assistant
    turn is explained, or the model answers a conversation ending on a user turn), ``prompt`` with an optional
    ``response`` (or ``completion``; empty or missing: generated) and ``system``, or ``text`` (a prompt whose
    continuation the model generates). A row that does not fit is refused with the file, its row number
    (counted from 0, as ``grads`` counts) and column."""
    from datainf.data.tables import read_table
    from datainf.data.text import lm_format_of

    rows, columns = read_table(path)
    if not rows:
        raise DataInfError(f"{path} holds no queries; give a file with at least one row")
    if response_column not in columns and "completion" in columns:
        response_column = "completion"
    found = lm_format_of(columns, messages_column, prompt_column, text_column)
    kind = "prompt" if found == "prompt-response" else found
    if kind is None:
        raise DataInfError(f"{path} has none of the columns {messages_column!r} (chat), {prompt_column!r} (with an "
                           f"optional {response_column!r}) or {text_column!r}; its columns are {columns}")
    out = []
    for i, row in enumerate(rows):
        where = f"{path}: row {i}"
        if kind == "messages":
            turns = _turn_list(row.get(messages_column), where, messages_column)
            out.append(conversation_query(turns, f"{where}, column {messages_column!r}"))
            continue
        if kind == "text":
            out.append(Query(_text_cell(row.get(text_column), where, text_column, optional=False), source=where))
            continue
        prompt, response = row.get(prompt_column), row.get(response_column)
        if isinstance(prompt, list) or isinstance(response, list):  # TRL's conversational prompt-completion
            turns = _turn_list(prompt, where, prompt_column)
            if not isinstance(turns, list):
                raise DataInfError(f"{where}: column {response_column!r} holds a list but {prompt_column!r} does "
                                   "not; give both as text, or both as lists of {'role', 'content'} turns (TRL's "
                                   "conversational prompt-completion)")
            reply = _turn_list(response, where, response_column) if response not in (None, "") else None
            if reply is not None and not (isinstance(reply, list) and len(reply) == 1 and isinstance(reply[0], dict)
                                          and reply[0].get("role") == "assistant"
                                          and isinstance(reply[0].get("content"), str)):
                raise DataInfError(f"{where}, column {response_column!r} must be one assistant turn "
                                   '[{"role": "assistant", "content": ...}] (or be empty)')
            query = conversation_query(turns, f"{where}, column {prompt_column!r}",
                                       None if reply is None else reply[0]["content"])
            out.append(Query(query.prompt, query.response, context=query.context, source=where))
            continue
        out.append(Query(_text_cell(prompt, where, prompt_column, optional=False),
                         _text_cell(response, where, response_column, optional=True),
                         _text_cell(row.get(system_column), where, system_column, optional=True), source=where))
    from dataclasses import replace

    from datainf.ranking import data_columns

    formats = {messages_column, prompt_column, response_column, text_column, system_column}
    return [replace(q, columns=tuple((k, v) for k, v in data_columns(row).items() if k not in formats))
            for q, row in zip(out, rows)]


# --------------------------------------------------------------------------------------------------
# the checkpoints: one (adapter, store, weight) per term
# --------------------------------------------------------------------------------------------------


def check_distinct_pairs(adapter_dirs: Sequence[str], store_dirs: Sequence[str]) -> None:
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


def run_pairs(run_dir: PathLike, adapter_dirs: Sequence[str], store_dirs: Sequence[str], weights: str
              ) -> list[Checkpoint]:
    """Every checkpoint of ``run_dir`` with its store in the run stores ``store_dirs[0]`` (`datainf grads
    --run`) and its learning rate, the final checkpoint first (the model that answers). Refused: adapters or
    weights beside a run, a store that is not a folder of run stores, or one made from another run (other
    checkpoints or learning rates)."""
    from datainf.combine import is_run_stores, read_run_stores
    from datainf.models.checkpoints import run_checkpoints

    if adapter_dirs:
        raise DataInfError("--run gives the adapters (every checkpoint of the run): leave out --adapter")
    if weights != "lr":
        raise DataInfError("--run weighs each checkpoint by its learning rate: leave out --weights")
    if len(store_dirs) != 1 or not is_run_stores(store_dirs[0]):
        raise DataInfError(f"with --run, --store is the one folder `datainf grads --run {run_dir} --store FOLDER` "
                           f"wrote; {', '.join(map(str, store_dirs))} is not")
    stores = read_run_stores(store_dirs[0])
    found = {c.step: c for c in run_checkpoints(run_dir)}
    recorded = {r.step: r for r in stores}
    if set(found) != set(recorded) or any(abs(found[k].learning_rate - recorded[k].weight) >
                                          1e-12 * abs(found[k].learning_rate) for k in found):
        raise DataInfError(f"the run stores {store_dirs[0]} hold checkpoints at steps {sorted(recorded)}, the run "
                           f"{run_dir} at steps {sorted(found)} (or other learning rates); run `datainf grads --run "
                           f"{run_dir} --store {store_dirs[0]}` again to make the missing ones")
    return [Checkpoint(str(found[k].adapter), str(recorded[k].path), recorded[k].weight)
            for k in sorted(found, reverse=True)]


def _names(value: PathLike | Sequence[PathLike] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [str(value)]
    return [str(v) for v in value]


def checkpoints_of(adapter: PathLike | Sequence[PathLike] | None, store: PathLike | Sequence[PathLike],
                   run: PathLike | None = None, weights: str = "lr") -> list[Checkpoint]:
    """The terms of the sum from ``explain``'s arguments: the run's checkpoints (``run`` with its run stores),
    or the (adapter, store) pairs, weighted by ``weights`` ('lr', 'equal' or comma-separated numbers)."""
    from datainf.models.checkpoints import checkpoint_weights

    adapters, stores = _names(adapter), _names(store)
    if not stores:
        raise DataInfError("give the training store (--store), made by `datainf grads`")
    if run is not None:
        return run_pairs(run, adapters, stores, weights)
    if not adapters:
        raise DataInfError("give --adapter (with its --store) or --run RUN (with --store, the folder `datainf grads "
                           "--run RUN` wrote)")
    if len(adapters) != len(stores):
        raise DataInfError(f"{len(adapters)} --adapter for {len(stores)} --store: give one training store per "
                           "adapter (each made by `datainf grads` with that adapter), in the same order")
    check_distinct_pairs(adapters, stores)
    return [Checkpoint(a, s, w) for a, s, w in zip(adapters, stores, checkpoint_weights(weights, adapters))]


#: what must agree between the checkpoints of one fine-tune for their weights to swap into one model
LORA_SHAPE = ("r", "lora_alpha", "target_modules")


def check_adapters(checkpoints: Sequence[Checkpoint]) -> None:
    """Refuse, before any model is loaded, an adapter folder without peft's files (adapter_config.json and
    adapter_model.safetensors or .bin), and a checkpoint whose LoRA (rank, alpha, target modules) is not the
    answering adapter's, so that its weights could not be swapped into the loaded model."""
    from datainf.data.tables import read_json_object

    first: dict[str, Any] | None = None
    for c in checkpoints:
        folder = Path(c.adapter)
        if not (folder / "adapter_config.json").is_file():
            raise DataInfError(f"{folder} has no adapter_config.json; pass a folder written by `datainf finetune` "
                               "or peft's save_pretrained (a checkpoint-N folder of the Trainer or TRL holds one)")
        if not any((folder / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
            raise DataInfError(f"{folder} has no adapter_model.safetensors (or .bin): the LoRA weights are missing")
        config = read_json_object(folder / "adapter_config.json", "pass a folder written by peft's save_pretrained")
        shape = {key: sorted(v) if isinstance(v := config.get(key), list) else v for key in LORA_SHAPE}
        if first is None:
            first = shape
            continue
        for key in LORA_SHAPE:
            if shape[key] != first[key]:
                raise DataInfError(f"{folder} is not a checkpoint of the same adapter as {checkpoints[0].adapter}: "
                                   f"its {key} is {shape[key]!r}, {first[key]!r} in {checkpoints[0].adapter}")


# --------------------------------------------------------------------------------------------------
# the explainer
# --------------------------------------------------------------------------------------------------


class Explainer:
    """The stores and the model of an explanation, loaded once; :meth:`explain` answers queries.

    Everything that can be refused without the model is refused when it is made (stores that are not causal
    LM stores, that cannot be summed, or are preconditioned for another method; unknown methods); the model
    is loaded by :meth:`load` (or the first :meth:`explain`), and a store made with another model or adapter
    is refused then, unless ``allow_mismatch``. How each method scores comes in one way: ``arguments``, one
    :class:`~datainf.estimators.ScoreArguments` per method (the CLI's scoring flags, or :func:`score_arguments`
    from method names and remedies; default: the default method as it is)."""

    def __init__(self, model: PathLike, *, store: PathLike | Sequence[PathLike],
                 adapter: PathLike | Sequence[PathLike] | None = None, run: PathLike | None = None,
                 weights: str = "lr", arguments: Sequence[ScoreArguments] | None = None, k: int = 10,
                 max_new_tokens: int = 64, allow_mismatch: bool = False, model_dtype: str = "float32",
                 device: str | None = None, tokens: bool = False, index: PathLike | None = None,
                 initial: bool = False, initial_seed: int | None = None, weighting: str = "weights") -> None:
        from datainf.combine import WEIGHTINGS, check_summable
        from datainf.estimators import ScoreArguments, method_names
        from datainf.scoring import check_preconditioned
        from datainf.store import GradientStore
        from datainf.tasks import token_level

        arguments = score_arguments() if arguments is None else list(arguments)
        if not arguments:
            raise DataInfError(f"no method given; choose from {', '.join(method_names())}")
        if not all(isinstance(a, ScoreArguments) for a in arguments):
            raise DataInfError("arguments: give one datainf ScoreArguments per method (see score_arguments)")
        twice = [a.method for i, a in enumerate(arguments) if a.method in [b.method for b in arguments[:i]]]
        if twice:
            raise DataInfError(f"arguments: method {twice[0]!r} is given twice; give each method once")
        if model_dtype not in ("float32", "float16", "bfloat16", "float64"):
            raise DataInfError(f"model_dtype must be float32, float16, bfloat16 or float64, got {model_dtype!r}")
        if k < 1 or max_new_tokens < 1:
            raise DataInfError(f"k and max_new_tokens must be >= 1, got {k} and {max_new_tokens}")
        self.model_dir, self.run = str(model), None if run is None else str(run)
        self.checkpoints = checkpoints_of(adapter, store, run, weights)
        # step 0 from the final adapter alone (`datainf grads --initial`): the answer is the final adapter's,
        # the gradients are taken at the LoRA it started from (B = 0, A from the recorded seed or initial_seed)
        self.initial, self.initial_seed, self.initial_note = initial, initial_seed, ""
        if initial_seed is not None and not initial:
            raise DataInfError("the seed is --initial's (the seed of step 0's LoRA A): give --initial too, or drop "
                               "--seed")
        if initial and (run is not None or len(self.checkpoints) != 1):
            raise DataInfError("--initial explains from one final --adapter and the training store `datainf grads "
                               "--initial` made with it; a run (--run) has its own step 0 (checkpoint-0)")
        self._states: dict[str, dict[str, Any]] = {}  # with initial: the LoRA weights, "final" and "initial"
        self._initial_fingerprint: dict[str, Any] = {}
        check_adapters(self.checkpoints)
        self.run_stores = _names(store)[0] if run is not None else None  # the folder of `grads --run`
        # each method's ScoreArguments (the command line's scoring flags, or score_arguments' defaults + remedies)
        self.arguments = {a.method: a for a in arguments}
        self.k, self.max_new_tokens, self.allow_mismatch = k, max_new_tokens, allow_mismatch
        self.tokens = tokens  # also score every response token (datainf.tokens)
        if weighting not in WEIGHTINGS:
            raise DataInfError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
        if weighting != "weights" and len(self.checkpoints) < 2:
            raise DataInfError(f"--weighting {weighting} sums a run's checkpoints: give --run (or several --adapter "
                               "and --store), or drop --weighting")
        if weighting != "weights" and tokens:
            raise DataInfError(f"--tokens sums the checkpoints by their weights alone; drop --tokens or --weighting "
                               f"{weighting}")
        self.weighting = weighting  # how the checkpoints' scores are summed (datainf.combine.WEIGHTINGS)
        self.model_dtype, self.device = model_dtype, device
        self.stores = [GradientStore.open(c.store) for c in self.checkpoints]
        for s, c in zip(self.stores, self.checkpoints):
            task = s.metadata.task
            if not token_level(task):
                raise DataInfError(f"store {c.store} holds gradients of task {task!r}; explain answers for causal "
                                   "LM stores (made by `datainf grads --task causal_lm`)")
        check_summable(self.stores, [c.store for c in self.checkpoints])
        for arguments in self.arguments.values():  # a store preconditioned for another method: refused now
            for s in self.stores:
                check_preconditioned(s, arguments)
        first = self.stores[0]
        meta = first.metadata
        self.task: str = str(meta.task)
        self.collate_settings = dict(meta.collate) if isinstance(meta.collate, dict) else {}
        self.records = first.records()
        self.completion_turns = bool(self.records) and isinstance(self.records[0].get("prompt"), list)
        self.chat = (bool(self.collate_settings.get("chat_template")) or self.completion_turns
                     or bool(self.records and "messages" in self.records[0]))
        self.index: dict[str, Any] = {}  # method -> its top-k index (datainf.index): answers without a pass
        if index is not None:
            from datainf.index import index_for

            if len(self.stores) > 1:
                raise DataInfError(f"--index {index} answers from one training store; leave it out to sum the "
                                   "scores over checkpoints")
            self.index = {m: index_for(index, first, a) for m, a in self.arguments.items()}
        self.mismatch: list[str] = []
        self.load_seconds: float | None = None
        self._model: Any = None
        self._current: int | str = 0  # which checkpoint's weights the model holds ("final"/"initial": initial)

    @property
    def n_train(self) -> int:
        return self.stores[0].n_examples

    def notes(self) -> list[str]:
        """What the user should know about how the queries are scored against these stores: a training loss
        on every token (TRL's default for 'messages' data) is compared with the response's loss alone."""
        if self.collate_settings.get("loss_tokens") == "all":
            return [f"the training store {self.checkpoints[0].store} holds gradients of the loss on every token "
                    "(--loss-tokens all); each query is scored by its response's loss alone (the answer explained)"]
        return []

    def check(self, queries: Sequence[Query]) -> None:
        """Refuse queries this store cannot answer (a system turn or a conversation for a store of
        prompt/response or text records), naming the first one, before the model is loaded."""
        if not queries:
            raise DataInfError("no queries to explain; give at least one prompt")
        for q in queries:
            if not isinstance(q, Query):
                raise DataInfError(f"a query must be a datainf.explaining.Query or a prompt string, not {type(q).__name__}")
            if not self.chat and (q.system is not None or q.context is not None):
                raise DataInfError(f"{q.where()}: a {'system turn' if q.context is None else 'conversation'} applies "
                                   "to chat stores (made from 'messages' records, prompt/completion turns, or with "
                                   f"--chat-template); {self.checkpoints[0].store} holds prompt/response or text "
                                   "records")

    def load(self) -> float:
        """Load the model with the answering adapter (once), check each store against its checkpoint, and
        return the seconds the load took."""
        if self._model is not None:
            return self.load_seconds or 0.0
        import torch

        from datainf.attributor import Attributor
        from datainf.data.collate import TextCollator
        from datainf.gradients import ProjectionSettings
        from datainf.models.llm import load_causal_lm_adapter

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise DataInfError("--device cuda was asked for but no CUDA device is available; use --device cpu")
        t0 = time.perf_counter()
        model, tokenizer = load_causal_lm_adapter(self.model_dir, self.checkpoints[0].adapter,
                                                  dtype=getattr(torch, self.model_dtype), device=device)
        self.load_seconds = time.perf_counter() - t0
        # every store was tokenized alike (check_summable): the first one's settings tokenize the queries, and a
        # query longer than max_length is cut on the side the training rows were (TRL's keep_start, say)
        kept = {key: self.collate_settings[key] for key in ("max_length", "append_eos", "truncation")
                if key in self.collate_settings}
        self.collate = TextCollator(tokenizer=tokenizer, task=self.task, assistant_turns="last", **kept)
        self.attributors = [Attributor(model, task=self.task, store=c.store, collate=self.collate, progress=False,
                                       projection=ProjectionSettings.from_dict(s.projection))  # as the store was made
                            for c, s in zip(self.checkpoints, self.stores)]
        self._model, self.tokenizer = model, tokenizer
        if self.initial:
            self._initial_weights(device)
        for i, (c, s) in enumerate(zip(self.checkpoints, self.stores)):
            self._use(i, scoring=True)
            found = self.differences(s, c)
            if found and not self.allow_mismatch:
                self._model = None
                raise DataInfError(f"store {c.store} was made with a different {found[0]}; explain with the model, "
                                   "adapter and --model-dtype it was made with, or pass --allow-mismatch")
            self.mismatch += [f"{c.store}: {x}" for x in found]
        return self.load_seconds

    def differences(self, store: Any, checkpoint: Checkpoint) -> list[str]:
        """What differs between the loaded model (with ``checkpoint``'s weights) and the one ``store`` was made
        with: "adapter (fingerprint F in the store, G for ADAPTER on MODEL as float32)", the store's first."""
        from datainf.store import fingerprint_model

        mine = self._initial_fingerprint if self._states else fingerprint_model(self._model)
        loaded = (f"step 0 of {checkpoint.adapter}" if self._states else checkpoint.adapter) + (
            f" on {self.model_dir} as {self.model_dtype}")
        return [f"{key} (fingerprint {store.fingerprints[key]} in the store, {mine[key]} for {loaded})"
                for key in ("model", "adapter") if store.fingerprints.get(key) not in (None, mine[key])]

    def _initial_weights(self, device: str) -> None:
        """With ``initial``: step 0's LoRA weights rebuilt from the answering adapter's config
        (:func:`datainf.models.initial.initial_lora`, as ``datainf grads --initial`` builds them; the base model
        is loaded a second time for it and let go), kept beside the final ones."""
        import torch

        from datainf.models.initial import initial_lora

        adapter = self.checkpoints[0].adapter
        step0, _, used, source = initial_lora(self.model_dir, adapter, seed=self.initial_seed,
                                              dtype=getattr(torch, self.model_dtype), device=device)
        from datainf.store import fingerprint_model

        lora = {n: p for n, p in self._model.named_parameters() if "lora_" in n}
        start = {n: p.detach().clone() for n, p in step0.named_parameters() if "lora_" in n}
        self._initial_fingerprint = fingerprint_model(step0)  # what `grads --initial` recorded in its store
        del step0
        if set(start) != set(lora):
            raise DataInfError(f"step 0 of {adapter} does not have the adapter's LoRA parameters (first missing: "
                               f"{sorted(set(lora) ^ set(start))[0]}); --initial applies to adapters of one LoRA")
        self._states = {"final": {n: p.detach().clone() for n, p in lora.items()}, "initial": start}
        self.initial_note = f"step 0 of {adapter}: B = 0, A drawn with seed {used} ({source})"

    def _use(self, i: int, scoring: bool = False) -> None:
        """Put checkpoint ``i``'s LoRA weights into the model (the answering adapter is checkpoint 0); with
        ``scoring`` the weights its store's gradients were taken at (with ``initial``: step 0's)."""
        from datainf.models.checkpoints import load_adapter_weights

        if self._states:
            want = "initial" if scoring else "final"
            if want != self._current:
                import torch

                with torch.no_grad():
                    for n, p in self._model.named_parameters():
                        if n in self._states[want]:
                            p.copy_(self._states[want][n])
                self._current = want
            return
        if i != self._current:
            load_adapter_weights(self._model, self.checkpoints[i].adapter)
            self._current = i

    def context(self, query: Query) -> Turns | str:
        """What the model is given: the conversation's turns, or the system and user turns (chat stores), or
        the prompt string."""
        if query.context is not None:
            return [dict(t) for t in query.context]
        if self.chat:
            return ([{"role": "system", "content": query.system}] if query.system else []) + [
                {"role": "user", "content": query.prompt}]
        return query.prompt

    def record(self, context: Turns | str, response: str) -> dict[str, Any]:
        """The query as a record of the store's kind: the context turns and an assistant turn (a chat store: as
        one conversation, or as a prompt of turns and a completion for TRL's conversational prompt-completion
        records), or a prompt/response record."""
        if isinstance(context, str):
            return {"prompt": context, "response": response}
        if self.completion_turns:
            return {"prompt": context, "response": [{"role": "assistant", "content": response}]}
        return {"messages": [*context, {"role": "assistant", "content": response}]}

    def generate(self, context: Turns | str) -> str:
        """The answering model's greedy continuation of the context (through the chat template for turns)."""
        import torch

        self._use(0)
        model, tokenizer = self._model, self.tokenizer
        device = next(model.parameters()).device
        if isinstance(context, str):
            inputs = {k: v.to(device) for k, v in tokenizer(context, return_tensors="pt").items()}
        else:
            ids = tokenizer.apply_chat_template(context, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)
            inputs = {k: v.to(device) for k, v in ids.items()}
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    def explain(self, queries: Iterable[Query | str]) -> list[Answer]:
        """Answer every query: generate the missing responses with the answering adapter, take every query's
        gradient at each checkpoint, and score them all at once per method (one weighted sum of terms,
        :func:`datainf.combine.combine`, one term per checkpoint)."""
        from datainf.combine import Term, combine, run_terms
        from datainf.ranking import KINDS, hit_rows, top_examples

        queries = [Query(q) if isinstance(q, str) else q for q in queries]
        self.check(queries)
        self.load()
        contexts = [self.context(q) for q in queries]
        responses = [q.response if q.response is not None else self.generate(c) for q, c in zip(queries, contexts)]
        records = [self.record(c, r) for c, r in zip(contexts, responses)]
        lengths = self.collate.token_counts(records)
        by_token: list[Any] = [None] * len(records)
        if self.tokens:  # token by token first: a response without loss tokens is refused before any scoring
            from datainf.tokens import token_attribution

            for j, record in enumerate(records):
                by_token[j] = token_attribution(
                    self.attributors, record, list(self.arguments.values()), weights=[c.weight for c in self.checkpoints],
                    load=lambda i: self._use(i, scoring=True), allow_mismatch=self.allow_mismatch)
        gradients = []
        for i, attributor in enumerate(self.attributors):
            self._use(i, scoring=True)
            gradients.append(attributor.gradients(records, desc=None))
        self._use(0)
        scores: dict[str, Tensor] = {}
        seconds: dict[str, float] = {}
        found: dict[str, Any] = {}
        for method, arguments in self.arguments.items():
            if method in self.index:  # the top k from the index; the scores of the rows it returns, NaN elsewhere
                t0 = time.perf_counter()
                found[method] = self.index[method].search(gradients[0], self.k)
                seconds[method] = time.perf_counter() - t0
                scores[method] = _index_scores(found[method], self.n_train, len(records))
                continue
            if self.run_stores is not None:  # the run stores' own terms: paired by checkpoint, weighted by rate
                by_name = {Path(c.store).name: g for c, g in zip(self.checkpoints, gradients)}
                terms = run_terms(self.run_stores, by_name, arguments)
            else:
                terms = [Term(s, g, arguments, c.weight, label=c.adapter)
                         for c, s, g in zip(self.checkpoints, self.stores, gradients)]
            result = combine(terms, allow_mismatch=self.allow_mismatch, weighting=self.weighting)
            scores[method], seconds[method] = result.scores, sum(r.seconds for r in result.results)
        name = "query" if len(queries) == 1 else None
        answers = []
        for j, (q, response) in enumerate(zip(queries, responses)):
            rows = []
            for method in self.arguments:
                if method in found:
                    rows += [row for kind in KINDS for row in hit_rows(
                        found[method][kind][j], method=method, query=name or f"query {j}", kind=kind,
                        train_records=self.records)]
                    continue
                rows += top_examples(scores[method][:, j], self.k, method=method, train_records=self.records,
                                     query_names=[name or f"query {j}"])
            answers.append(Answer(prompt=q.prompt, response=response, generated=q.response is None, rows=rows,
                                  scores={m: s[:, j] for m, s in scores.items()}, tokens=lengths[j], system=q.system,
                                  conversation=None if q.context is None else [dict(t) for t in q.context],
                                  seconds=dict(seconds), by_token=by_token[j], k=self.k, columns=dict(q.columns)))
        return answers

    def explanation(self, answers: list[Answer]) -> Explanation:
        """The answers with what answered them."""
        return Explanation(answers=answers, arguments=dict(self.arguments), checkpoints=list(self.checkpoints),
                           model=self.model_dir, k=self.k, n_train=self.n_train, run=self.run,
                           mismatch=list(self.mismatch), weighting=self.weighting)


def _index_scores(found: Mapping[str, list[list[tuple[int, float]]]], n_train: int, m: int) -> Tensor:
    """(n_train, m) float64: the scores of the rows an index returned, NaN for the rows it did not score."""
    import torch

    out = torch.full((n_train, m), float("nan"), dtype=torch.float64)
    for lists in found.values():
        for j, hits in enumerate(lists):
            for i, score in hits:
                out[i, j] = score
    return out


def explain(queries: Iterable[Query | str] | Query | str, *, model: PathLike, store: PathLike | Sequence[PathLike],
            adapter: PathLike | Sequence[PathLike] | None = None, run: PathLike | None = None, weights: str = "lr",
            methods: Sequence[str] | str | None = None, k: int = 10, max_new_tokens: int = 64,
            allow_mismatch: bool = False, model_dtype: str = "float32", device: str | None = None,
            remedies: Mapping[str, Any] | None = None, tokens: bool = False, initial: bool = False,
            initial_seed: int | None = None, weighting: str = "weights") -> Explanation:
    """Which training examples made the model give these responses to these prompts?

    ``queries``: :class:`Query` objects (or prompt strings, answered by the model), e.g. from
    :func:`read_queries`. ``model``: the base model folder; ``adapter`` and ``store``: the LoRA adapter and the
    training store ``datainf grads`` made with it, or several of each (checkpoints of one fine-tune, the
    first answers; scores summed with ``weights``: 'lr', 'equal' or comma-separated numbers); or ``run``: a
    fine-tuning run folder with ``store`` the run stores of ``datainf grads --run`` (every checkpoint,
    weighted by its learning rate). ``methods``: registered method names (default EK-FAC, the most accurate measured
    on LoRA causal LMs: :data:`datainf.estimators.defaults.DEFAULTS`); ``remedies``: ScoreArguments fields
    of :mod:`datainf.remedies` applied to every method (e.g. ``{"remove_top": 1}``); ``tokens``: also score
    every response token (:mod:`datainf.tokens`; each answer's ``by_token``); ``initial``: the gradients at step 0
    of ``adapter``'s fine-tune, with ``store`` made by ``datainf grads --initial`` (``initial_seed`` for an adapter
    that records no seed); ``weighting``: how several checkpoints' scores are summed
    (:data:`datainf.combine.WEIGHTINGS`: by their weights, or each checkpoint's scores divided by their standard
    deviation over this call's entries first, optionally with the weights squared). Returns an
    :class:`Explanation`: one :class:`Answer` per query, in order."""
    if isinstance(queries, (str, Query)):
        queries = [queries]
    explainer = Explainer(model, store=store, adapter=adapter, run=run, weights=weights,
                          arguments=score_arguments(methods, remedies), k=k, max_new_tokens=max_new_tokens,
                          allow_mismatch=allow_mismatch, model_dtype=model_dtype, device=device, tokens=tokens,
                          initial=initial, initial_seed=initial_seed, weighting=weighting)
    queries = [Query(q) if isinstance(q, str) else q for q in queries]
    explainer.check(queries)
    return explainer.explanation(explainer.explain(queries))


__all__ = ["CSV_COLUMNS", "Answer", "Checkpoint", "Explainer", "Explanation", "Query", "check_distinct_pairs",
           "checkpoints_of", "conversation_query", "explain", "read_conversation", "read_queries", "run_pairs",
           "score_arguments", "split_conversation"]
