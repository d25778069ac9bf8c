"""Token-level attribution: which training examples push each token of a response.

For one query (a prompt and a response, tokenized as the training store's examples were), the query
gradient of response token t is the gradient of that token's negative log-likelihood alone,
``-log p(y_t | prompt, y_<t)``, for every token t that carries the loss (the tokens the store's loss counts:
the response, or the assistant turn with its end-of-turn token, and an appended EOS). Each is scored against
the training store with any registered method, through the same path as a whole query
(:func:`datainf.combine.combine` -> :func:`datainf.scoring.score_store`), and with the store's projection.

```
from datainf.tokens import token_attribution
attribution = token_attribution(attributor, {"prompt": "2 + 2 =", "response": " 4"}, ["datainf"])
attribution.scores["datainf"]     # (n_train, n_tokens) float64
attribution.tokens.pieces         # each token's text; .offsets its (start, end) in .tokens.text
attribution.top("datainf", k=5)   # per token: its most helpful and most harmful training examples
```

Sign convention (datainf's, as for a whole response): ``scores[m][k, t]`` is the first-order change of token
t's negative log-likelihood when training example k is up-weighted. Negative = helpful: up-weighting k makes
token t MORE likely (k pushes the token up); positive = harmful: k makes it less likely (pushes it down).

Token gradients sum to the response's gradient (the ``causal_lm`` loss is the sum of the token NLLs), and
every method's score is linear in the query gradient, so the token scores of a training example sum over t to
its score for the whole response (for a ``causal_lm_mean`` store: ``n_tokens`` times it; with
``normalize=True`` the scores are not linear and no sum holds).

The gradients come from the store's own per-example path: the query is repeated once per loss token, each
copy with the loss on that one token, and the copies go through :meth:`Attributor.gradients` as a batch of
pre-tokenized examples (the hooks, the projection and the dtype of the training store's gradients).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from datainf.attributor import Attributor
from datainf.combine import Term, combine
from datainf.data.collate import TextCollator
from datainf.errors import DataInfError
from datainf.estimators import ScoreArguments
from datainf.estimators.defaults import DEFAULTS
from datainf.gradients import GradientDict
from datainf.ranking import KINDS, hit_rows, record_parts
from datainf.tasks import IGNORE_INDEX, NAMED_TASKS, token_level

#: the causal LM tasks whose loss is a sum (or mean) of token NLLs (as the task objects declare)
TOKEN_TASKS = tuple(name for name in NAMED_TASKS if token_level(name))


@dataclass(frozen=True)
class ResponseTokens:
    """The loss tokens of one tokenized query.

    input_ids: the whole tokenized query (prompt and response, as the collator made it).
    positions: the index in ``input_ids`` of each loss token (in order; never 0: the first token is never
        predicted).
    token_ids: the id of each loss token.
    pieces: each loss token's text, decoded in context (special tokens kept), so that
        ``"".join(pieces) == text``.
    offsets: each piece's (start, end) character span in ``text``.
    text: the loss tokens' text, the pieces joined.
    """

    input_ids: list[int]
    positions: list[int]
    token_ids: list[int]
    pieces: list[str]
    offsets: list[tuple[int, int]]
    text: str

    def __len__(self) -> int:
        return len(self.positions)


def _pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each token's text as it reads in the decoded sequence: the growth of the decoded prefix (so a word's
    leading space stays with its token, and a character split over several byte tokens lands on the last);
    a token whose prefix does not extend the previous one is decoded alone."""
    pieces, before = [], ""
    for t in range(len(ids)):
        through = tokenizer.decode(list(ids[: t + 1]), skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
        if through.startswith(before):
            pieces.append(through[len(before):])
        else:
            pieces.append(tokenizer.decode([ids[t]], skip_special_tokens=False, clean_up_tokenization_spaces=False))
        before = through
    return pieces


def response_tokens(collate: TextCollator, record: Mapping[str, Any]) -> ResponseTokens:
    """The loss tokens of ``record`` as ``collate`` tokenizes it (a causal LM record: chat, prompt/response or
    text). Refused: a collator without a tokenizer, a record with no token that carries the loss."""
    if not isinstance(collate, TextCollator) or collate.tokenizer is None:
        raise DataInfError("token-level attribution needs a TextCollator with a tokenizer (it locates and names "
                           "the response's tokens)")
    if not collate.task.startswith("causal_lm"):
        raise DataInfError(f"token-level attribution is for causal LM stores (task causal_lm), not {collate.task!r}")
    ids, labels = collate.tokenize(dict(record))
    positions = [p for p in range(1, len(ids)) if labels[p] != IGNORE_INDEX]
    if not positions:
        raise DataInfError("the response has no tokens that carry the loss (an empty response, or one cut away by "
                           f"max_length={collate.max_length}): give a non-empty response")
    token_ids = [int(ids[p]) for p in positions]
    pieces = _pieces(collate.tokenizer, token_ids)
    offsets, start = [], 0
    for piece in pieces:
        offsets.append((start, start + len(piece)))
        start += len(piece)
    return ResponseTokens(input_ids=[int(i) for i in ids], positions=positions, token_ids=token_ids,
                          pieces=pieces, offsets=offsets, text="".join(pieces))


def token_records(tokens: ResponseTokens) -> list[dict[str, list[int]]]:
    """One pre-tokenized record per loss token: the whole query, with the loss on that token only."""
    out = []
    for p in tokens.positions:
        labels = [IGNORE_INDEX] * len(tokens.input_ids)
        labels[p] = tokens.input_ids[p]
        out.append({"input_ids": list(tokens.input_ids), "labels": labels})
    return out


def token_gradients(attributor: Attributor, tokens: ResponseTokens) -> GradientDict:
    """The gradient of each loss token's NLL, block -> (n_tokens, *block_shape), computed by the
    attributor's per-example path (its projection, its dtype) on the query repeated once per token."""
    if attributor.task not in TOKEN_TASKS:
        raise DataInfError(f"token-level attribution needs a causal LM task ({', '.join(TOKEN_TASKS)}); this "
                           f"attributor's task is {attributor.task!r}")
    return attributor.gradients(token_records(tokens), desc=None)


@dataclass
class TokenAttribution:
    """Per-token scores of one response against a training store.

    tokens: the response's loss tokens (:class:`ResponseTokens`).
    scores: method -> (n_train, n_tokens) float64; ``scores[m][k, t]`` is the first-order change of token
        t's NLL when training example k is up-weighted (negative = helpful: k makes the token more likely).
    train_records: the training store's records (texts for the rows), or None.
    seconds: the wall time of the gradients and scoring.
    """

    tokens: ResponseTokens
    scores: dict[str, Tensor]
    train_records: Sequence[Mapping[str, Any]] | None = None
    seconds: float = 0.0
    methods: list[str] = field(default_factory=list)

    def top(self, method: str, k: int = 5) -> list[dict[str, list[dict[str, Any]]]]:
        """Per token, ``{"helpful": rows, "harmful": rows}``: its ``k`` most helpful (most negative) and most
        harmful (most positive) training examples as :func:`datainf.ranking.hit_rows` rows (fewer when fewer
        examples have that sign)."""
        if k < 1:
            raise DataInfError(f"k must be >= 1, got {k}")
        scores = self._scores(method)
        out = []
        for t in range(scores.shape[1]):
            col = scores[:, t]
            lists = {}
            for kind in KINDS:
                signed = col if kind == "harmful" else -col
                order = [int(i) for i in signed.argsort(descending=True, stable=True).tolist() if signed[i] > 0][:k]
                lists[kind] = hit_rows([(i, float(col[i])) for i in order], method=method, query=f"token {t}",
                                       kind=kind, train_records=self.train_records)
            out.append(lists)
        return out

    def strongest(self, method: str) -> list[tuple[int, float]]:
        """Per token, the training example with the largest |score| and that score."""
        scores = self._scores(method)
        best = scores.abs().argmax(dim=0)
        return [(int(i), float(scores[i, t])) for t, i in enumerate(best.tolist())]

    def examples(self, method: str, k: int = 5) -> list[int]:
        """The training examples that appear in some token's top-``k`` lists, strongest overall first (by
        the sum over tokens of |score|)."""
        scores = self._scores(method)
        picked = {row["train_index"] for lists in self.top(method, k) for rows in lists.values() for row in rows}
        weight = scores.abs().sum(dim=1)
        return sorted(picked, key=lambda i: (-float(weight[i]), i))

    def to_json(self, k: int = 5) -> dict[str, Any]:
        """Plain data for explain's JSON and the report: the tokens (index, text, offsets, id, position),
        and per method each token's top-``k`` rows, its strongest example, and every listed example's score
        on every token (``examples``: [{"train_index", "scores", and its texts}])."""
        tokens = [{"index": t, "text": piece, "start": start, "end": end, "token_id": token_id, "position": p}
                  for t, (piece, (start, end), token_id, p) in enumerate(zip(
                      self.tokens.pieces, self.tokens.offsets, self.tokens.token_ids, self.tokens.positions))]
        methods = {}
        for method in self.scores:
            scores = self._scores(method)
            examples = []
            for i in self.examples(method, k):
                entry: dict[str, Any] = {"train_index": i, "scores": [float(v) for v in scores[i]],
                                         "total": float(scores[i].sum())}
                if self.train_records is not None:
                    entry |= {f"train_{key}": value for key, value in record_parts(self.train_records[i]).items()
                              if key in ("prompt", "response", "text", "label", "label_name")}
                examples.append(entry)
            methods[method] = {"top": self.top(method, k),
                               "strongest": [{"train_index": i, "score": s} for i, s in self.strongest(method)],
                               "examples": examples}
        return {"text": self.tokens.text, "tokens": tokens, "k": k, "methods": methods,
                "sign": "score < 0: up-weighting the example makes the token more likely (helpful); > 0: less "
                        "likely (harmful)"}

    def render(self, method: str, width: int = 120) -> str:
        """A terminal table: one line per token with its most helpful and most harmful training example."""
        top = self.top(method, 1)
        lines = [f"{method}, token by token (score < 0: the example makes the token more likely; > 0: less likely)",
                 f"  {'#':>3}  {'token':<16} {'most helpful':<{(width - 24) // 2}} most harmful"]
        cell = max((width - 24) // 2, 20)
        for t, piece in enumerate(self.tokens.pieces):
            shown = []
            for kind in KINDS:
                rows = top[t][kind]
                if not rows:
                    shown.append("-")
                    continue
                r = rows[0]
                text = r.get("train_response", r.get("train_text", ""))
                shown.append(f"{r['score']:+.2e} #{r['train_index']} {' '.join(str(text).split())}")
            helpful, harmful = (s if len(s) <= cell else s[: cell - 1] + "…" for s in shown)
            lines.append(f"  {t:>3}  {repr(piece)[:16]:<16} {helpful:<{cell}} {harmful}")
        return "\n".join(lines)

    def _scores(self, method: str) -> Tensor:
        if method not in self.scores:
            raise DataInfError(f"no token scores for method {method!r}; these were computed: {', '.join(self.scores)}")
        return self.scores[method]


def _arguments(methods: str | ScoreArguments | Sequence[str | ScoreArguments]) -> list[ScoreArguments]:
    items = [methods] if isinstance(methods, (str, ScoreArguments)) else list(methods)
    if not items:
        raise DataInfError("give at least one method to score the tokens with")
    out = [a if isinstance(a, ScoreArguments) else ScoreArguments(method=a) for a in items]
    for a in out:
        if a.mean_query:
            raise DataInfError("token-level attribution scores each token: mean_query=True would average them away")
    return out


def token_attribution(
    attributors: Attributor | Sequence[Attributor],
    record: Mapping[str, Any],
    methods: str | ScoreArguments | Sequence[str | ScoreArguments] = DEFAULTS["causal_lm"]["per_query"],
    *,
    weights: Sequence[float] | None = None,
    load: Callable[[int], None] | None = None,
    allow_mismatch: bool = False,
) -> TokenAttribution:
    """Score every loss token of ``record`` (a prompt and its response, a conversation, ...) against the
    training store of ``attributors`` (see the module docstring for the sign and the sum).

    attributors: one :class:`Attributor` (its model, store, collator and projection), or one per checkpoint
        of a fine-tune (each with its checkpoint's store): the scores are then ``sum_c weights[c] * scores_c``
        (:func:`datainf.combine.combine`), the tokens those of the first attributor's collator.
    methods: method names or :class:`ScoreArguments` (not ``mean_query``).
    weights: one per attributor (default 1 each).
    load: ``load(c)`` puts checkpoint c's weights into the model before its token gradients are computed
        (when the attributors share one model object; checkpoint 0 is loaded again at the end); None: each
        attributor's model is already right.
    allow_mismatch: passed to the scoring (a model other than the store's).
    """
    t0 = time.perf_counter()
    attributors = [attributors] if isinstance(attributors, Attributor) else list(attributors)
    if not attributors:
        raise DataInfError("give at least one Attributor")
    weights = [1.0] * len(attributors) if weights is None else list(weights)
    if len(weights) != len(attributors):
        raise DataInfError(f"{len(weights)} weights for {len(attributors)} attributors: give one per checkpoint")
    arguments = _arguments(methods)
    for a in attributors:
        if a.store.metadata.task not in TOKEN_TASKS:
            raise DataInfError(f"store {a.store.path} holds gradients of task "
                               f"{a.store.metadata.task!r}; token-level attribution needs a "
                               "causal LM store (made by `datainf grads --task causal_lm`)")
    tokens = response_tokens(attributors[0].collate, record)
    grads = []
    for c, attributor in enumerate(attributors):
        if load is not None:
            load(c)
        grads.append(token_gradients(attributor, tokens))
    if load is not None and len(attributors) > 1:
        load(0)  # the first checkpoint (the model that answers) is left loaded
    scores = {}
    for a in arguments:
        result = combine([Term(att.store, g, a, w, label=str(att.store.path))
                          for att, g, w in zip(attributors, grads, weights)], allow_mismatch=allow_mismatch)
        scores[a.method] = result.scores.double()
    return TokenAttribution(tokens=tokens, scores=scores, train_records=attributors[0].store.records(),
                            seconds=time.perf_counter() - t0, methods=list(scores))




__all__ = ["TOKEN_TASKS", "ResponseTokens", "TokenAttribution", "response_tokens",
           "token_attribution", "token_gradients", "token_records"]
