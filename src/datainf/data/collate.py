"""Turn records (dicts) into model batches: padded token batches for the text tasks, image batches for the
diffusion task.

* classification: ``{"text": str, "label": int}`` (optionally ``"text_pair"`` for sentence pairs) ->
  ``input_ids``, ``attention_mask``, ``labels`` (B,)
* causal_lm:      ``{"prompt": str, "response": str}`` -> ``input_ids``, ``attention_mask`` and ``labels`` (B, T)
  with -100 on prompt and padding tokens, so only the response's tokens count in the loss.

Records that already hold ``input_ids`` are padded as they are. :class:`DiffusionCollate` stacks images,
seeds and prompt embeddings (or class labels) for :class:`datainf.tasks.DiffusionLoss`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from datainf.errors import DataInfError


@dataclass
class TextCollator:
    """A collate function: ``collator(records) -> dict[str, Tensor]``.

    Args:
        tokenizer: a Hugging Face tokenizer (needed unless records hold ``input_ids``).
        task: "classification" or "causal_lm" (any task name starting with "causal_lm").
        max_length: truncation length in tokens (for causal_lm the prompt is cut from the left so that the
            response survives).
        text_key, label_key, prompt_key, response_key: the record keys to read.
    """

    tokenizer: Any = None
    task: str = "classification"
    max_length: int = 128
    text_key: str = "text"
    label_key: str = "label"
    prompt_key: str = "prompt"
    response_key: str = "response"

    def __call__(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        if not records:
            raise DataInfError("cannot collate an empty batch")
        if "input_ids" in records[0]:
            return self._pad_pretokenized(records)
        if self.tokenizer is None:
            raise DataInfError("records hold raw text: pass a tokenizer (or records with input_ids)")
        if self.task.startswith("causal_lm"):
            return self._causal(records)
        return self._classification(records)

    def _get(self, record: Mapping[str, Any], key: str, i: int) -> Any:
        if key not in record:
            raise DataInfError(f"example {i} has no '{key}' field (it has {sorted(record)}); name the right column")
        return record[key]

    def _classification(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        texts = [str(self._get(r, self.text_key, i)) for i, r in enumerate(records)]
        pairs = [str(r["text_pair"]) for r in records] if "text_pair" in records[0] else None
        enc = self.tokenizer(texts, pairs, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if pairs is not None and "token_type_ids" in enc:
            batch["token_type_ids"] = enc["token_type_ids"]
        if self.label_key in records[0]:
            batch["labels"] = torch.tensor([int(self._get(r, self.label_key, i)) for i, r in enumerate(records)])
        return batch

    def _causal(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        tok = self.tokenizer
        rows, labels = [], []
        for i, r in enumerate(records):
            prompt_ids = tok(str(self._get(r, self.prompt_key, i)), add_special_tokens=True)["input_ids"]
            response_ids = tok(str(self._get(r, self.response_key, i)), add_special_tokens=False)["input_ids"]
            if tok.eos_token_id is not None:
                response_ids = response_ids + [tok.eos_token_id]
            response_ids = response_ids[: self.max_length]
            prompt_ids = prompt_ids[max(0, len(prompt_ids) + len(response_ids) - self.max_length) :]
            rows.append(prompt_ids + response_ids)
            labels.append([-100] * len(prompt_ids) + response_ids)
        return _pad(rows, labels, _pad_id(tok), left=getattr(tok, "padding_side", "right") == "left")

    def _pad_pretokenized(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        rows = [list(map(int, r["input_ids"])) for r in records]
        pad_id = _pad_id(self.tokenizer) if self.tokenizer is not None else 0
        if "labels" in records[0] and isinstance(records[0]["labels"], Sequence):
            return _pad(rows, [list(map(int, r["labels"])) for r in records], pad_id, left=False)
        batch = _pad(rows, None, pad_id, left=False)
        if self.label_key in records[0]:
            batch["labels"] = torch.tensor([int(r[self.label_key]) for r in records])
        return batch


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
