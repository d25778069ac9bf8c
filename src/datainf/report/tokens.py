"""The token-level report: each explained response with its tokens shaded by their influence.

Input: the JSON of ``datainf explain --tokens --json FILE`` (every answer's ``tokens``: the response's loss
tokens, and per method each token's top examples, its strongest example and the listed examples' scores on
every token; see :meth:`datainf.tokens.TokenAttribution.to_json`). Output: one self-contained HTML page (the
report's CSS, no JavaScript) rendered from ``templates/tokens.html.j2``. Per answer and method:

* the response with each token shaded by its strongest influence (green: helpful, the example makes the
  token more likely; red: harmful), the example named in the token's tooltip;
* the response shaded by one training example's scores, for each example of the token lists (strongest
  overall first; the first open, the others collapsed);
* a table of every token's most helpful and most harmful examples.

A colour's strength is |score| over the largest |score| of that view, so every view uses its full range.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from datainf import atomic
from datainf.errors import DataInfError, parse_json
from datainf.report.render import render

#: explain's JSON format name (datainf.outputs.EXPLAIN_FORMAT; the report layer does not import outputs)
EXPLAIN_FORMAT = "datainf-explain"
#: the training examples shaded one by one, per answer and method
EXAMPLES_SHOWN = 10
#: training texts are cut to this many characters in the page (the full text in the tooltip)
TEXT_CHARS = 160
_GREEN, _RED = (6, 118, 71), (180, 35, 24)  # report.css --help and --harm


def read_explain_tokens(path: str | os.PathLike) -> dict[str, Any]:
    """An explain JSON file with token scores, checked: refused (naming the file) when it is not explain's
    JSON or no answer in it has token scores."""
    where = f"--tokens {path}"
    try:
        text = Path(path).read_bytes()
    except OSError as e:
        raise DataInfError(f"{where}: not a readable file ({e})") from None
    data = parse_json(text, where, "give the file `datainf explain --tokens --json FILE` wrote")
    if not isinstance(data, dict) or data.get("format") != EXPLAIN_FORMAT or not isinstance(data.get("answers"), list):
        raise DataInfError(f"{where} is not a `datainf explain --json` file; give the file `datainf explain --tokens "
                           "--json FILE` wrote")
    if not any(isinstance(a, dict) and isinstance(a.get("tokens"), dict) for a in data["answers"]):
        raise DataInfError(f"{where} has no token scores (it was written without --tokens); run `datainf explain "
                           f"--tokens --json {path} ...` again")
    for j, answer in enumerate(data["answers"]):
        tokens = answer.get("tokens") if isinstance(answer, dict) else None
        if tokens is None:
            continue
        pieces = tokens.get("tokens") if isinstance(tokens, dict) else None
        methods = tokens.get("methods") if isinstance(tokens, dict) else None
        if not isinstance(pieces, list) or not isinstance(methods, dict) or not all(
                isinstance(m, dict) and len(m.get("top", [])) == len(pieces) == len(m.get("strongest", []))
                for m in methods.values()):
            raise DataInfError(f"{where}: answer {j}'s token scores are malformed (each method needs one 'top' "
                               "and one 'strongest' entry per token); write the file again with explain --tokens")
    return data


def _shade(score: float, scale: float) -> str:
    """The CSS background of a token: green (helpful, < 0) or red (harmful, > 0), stronger with |score|."""
    if scale <= 0 or score == 0:
        return "background-color: transparent"
    r, g, b = _GREEN if score < 0 else _RED
    return f"background-color: rgba({r}, {g}, {b}, {0.08 + 0.72 * min(abs(score) / scale, 1.0):.3f})"


def _cut(text: Any, limit: int = TEXT_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _example_text(row: Mapping[str, Any]) -> str:
    if "train_prompt" in row:
        return f"{row['train_prompt']} → {row.get('train_response', '')}"
    return str(row.get("train_text", "(no text kept in the store)"))


def _row(row: Mapping[str, Any]) -> dict[str, Any]:
    return {"index": row["train_index"], "score": f"{row['score']:+.3e}", "text": _cut(_example_text(row)),
            "full": _cut(_example_text(row), 2000), "kind": "help" if row["score"] < 0 else "harm"}


def _spans(pieces: Sequence[str], scores: Sequence[float], titles: Sequence[str]) -> list[dict[str, Any]]:
    scale = max((abs(s) for s in scores), default=0.0)
    return [{"text": piece, "style": _shade(s, scale), "title": title,
             "kind": "help" if s < 0 else "harm" if s > 0 else "zero"}
            for piece, s, title in zip(pieces, scores, titles)]


def _method_view(answer_number: int, pieces: list[str], method: str, data: Mapping[str, Any],
                 first: bool) -> dict[str, Any]:
    examples = {e["train_index"]: e for e in data.get("examples", [])}
    strongest = data["strongest"]
    titles = []
    for t, (piece, lists) in enumerate(zip(pieces, data["top"])):
        parts = [f"token {t}: {piece!r}"]
        for kind in ("helpful", "harmful"):
            rows = lists.get(kind) or []
            parts.append(f"most {kind}: " + (f"#{rows[0]['train_index']} ({rows[0]['score']:+.3e}) "
                                             f"{_cut(_example_text(rows[0]), 100)}" if rows else "none"))
        titles.append("\n".join(parts))
    strong = _spans(pieces, [s["score"] for s in strongest], titles)
    for t, span in enumerate(strong if first else []):  # the first method's tokens are the page's anchors
        span["id"] = f"tok-{answer_number}-{t}"
    by_example = []
    for i in list(examples)[:EXAMPLES_SHOWN]:
        e = examples[i]
        titles_i = [f"token {t}: {piece!r}\n#{i}: {score:+.3e}" for t, (piece, score) in enumerate(zip(pieces, e["scores"]))]
        by_example.append({"index": i, "total": f"{e['total']:+.3e}", "text": _cut(_example_text(e)),
                           "spans": _spans(pieces, e["scores"], titles_i)})
    table = [{"number": t, "piece": piece, "helpful": [_row(r) for r in lists.get("helpful") or []],
              "harmful": [_row(r) for r in lists.get("harmful") or []]}
             for t, (piece, lists) in enumerate(zip(pieces, data["top"]))]
    return {"name": method, "strongest": strong, "examples": by_example, "table": table,
            "more": max(len(examples) - EXAMPLES_SHOWN, 0)}


def render_token_report(explain: Mapping[str, Any], title: str | None = None) -> str:
    """The HTML page of every answer of ``explain`` (read by :func:`read_explain_tokens`) that has tokens."""
    answers = []
    for j, answer in enumerate(explain["answers"]):
        tokens = answer.get("tokens")
        if not isinstance(tokens, dict):
            continue
        pieces = [str(t["text"]) for t in tokens["tokens"]]
        answers.append({"number": j + 1, "id": f"answer-{j + 1}", "prompt": str(answer.get("prompt", "")),
                        "response": str(answer.get("response", "")), "n_tokens": len(pieces),
                        "generated": bool(answer.get("generated")),
                        "methods": [_method_view(j + 1, pieces, m, d, i == 0)
                                    for i, (m, d) in enumerate(tokens["methods"].items())]})
    meta = [f"store {explain.get('store')}", f"model {explain.get('model')}", f"adapter {explain.get('adapter')}"]
    if explain.get("run"):
        meta.append(f"run {explain['run']}")
    return render("tokens.html.j2", title=title or "datainf: token-level attribution", meta=meta, answers=answers,
                  k=next(a.get("tokens", {}).get("k") for a in explain["answers"] if isinstance(a.get("tokens"), dict)))


def write_token_report(path: str | os.PathLike, explain: Mapping[str, Any], title: str | None = None) -> Path:
    """Render :func:`render_token_report` and write it atomically to ``path``."""
    path = Path(path)
    atomic.write_text(path, render_token_report(explain, title))
    return path


__all__ = ["read_explain_tokens", "render_token_report", "write_token_report"]
