"""Turn records (dicts) into model batches: padded token batches for the text tasks, image batches for the
diffusion task.

* classification: ``{"text": str, "label": int}`` (optionally ``"text_pair"`` for sentence pairs) ->
  ``input_ids``, ``attention_mask``, ``labels`` (B,)
* causal LM, three record formats, each tokenized as a model is trained on it (``labels`` (B, T) hold the
  token ids that carry loss and -100 elsewhere):

  - ``{"messages": [{"role", "content"}, ...]}`` (TRL's conversational format): rendered with the
    tokenizer's own chat template; loss on the assistant turns (all of them, or only the last), each turn's
    content and its end-of-turn token, the tokens TRL's assistant-only loss trains on;
  - ``{"prompt": str, "response": str}`` (``"completion"`` is read as ``"response"``): the tokens of
    ``tokenizer(prompt + response)``, loss on those past the prompt (so no space is lost or doubled at
    the seam), then EOS; with ``chat_template=True`` the pair is a user turn and an assistant turn;
  - ``{"prompt": [turns], "completion": [turns]}`` (TRL's conversational prompt-completion format): the
    chat template's rendering of prompt + completion, loss on every token past the rendered prompt with its
    generation prompt (what TRL's SFT trains on for this format: the completion's turns, their end-of-turn
    tokens and whatever the template puts after them);
  - ``{"text": str}`` (plain language modelling): loss on every token, then EOS.

Records that already hold ``input_ids`` are padded as they are. :class:`DiffusionCollate` stacks images,
seeds and prompt embeddings (or class labels) for :class:`datainf.tasks.DiffusionLoss`.

Long inputs are cut to ``CHARS_PER_TOKEN * max_length`` characters before they are tokenized (no tokenizer
emits fewer than one character per token of ordinary text, so nothing within the token limit is lost), then
to ``max_length`` tokens, on the side ``truncation`` says: "auto" (datainf's own fine-tunes) keeps the end of
prompt-response and chat records, so the response survives, and the start of text; "keep_start" and
"keep_end" cut every format as TRL's ``SFTConfig.truncation_mode`` does (TRL's default, "keep_start", keeps
the first ``max_length`` tokens of the whole tokenized example, EOS included), so that the gradients are of the
tokens a TRL run trained on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor

from datainf.errors import DataInfError

IGNORE_INDEX = -100
FORMATS = ("auto", "messages", "prompt-response", "text")
ASSISTANT_TURNS = ("all", "last")
#: which tokens of a causal LM example carry the loss: the answer's (assistant turns, completion, response) or
#: every token (TRL's default for 'messages' data, without assistant_only_loss; completion_only_loss=False)
LOSS_TOKENS = ("assistant", "all")
#: which end of a too-long causal LM example is kept: "auto" (the end of chat and prompt-response records, the
#: start of text), or for every format TRL's ``truncation_mode`` values "keep_start" (TRL's default), "keep_end"
TRUNCATIONS = ("auto", "keep_start", "keep_end")
#: characters kept per token of max_length before tokenizing (a cap that never cuts what the limit keeps)
CHARS_PER_TOKEN = 64
#: token_counts counts up to this many times max_length (enough to say how much longer to make it)
LENGTH_PROBE = 16


def record_format(record: Mapping[str, Any], collator: TextCollator) -> str:
    """The causal LM format of one record: "messages", "prompt-response" or "text" (by its keys)."""
    if collator.format != "auto":
        return collator.format
    if collator.messages_key in record:
        return "messages"
    if collator.prompt_key in record:
        return "prompt-response"
    if collator.text_key in record:
        return "text"
    raise DataInfError(
        f"a causal LM record needs '{collator.messages_key}' (chat), '{collator.prompt_key}' + "
        f"'{collator.response_key}', or '{collator.text_key}'; this one has {sorted(record)}"
    )


@dataclass
class TextCollator:
    """A collate function: ``collator(records) -> dict[str, Tensor]``.

    Args:
        tokenizer: a Hugging Face tokenizer (needed unless records hold ``input_ids``); a fast one for the
            causal LM formats (offsets locate the loss tokens).
        task: "classification" or "causal_lm" (any task name starting with "causal_lm").
        max_length: truncation length in tokens.
        text_key, label_key, prompt_key, response_key, messages_key: the record keys to read.
        format: "auto" (by the record's keys), "messages", "prompt-response" or "text".
        chat_template: wrap prompt-response records in the chat template as a user and an assistant turn.
        assistant_turns: for messages, loss on "all" assistant turns or only the "last".
        append_eos: end prompt-response and text records with the EOS token (counted in the loss), as TRL's
            SFT does; chat records end as the template renders them.
        loss_tokens: "assistant" (the loss on the answer: the assistant turns, the completion or the
            response, as above) or "all" (on every token of the rendered example, as TRL's SFT trains on
            'messages' data unless ``assistant_only_loss=True``, and on prompt-completion data with
            ``completion_only_loss=False``).
        truncation: which tokens of a causal LM example longer than ``max_length`` are kept (see
            :data:`TRUNCATIONS`): "auto", or TRL's "keep_start" / "keep_end" for the gradients of a TRL run.
    """

    tokenizer: Any = None
    task: str = "classification"
    max_length: int = 128
    text_key: str = "text"
    label_key: str = "label"
    prompt_key: str = "prompt"
    response_key: str = "response"
    messages_key: str = "messages"
    format: str = "auto"
    chat_template: bool = False
    assistant_turns: str = "all"
    append_eos: bool = True
    loss_tokens: str = "assistant"
    truncation: str = "auto"

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise DataInfError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.assistant_turns not in ASSISTANT_TURNS:
            raise DataInfError(f"assistant_turns must be 'all' or 'last', got {self.assistant_turns!r}")
        if self.loss_tokens not in LOSS_TOKENS:
            raise DataInfError(f"loss_tokens must be 'assistant' or 'all', got {self.loss_tokens!r}")
        if self.truncation not in TRUNCATIONS:
            raise DataInfError(f"truncation must be one of {', '.join(TRUNCATIONS)}, got {self.truncation!r}")
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise DataInfError(f"max_length must be an integer >= 2 (tokens), got {self.max_length!r}")

    def settings(self) -> dict[str, Any]:
        """What decides the tokenization (kept in the store's manifest and fingerprint); ``loss_tokens`` and
        ``truncation`` only when they are not the default, so stores made before they existed keep their
        fingerprint."""
        out = {k: v for k, v in asdict(self).items() if k != "tokenizer"}
        for key, default in (("loss_tokens", "assistant"), ("truncation", "auto")):
            if out[key] == default:
                del out[key]
        return out

    def cut_side(self) -> str:
        """In words, how a causal LM example longer than ``max_length`` is cut ("from the right (...)")."""
        if self.truncation == "keep_start":
            return "from the right (the first max_length tokens are kept, as TRL's truncation_mode='keep_start')"
        if self.truncation == "keep_end":
            return "from the left (the last max_length tokens are kept, as TRL's truncation_mode='keep_end')"
        return "from the left for chat and prompt/response records (the response is kept), from the right for text"

    def __call__(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        if not records:
            raise DataInfError("cannot collate an empty batch")
        if "input_ids" in records[0]:
            return self._pad_pretokenized(records)
        if self.tokenizer is None:
            raise DataInfError("records hold raw text: pass a tokenizer (or records with input_ids)")
        if self.task.startswith("causal_lm"):
            rows, labels = zip(*(self.tokenize(r, i) for i, r in enumerate(records)))
            tok = self.tokenizer
            return _pad(list(rows), list(labels), _pad_id(tok), left=getattr(tok, "padding_side", "right") == "left")
        return self._classification(records)

    def token_counts(self, records: Sequence[Mapping[str, Any]]) -> list[int]:
        """Each record's length in tokens as this collator tokenizes it but before it is cut to
        ``max_length`` (counted up to ``LENGTH_PROBE * max_length``): a count above ``max_length`` means the
        example is truncated (causal LM records on the side :meth:`cut_side` says; classification texts
        from the right). Pre-tokenized records are never cut: they count 0."""
        probe = replace(self, max_length=self.max_length * LENGTH_PROBE)
        out = []
        for i, record in enumerate(records):
            if "input_ids" in record:
                out.append(0)
            elif self.task.startswith("causal_lm"):
                out.append(len(probe.tokenize(record, i)[0]))
            else:
                cap = CHARS_PER_TOKEN * probe.max_length
                pair = str(record["text_pair"])[:cap] if "text_pair" in record else None
                out.append(len(self.tokenizer(str(self._get(record, self.text_key, i))[:cap], pair, truncation=True,
                                              max_length=probe.max_length)["input_ids"]))
        return out

    def _get(self, record: Mapping[str, Any], key: str, i: int) -> Any:
        if key not in record:
            raise DataInfError(f"example {i} has no '{key}' field (it has {sorted(record)}); name the right column")
        return record[key]

    def _classification(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        cap = CHARS_PER_TOKEN * self.max_length
        texts = [str(self._get(r, self.text_key, i))[:cap] for i, r in enumerate(records)]
        pairs = [str(r["text_pair"])[:cap] for r in records] if "text_pair" in records[0] else None
        enc = self.tokenizer(texts, pairs, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if pairs is not None and "token_type_ids" in enc:
            batch["token_type_ids"] = enc["token_type_ids"]
        if self.label_key in records[0]:
            batch["labels"] = torch.tensor([int(self._get(r, self.label_key, i)) for i, r in enumerate(records)])
        return batch

    # ---------------------------------------------------------------- causal LM formats
    def tokenize(self, record: Mapping[str, Any], index: int = 0) -> tuple[list[int], list[int]]:
        """One causal LM record -> (token ids, labels): labels hold the id where the token carries loss and
        -100 elsewhere; at most ``max_length`` tokens."""
        ids, labels = self._tokenize(record, index)
        return (ids, list(ids)) if self.loss_tokens == "all" else (ids, labels)

    def _tokenize(self, record: Mapping[str, Any], index: int) -> tuple[list[int], list[int]]:
        kind = record_format(record, self)
        if kind == "messages":
            return self._messages(self._get(record, self.messages_key, index), index,
                                  last_only=self.assistant_turns == "last")
        if kind == "text":
            return self._text(str(self._get(record, self.text_key, index)))
        key = "completion" if self.response_key not in record and "completion" in record else self.response_key
        prompt, response = self._get(record, self.prompt_key, index), self._get(record, key, index)
        if is_turns(prompt) or is_turns(response):
            return self._prompt_completion_turns(prompt, response, index)
        prompt, response = str(prompt), str(response)
        if self.chat_template:
            return self._messages([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                                  index, last_only=True)
        return self._prompt_response(prompt, response)

    def _encode(self, text: str, special: bool) -> tuple[list[int], list[tuple[int, int]]]:
        tok = self.tokenizer
        if not getattr(tok, "is_fast", False):
            raise DataInfError("causal LM records need a fast tokenizer (offsets locate the loss tokens); load it "
                               "with AutoTokenizer.from_pretrained(..., use_fast=True)")
        enc = tok(text, add_special_tokens=special, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def _eos(self) -> list[int]:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return [int(eos)] if self.append_eos and eos is not None else []

    def _prompt_response(self, prompt: str, response: str) -> tuple[list[int], list[int]]:
        cap = CHARS_PER_TOKEN * self.max_length
        prompt, response = (prompt[:cap] if self.truncation == "keep_start" else prompt[-cap:]), response[:cap]
        ids, offsets = self._encode(prompt + response, special=True)
        seam = len(prompt)
        labels = [i if end > seam and start < end else IGNORE_INDEX for i, (start, end) in zip(ids, offsets)]
        eos = self._eos()
        return self._cut(ids + eos, labels + eos)

    def _text(self, text: str) -> tuple[list[int], list[int]]:
        cap = CHARS_PER_TOKEN * self.max_length
        ids, _ = self._encode(text[-cap:] if self.truncation == "keep_end" else text[:cap], special=True)
        eos = self._eos()
        if self.truncation == "auto":  # the start of the text, then EOS
            ids = ids[: self.max_length - len(eos)] + eos
            return ids, list(ids)
        return self._cut(ids + eos, ids + eos)

    def _messages(self, messages: Any, index: int, last_only: bool) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        self._require_chat_template()
        messages = _check_messages(messages, index, CHARS_PER_TOKEN * self.max_length)
        full = tok.apply_chat_template(messages, tokenize=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
            through = tok.apply_chat_template(messages[: i + 1], tokenize=False)
            if not (full.startswith(before) and full.startswith(through) and len(before) <= len(through)):
                raise DataInfError(
                    f"example {index}: the chat template does not render the conversation turn by turn, so its "
                    "assistant tokens cannot be located; give prompt/response records instead"
                )
            spans.append((len(before), len(through.rstrip())))  # the turn and its end-of-turn token
        if last_only:
            spans = spans[-1:]
        ids, offsets = self._encode(full, special=False)
        labels = [i if any(start < b and end > a for a, b in spans) else IGNORE_INDEX
                  for i, (start, end) in zip(ids, offsets)]
        return self._cut(ids, labels)

    def _prompt_completion_turns(self, prompt: Any, completion: Any, index: int) -> tuple[list[int], list[int]]:
        """TRL's conversational prompt-completion: loss on every token after the prompt's rendering with its
        generation prompt."""
        if not (is_turns(prompt) and is_turns(completion)):
            raise DataInfError(f"example {index}: the prompt and the completion must both be lists of "
                               "{'role', 'content'} turns (conversational) or both be strings")
        self._require_chat_template()
        cap = CHARS_PER_TOKEN * self.max_length
        turns = _check_messages([*prompt, *completion], index, cap)
        if any(t["role"] != "assistant" for t in turns[len(prompt):]):
            raise DataInfError(f"example {index}: every turn of the completion must be an assistant turn")
        tok = self.tokenizer
        full = tok.apply_chat_template(turns, tokenize=False)
        before = tok.apply_chat_template(turns[: len(prompt)], tokenize=False, add_generation_prompt=True)
        if not full.startswith(before):
            raise DataInfError(f"example {index}: the chat template renders the prompt differently on its own "
                               "than at the start of the conversation, so the completion's tokens cannot be "
                               "located; give 'messages' records instead")
        ids, offsets = self._encode(full, special=False)
        seam = len(before)
        labels = [i if end > seam and start < end else IGNORE_INDEX for i, (start, end) in zip(ids, offsets)]
        return self._cut(ids, labels)

    def _require_chat_template(self) -> None:
        if not getattr(self.tokenizer, "chat_template", None):
            raise DataInfError(
                "this tokenizer has no chat template, so chat records ('messages', or prompt/completion turns) "
                "cannot be rendered as the model was trained on them; give prompt/response strings "
                "(--data-format prompt-response) or plain text (--data-format text)"
            )

    def _cut(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        """At most ``max_length`` tokens: the first ones for "keep_start", else the last ones."""
        if self.truncation == "keep_start":
            return ids[: self.max_length], labels[: self.max_length]
        excess = len(ids) - self.max_length
        return (ids[excess:], labels[excess:]) if excess > 0 else (ids, labels)

    def _pad_pretokenized(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        rows = [list(map(int, r["input_ids"])) for r in records]
        pad_id = _pad_id(self.tokenizer) if self.tokenizer is not None else 0
        if "labels" in records[0] and isinstance(records[0]["labels"], Sequence):
            return _pad(rows, [list(map(int, r["labels"])) for r in records], pad_id, left=False)
        batch = _pad(rows, None, pad_id, left=False)
        if self.label_key in records[0]:
            batch["labels"] = torch.tensor([int(r[self.label_key]) for r in records])
        return batch


def is_turns(value: Any) -> bool:
    """Whether a prompt or completion value is a list of chat turns (TRL's conversational format) rather than
    a string."""
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _check_messages(messages: Any, index: int, cap: int) -> list[dict[str, str]]:
    """A list of {"role", "content"} turns with at least one assistant turn; contents cut to ``cap`` chars."""
    if not is_turns(messages) or not messages:
        raise DataInfError(f"example {index}: 'messages' must be a non-empty list of {{'role', 'content'}} turns")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataInfError(f"example {index}, turn {j}: each turn needs a 'role' and a 'content' string")
        out.append({**m, "content": m["content"][:cap]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataInfError(f"example {index}: the conversation has no assistant turn, so nothing carries loss")
    return out


def _pad_id(tokenizer: Any) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    return 0


def _pad(rows: list[list[int]], labels: list[list[int]] | None, pad_id: int, left: bool) -> dict[str, Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    lab = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(T - len(r), T) if left else slice(0, len(r))
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = 1
        if labels is not None:
            lab[i, sl] = torch.tensor(labels[i], dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": mask}
    if labels is not None:
        batch["labels"] = lab
    return batch


class DiffusionCollate:
    """``collate(records) -> batch``: records hold ``image`` (C, H, W) in [-1, 1] (or precomputed ``latents``),
    ``seed`` (int) and ``prompt`` (str, needs an encoder: a PromptEncoder or any ``encoder(prompts) -> (n, L, D)``)
    or ``class_label`` (int).

    Returns {"pixel_values" (B, C, H, W), "seed" (B,), and "encoder_hidden_states" (B, L, D) or
    "class_labels" (B,)}.
    """

    def __init__(self, encoder: Callable[[Sequence[str]], Tensor] | None = None):
        self.encoder = encoder
        self.__qualname__ = "DiffusionCollate"

    def __call__(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        if not records:
            raise DataInfError("cannot collate an empty list of records")
        out: dict[str, Tensor] = {}
        for n, r in enumerate(records):
            if "image" not in r and "latents" not in r:
                raise DataInfError(f"record {n} has no 'image' (or 'latents') tensor")
            if "seed" not in r:
                raise DataInfError(f"record {n} has no 'seed': give each example a unique integer seed")
        key = "latents" if "latents" in records[0] else "image"
        out["latents" if key == "latents" else "pixel_values"] = torch.stack(
            [torch.as_tensor(r[key], dtype=torch.float32) for r in records])
        out["seed"] = torch.tensor([int(r["seed"]) for r in records], dtype=torch.long)
        if "prompt" in records[0]:
            if self.encoder is None:
                raise DataInfError("records have prompts but DiffusionCollate has no PromptEncoder")
            out["encoder_hidden_states"] = self.encoder([str(r["prompt"]) for r in records])
        elif "class_label" in records[0]:
            out["class_labels"] = torch.tensor([int(r["class_label"]) for r in records], dtype=torch.long)
        return out
